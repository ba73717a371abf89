"""The .deb and .rpm: built by `make package`, inspected with dpkg-deb/rpm, linted, and the .deb
installed, upgraded and purged in a clean Debian 12 root made with debootstrap.

The debootstrap'ed base is cached outside the repo (/var/cache/tfo-agent-test/, keyed by a hash
of the recipe); each test run works on an overlay of it, so the base stays clean. Downloaded
.debs are kept in the same cache. The install itself runs with no network at all (`unshare -n`)
after apt downloaded the distro dependencies: nothing is fetched from PyPI or anywhere else.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

from agent import __version__, config
from tests.conftest import ROOT, free_port, parse_metrics

PACKAGING = ROOT / "packaging"
DEB = ROOT / "dist" / f"tfo-agent_{__version__}_amd64.deb"
RPM = ROOT / "dist" / f"tfo-agent-{__version__}.x86_64.rpm"
PKG_PYTHON = ROOT / "build" / "pkg-venv" / "bin" / "python"
CACHE = Path(os.environ.get("TFO_TEST_CACHE", "/var/cache/tfo-agent-test"))
SUITE = "bookworm"
# Bump when the way the base root is made changes: the cache key covers this and the mirror.
DEBOOTSTRAP_RECIPE = f"debootstrap --variant=minbase {SUITE} v1"
# Paths whose changes are bookkeeping, not installed files: left out of the purge comparison.
SNAPSHOT_SKIP = ("proc", "sys", "dev", "run", "tmp", "var/cache", "var/lib/apt", "var/lib/dpkg", "var/log")
EXPOSURE_MAX = 2.4  # systemd-analyze security, offline and on the booted root (packaging/README.md)
# Warnings kept on purpose; each is explained in packaging/README.md.
LINTIAN_KEPT = {"initial-upload-closes-no-bugs"}
RPMLINT_KEPT = {
    "files-duplicate",
    "unstripped-binary-or-object",
    "summary-not-capitalized",
    "non-coherent-filename",
    "no-url-tag",
    "no-manual-page-for-binary",
    "invalid-license",
    "dangerous-command-in-%postun",
}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="packaging tests need root (chroot, mounts)")


def run(
    *cmd: str | Path, timeout: float = 300, cwd: Optional[Path] = None, env: Optional[dict[str, str]] = None
) -> str:
    """Run a command; its stdout, or a failure that shows what it printed."""
    args = [str(c) for c in cmd]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def build_deb(version: str, out: Path) -> Path:
    """One more .deb, of another version, with the same recipe as `make package`."""
    run(PKG_PYTHON, PACKAGING / "build.py", "--version", version, "--format", "deb", "--out", out, timeout=600)
    return out / f"tfo-agent_{version}_amd64.deb"


@pytest.fixture(scope="module")
def newer_deb(tmp_path_factory: pytest.TempPathFactory, packages: tuple[Path, Path]) -> Path:
    """The same code packaged as a newer version: what an upgrade installs."""
    return build_deb(f"{__version__}+pkgtest1", tmp_path_factory.mktemp("newer"))


@pytest.fixture(scope="module")
def packages() -> tuple[Path, Path]:
    start = time.monotonic()
    run("make", "-s", "package", cwd=ROOT, timeout=900)
    print(f"make package: {time.monotonic() - start:.1f}s")
    assert DEB.is_file() and RPM.is_file()
    return DEB, RPM


# ---------------------------------------------------------------- contents, metadata, lint


def deb_field(deb: Path, name: str) -> str:
    return run("dpkg-deb", "-f", deb, name).strip()


def test_deb_metadata_and_dependencies(packages: tuple[Path, Path]) -> None:
    deb, _ = packages
    info = run("dpkg-deb", "-I", deb)
    assert deb_field(deb, "Package") == "tfo-agent"
    assert deb_field(deb, "Version") == f"{__version__}-1"
    assert deb_field(deb, "Architecture") == "amd64"
    assert "@" in deb_field(deb, "Maintainer")
    assert "eBPF" in deb_field(deb, "Description")
    depends = {d.split()[0] for d in deb_field(deb, "Depends").split(", ")}
    # Distro packages only; what Debian 12 lacks is bundled, never fetched at install time.
    assert depends == {
        "python3",
        "python3-yaml",
        "python3-prometheus-client",
        "python3-grpcio",
        "python3-protobuf",
        "python3-requests",
        "python3-deprecated",
        "python3-typing-extensions",
        "libbpf1",
        "procps",  # /bin/kill for ExecReload
    }
    for script in ("postinst", "prerm", "postrm"):
        assert script in info
    assert run("dpkg-deb", "-I", deb, "conffiles").split() == ["/etc/tfo-agent/config.yaml"]


def test_deb_maintainer_scripts(packages: tuple[Path, Path], tmp_path: Path) -> None:
    deb, _ = packages
    run("dpkg-deb", "-e", deb, tmp_path)
    postinst, prerm, postrm = ((tmp_path / s).read_text() for s in ("postinst", "prerm", "postrm"))
    assert "deb-systemd-helper enable tfo-agent.service" in postinst
    assert "if [ -d /run/systemd/system ]; then" in postinst  # a chroot only enables
    assert 'deb-systemd-invoke "$action" tfo-agent.service' in postinst
    assert "action=restart" in postinst  # upgrades restart; pinned maps keep the counters
    assert "deb-systemd-invoke stop tfo-agent.service" in prerm
    assert "deb-systemd-helper purge tfo-agent.service" in postrm
    assert "rm -rf /var/lib/tfo-agent /sys/fs/bpf/tfo-agent" in postrm
    for text in (postinst, prerm, postrm):
        assert "pip" not in text


def test_deb_contents(packages: tuple[Path, Path]) -> None:
    deb, _ = packages
    listing = run("dpkg-deb", "-c", deb)
    files = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    modes = {line.split()[-1].lstrip("."): line.split()[0] for line in listing.splitlines()}
    expected = {
        "/usr/bin/tfo-agent",
        "/usr/lib/tfo-agent/agent/cli.py",
        "/usr/lib/tfo-agent/agent/hubble/proto_gen/observer/observer_pb2_grpc.py",
        "/usr/lib/tfo-agent/agent/cri/proto_gen/runtime/api_pb2_grpc.py",
        "/usr/lib/tfo-agent/vendor/opentelemetry/sdk/metrics/__init__.py",
        "/usr/lib/tfo-agent/vendor/opentelemetry/exporter/otlp/proto/grpc/metric_exporter/__init__.py",
        "/etc/tfo-agent/config.yaml",
        "/lib/systemd/system/tfo-agent.service",
        "/lib/systemd/system/tfo-agent-bpffs.service",
        "/usr/share/doc/tfo-agent/copyright",
        "/usr/share/doc/tfo-agent/changelog.Debian.gz",
        "/usr/share/man/man1/tfo-agent.1.gz",
        *(f"/var/lib/tfo-agent/ebpf/{o.name}" for o in (ROOT / "bpf").glob("*.bpf.o")),
        *(f"/usr/share/tfo-agent/{f.relative_to(ROOT)}" for f in (ROOT / "monitoring").rglob("*.y*ml")),
        *(f"/usr/share/tfo-agent/{f.relative_to(ROOT)}" for f in (ROOT / "monitoring").rglob("*.json")),
    }
    assert expected <= files
    assert modes["/usr/bin/tfo-agent"] == "-rwxr-xr-x"
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    # Debian's own grpcio/protobuf/yaml/prometheus_client are used, not copies.
    assert not [
        f for f in files if re.match(r"/usr/lib/tfo-agent/vendor/(grpc|yaml|prometheus_client|google/protobuf)/", f)
    ]


def test_rpm_metadata_contents_and_scripts(packages: tuple[Path, Path]) -> None:
    _, rpm = packages
    info = run("rpm", "-qpi", rpm)
    assert re.search(r"^Name\s*: tfo-agent$", info, re.MULTILINE)
    assert re.search(rf"^Version\s*: {re.escape(__version__)}$", info, re.MULTILINE)
    assert re.search(r"^Architecture: x86_64$", info, re.MULTILINE)
    assert re.search(r"^License\s*: Apache-2.0", info, re.MULTILINE)
    requires = set(run("rpm", "-qpR", rpm).splitlines())
    assert {"python3", "python(abi) = 3.9", "python3-pyyaml", "libbpf.so.1()(64bit)", "systemd"} <= requires
    files = set(run("rpm", "-qpl", rpm).splitlines())
    assert {
        "/usr/bin/tfo-agent",
        "/usr/lib/systemd/system/tfo-agent.service",
        "/usr/lib/systemd/system/tfo-agent-bpffs.service",
        "/etc/tfo-agent/config.yaml",
        "/usr/lib/tfo-agent/vendor/google/protobuf/__init__.py",  # EL9 has none recent enough
        "/usr/lib/tfo-agent/vendor/prometheus_client/__init__.py",
        "/usr/share/man/man1/tfo-agent.1.gz",
    } <= files
    # Compiled libraries are bundled for EL9's python3.9 only.
    assert [f for f in files if re.search(r"/vendor/grpc/_cython/cygrpc\.cpython-39-x86_64-linux-gnu\.so$", f)]
    flags = dict(
        line.rsplit(" ", 1)
        for line in run("rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", rpm).splitlines()
    )
    assert flags["/etc/tfo-agent/config.yaml"] == "cn"  # %config(noreplace)
    scripts = run("rpm", "-qp", "--scripts", rpm)
    assert "systemctl --no-reload enable tfo-agent.service" in scripts
    assert "systemctl try-restart tfo-agent.service" in scripts
    assert "systemctl --no-reload disable --now tfo-agent.service" in scripts
    assert "pip" not in scripts


def test_lintian_reports_no_errors(packages: tuple[Path, Path]) -> None:
    deb, _ = packages
    proc = subprocess.run(["lintian", "--pedantic", str(deb)], capture_output=True, text=True, timeout=300)
    tags = re.findall(r"^([EWIPX]): tfo-agent: (\S+)", proc.stdout, re.MULTILINE)
    assert not [t for level, t in tags if level == "E"], proc.stdout
    assert {t for level, t in tags if level == "W"} <= LINTIAN_KEPT, proc.stdout


def test_rpmlint_reports_no_errors(packages: tuple[Path, Path]) -> None:
    _, rpm = packages
    proc = subprocess.run(
        ["rpmlint", "-c", str(PACKAGING / "rpm" / "rpmlint.toml"), str(rpm)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    tags = re.findall(r"^tfo-agent\.x86_64: ([EW]): (\S+)", proc.stdout, re.MULTILINE)
    assert not [t for level, t in tags if level == "E"], proc.stdout
    assert " 0 errors" in proc.stdout
    assert {t for level, t in tags if level == "W"} <= RPMLINT_KEPT, proc.stdout


def test_service_hardening_exposure() -> None:
    out = run("systemd-analyze", "security", "--offline=true", PACKAGING / "systemd" / "tfo-agent.service")
    m = re.search(r"Overall exposure level for tfo-agent\.service: ([\d.]+)", out)
    assert m, out
    assert float(m.group(1)) <= EXPOSURE_MAX


def test_packaged_config_is_the_defaults() -> None:
    assert config.load(str(PACKAGING / "config.yaml")) == config.Config()


# EL9's python3 and the versions of the two libraries the rpm takes from EL9 BaseOS
# (python3-pyyaml 5.4.1, python3-requests 2.25.1), stood in for by wheels of those versions.
EL9_PYTHON = "3.9"
EL9_BASEOS = ("PyYAML==5.4.1", "requests==2.25.1", "urllib3==1.26.5", "idna==2.10", "chardet==4.0.0", "certifi")


def feature_check(*path: str) -> str:
    """Python source: with ``path`` first on sys.path (as the launcher does), import every optional
    feature (Hubble gRPC client, CRI client, OTLP gRPC/HTTP exporters), build the exporters, and print where
    grpc and protobuf came from."""
    return (
        f"import sys; sys.path[:0] = {list(path)!r};"
        "import grpc, google.protobuf, agent.hubble.client, agent.hubble.proto_gen.observer.observer_pb2_grpc;"
        "import agent.cri.client;"
        "from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter;"
        "from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as H;"
        "OTLPMetricExporter(endpoint='localhost:4317', insecure=True); H(endpoint='http://localhost:4318');"
        "print('grpc from', grpc.__file__); print('protobuf from', google.protobuf.__file__);"
    )


def python39() -> Optional[str]:
    for candidate in (
        shutil.which(f"python{EL9_PYTHON}"),
        *map(str, Path("/root/.pyenv/versions").glob("3.9*/bin/python3.9")),
    ):
        if candidate and subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
            return candidate
    return None


def test_rpm_bundle_runs_on_el9_python(packages: tuple[Path, Path], tmp_path: Path) -> None:
    """The rpm's files with a CPython 3.9 (EL9's ABI): every feature imports, the CLI works."""
    _, rpm = packages
    python = python39()
    if not python:
        pytest.skip(f"no python{EL9_PYTHON} interpreter on this host")
    root, baseos = tmp_path / "root", tmp_path / "baseos"
    root.mkdir()
    payload = subprocess.run(["rpm2cpio", str(rpm)], capture_output=True, check=True, timeout=120).stdout
    subprocess.run(["cpio", "-idm", "--quiet"], input=payload, cwd=root, check=True, timeout=120)
    run(
        python, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:", "--target", baseos, *EL9_BASEOS,
        timeout=300,
    )  # fmt: skip
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        (root / "etc/tfo-agent/config.yaml")
        .read_text()
        .replace("programs_path: /var/lib/tfo-agent/ebpf", f"programs_path: {root}/var/lib/tfo-agent/ebpf")
    )
    lib = root / "usr/lib/tfo-agent"
    out = run(
        python, "-I", "-c",
        feature_check(str(lib), f"{lib}/vendor", str(baseos)) + "from agent.cli import main;"
        f"sys.exit(main(['version']) or main(['config', 'validate', '{cfg}']) or main(['check', '-c', '{cfg}']))",
    )  # fmt: skip
    assert f"grpc from {lib}/vendor/grpc/" in out and f"protobuf from {lib}/vendor/google/protobuf/" in out
    assert f"tfo-agent {__version__}" in out
    assert "host can run this configuration" in out


# ---------------------------------------------------------------- a clean Debian 12 root


def debian_mirror() -> str:
    """The Debian archive this host's apt uses (so the test needs no other address)."""
    for src in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        for stanza in src.read_text().split("\n\n"):
            if re.search(rf"^Suites:.*\b{SUITE}\b", stanza, re.MULTILINE):
                m = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
                if m and "security" not in m.group(1):
                    return m.group(1)
    listing = Path("/etc/apt/sources.list")
    text = listing.read_text() if listing.is_file() else ""
    m = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", text, re.MULTILINE)
    if not m:
        pytest.fail(f"no Debian {SUITE} archive in this host's apt sources")
    return m.group(1)


def base_root() -> Path:
    """The cached debootstrap'ed Debian 12 (made once per recipe; ~35 s on this network)."""
    mirror = debian_mirror()
    key = hashlib.sha256(f"{DEBOOTSTRAP_RECIPE} {mirror}".encode()).hexdigest()[:16]
    base = CACHE / f"debootstrap-{SUITE}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"{base.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run waits, then finds the base made
        if not (base / "root" / "usr" / "bin" / "apt-get").exists():
            tmp = base.with_name(base.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            start = time.monotonic()
            run("debootstrap", "--variant=minbase", SUITE, tmp / "root", mirror, timeout=1800)
            print(f"debootstrap: {time.monotonic() - start:.1f}s")
            shutil.rmtree(base, ignore_errors=True)
            tmp.rename(base)
    return base / "root"


class Chroot:
    """An overlay of the cached base with /proc, /sys, /dev bound in and the host's apt sources."""

    def __init__(self, work: Path) -> None:
        self.root = work / "root"
        for d in ("upper", "work", "root"):
            (work / d).mkdir()
        run(
            "mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={base_root()},upperdir={work / 'upper'},workdir={work / 'work'}", self.root,
        )  # fmt: skip
        for api in ("proc", "sys", "dev"):
            run("mount", "--rbind", f"/{api}", self.root / api)
            run("mount", "--make-rslave", self.root / api)  # our unmounts never reach the host
        archives = CACHE / "apt-archives"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        run("mount", "--bind", archives, self.root / "var/cache/apt/archives")
        (self.root / "etc/apt/sources.list").unlink()
        if Path("/etc/apt/sources.list").is_file():
            shutil.copy("/etc/apt/sources.list", self.root / "etc/apt/sources.list")
        for src in Path("/etc/apt/sources.list.d").glob("*.sources"):
            shutil.copy(src, self.root / "etc/apt/sources.list.d" / src.name)
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf")

    def close(self) -> None:
        subprocess.run(["umount", "-R", str(self.root)], check=False, timeout=60)

    def __call__(self, *cmd: str, offline: bool = False, timeout: float = 300) -> str:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
        prefix = ["unshare", "--net"] if offline else []
        return run(*prefix, "chroot", self.root, *cmd, timeout=timeout, env=env)

    def apt(self, *args: str, offline: bool = False) -> str:
        return self("apt-get", "-y", "-q", "--no-install-recommends", *args, offline=offline, timeout=900)

    def install(self, deb: Path) -> None:
        """Fetch the distro dependencies from Debian's archive, then install with no network."""
        shutil.copy(deb, self.root / "tmp" / deb.name)
        self.apt("install", "--download-only", f"/tmp/{deb.name}")
        self.apt("install", f"/tmp/{deb.name}", offline=True)  # all it needs is in the apt cache now

    def snapshot(self) -> set[str]:
        out = set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            dirnames[:] = [d for d in dirnames if os.path.normpath(os.path.join(rel, d)) not in SNAPSHOT_SKIP]
            out.update(os.path.normpath(os.path.join(rel, n)) for n in dirnames + filenames)
        return out


@pytest.fixture(scope="module")
def chroot(tmp_path_factory: pytest.TempPathFactory, packages: tuple[Path, Path]) -> Iterator[Chroot]:
    start = time.monotonic()
    root = Chroot(tmp_path_factory.mktemp("debian12"))
    try:
        print(f"base root: {time.monotonic() - start:.1f}s")
        root.apt("update")
        yield root
    finally:
        root.close()


@pytest.fixture(scope="module")
def installed(chroot: Chroot, packages: tuple[Path, Path]) -> tuple[Chroot, set[str]]:
    """The .deb installed in the clean root; also the root's paths before it (dependencies in)."""
    deb, _ = packages
    depends = [d.split()[0] for d in deb_field(deb, "Depends").split(", ")]
    chroot.apt("install", "systemd", *depends)  # a Debian 12 host has systemd (here not running)
    before = chroot.snapshot()
    start = time.monotonic()
    chroot.install(deb)
    print(f"offline install: {time.monotonic() - start:.1f}s")
    return chroot, before


def test_install_in_clean_debian12_without_pypi(installed: tuple[Chroot, set[str]]) -> None:
    root, _ = installed
    assert root("dpkg-query", "-W", "-f=${Status} ${Version}", "tfo-agent") == f"install ok installed {__version__}-1"
    # No pip anywhere, nothing outside dpkg's files: the bundle came in the .deb.
    assert subprocess.run(["chroot", str(root.root), "python3", "-m", "pip"], capture_output=True).returncode != 0
    assert not list((root.root / "usr/local/lib").glob("python3*/*-packages/*"))
    # Enabled (chroot: no systemd running, so not started, and no error).
    wants = root.root / "etc/systemd/system/multi-user.target.wants/tfo-agent.service"
    assert os.readlink(wants) == "/lib/systemd/system/tfo-agent.service"
    assert list((root.root / "usr/lib/tfo-agent/agent/__pycache__").glob("cli.cpython-311.pyc"))


def test_cli_runs_in_clean_root(installed: tuple[Chroot, set[str]]) -> None:
    root, _ = installed
    assert root("tfo-agent", "version").strip() == f"tfo-agent {__version__}"
    assert root("tfo-agent", "config", "validate", "/etc/tfo-agent/config.yaml").strip().endswith(": valid")
    out = root("tfo-agent", "check")
    assert "host can run this configuration" in out
    assert re.search(r"\[OK\s*\] collector syscalls", out)
    # Every optional feature imports with Debian's grpcio/protobuf and the bundled OpenTelemetry.
    out = root("python3", "-I", "-c", feature_check("/usr/lib/tfo-agent", "/usr/lib/tfo-agent/vendor"))
    assert "grpc from /usr/lib/python3/dist-packages/grpc/" in out
    assert "protobuf from /usr/lib/python3/dist-packages/google/protobuf/" in out


def test_systemd_accepts_the_units(installed: tuple[Chroot, set[str]]) -> None:
    root, _ = installed
    units = [f"/lib/systemd/system/{u}" for u in ("tfo-agent.service", "tfo-agent-bpffs.service")]
    # --root: unit paths and ExecStart= binaries are those of the clean root the package went into.
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root.root}", *units],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if "tfo-agent" in line], proc.stderr


def syscall_total(port: int) -> Optional[float]:
    """Sum of ebpf_syscall_count_total at 127.0.0.1:port, None while nothing serves it."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            series = parse_metrics(resp.read().decode())
    except OSError:
        return None
    values = [v for (name, _), v in series.items() if name == "ebpf_syscall_count_total"]
    return sum(values) if values else None


def wait_total(port: int, timeout: float = 90) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        total = syscall_total(port)
        if total is not None:
            return total
        time.sleep(1)
    pytest.fail(f"no ebpf_syscall_count_total on port {port} within {timeout}s")


@pytest.mark.parametrize("bpffs", ["host", "unit"])
def test_service_runs_hardened_under_booted_systemd(
    installed: tuple[Chroot, set[str]], newer_deb: Path, tmp_path: Path, bpffs: str
) -> None:
    """Boot the root's systemd (systemd-nspawn, changes discarded): the packaged, enabled unit
    starts with its sandbox, serves ebpf_* metrics, keeps counters across a restart and an
    upgrade (which restarts it), reloads. bpffs is the host's (bound in: the bpffs unit stays
    skipped), or none (the container's systemd mounts none: tfo-agent-bpffs.service must)."""
    root, _ = installed
    host_bpffs = ["--bind=/sys/fs/bpf"] if bpffs == "host" else []
    port, pin = free_port(), f"/sys/fs/bpf/tfo-pkgtest-{uuid.uuid4().hex[:8]}"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        (PACKAGING / "config.yaml")
        .read_text()
        .replace("pin_path: /sys/fs/bpf/tfo-agent", f"pin_path: {pin}")
        .replace('listen_address: "0.0.0.0:9435"', f'listen_address: "127.0.0.1:{port}"')
    )
    shutil.copy(cfg, root.root / "tmp/booted.yaml")  # for the cleanup below
    log = (tmp_path / "nspawn.log").open("wb")
    nspawn = subprocess.Popen(
        ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--volatile=overlay", "--console=passive",
         "-D", str(root.root), "-b",
         # what a host gives the service: the capabilities and syscalls it keeps, the kernel's files
         "--capability=CAP_BPF,CAP_PERFMON", "--system-call-filter=bpf perf_event_open",
         *host_bpffs, "--bind-ro=/sys/kernel/btf", "--bind-ro=/sys/kernel/tracing",
         f"--bind-ro={cfg}:/etc/tfo-agent/config.yaml", f"--bind-ro={newer_deb}:/opt/{newer_deb.name}"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        before = wait_total(port)
        init = Path(f"/proc/{nspawn.pid}/task/{nspawn.pid}/children").read_text().split()[0]

        def inside(*cmd: str) -> str:
            return run("nsenter", "-t", init, "-a", *cmd, timeout=120)

        assert inside("systemctl", "is-enabled", "tfo-agent").strip() == "enabled"
        mounted_by_unit = inside("systemctl", "show", "-p", "ActiveState", "--value", "tfo-agent-bpffs").strip()
        assert mounted_by_unit == ("inactive" if bpffs == "host" else "active")
        assert re.search(r" /sys/fs/bpf \S+ .* - bpf ", inside("cat", "/proc/1/mountinfo"))
        main_pid = inside("systemctl", "show", "-p", "MainPID", "--value", "tfo-agent").strip()
        status = dict(
            line.split(":\t", 1) for line in inside("cat", f"/proc/{main_pid}/status").splitlines() if ":\t" in line
        )
        assert int(status["CapBnd"], 16) == (1 << 38) | (1 << 39)  # CAP_PERFMON | CAP_BPF, nothing else
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
        exposure = re.search(r"Overall exposure level for tfo-agent\.service: ([\d.]+)", inside(
            "systemd-analyze", "security", "--no-pager", "tfo-agent.service"
        ))  # fmt: skip
        assert exposure and float(exposure.group(1)) <= EXPOSURE_MAX
        inside("systemctl", "restart", "tfo-agent")
        time.sleep(2)
        after_restart = wait_total(port)
        assert after_restart >= before  # pinned maps: the counters went on
        main_pid = inside("systemctl", "show", "-p", "MainPID", "--value", "tfo-agent").strip()
        inside("apt-get", "install", "-y", "-q", f"/opt/{newer_deb.name}")
        assert inside("systemctl", "show", "-p", "MainPID", "--value", "tfo-agent").strip() != main_pid  # restarted
        time.sleep(2)
        assert wait_total(port) >= after_restart  # and the counters went on across the upgrade too
        main_pid = inside("systemctl", "show", "-p", "MainPID", "--value", "tfo-agent").strip()
        inside("systemctl", "reload", "tfo-agent")
        time.sleep(2)
        assert inside("systemctl", "show", "-p", "MainPID", "--value", "tfo-agent").strip() == main_pid
        assert inside("systemctl", "is-active", "tfo-agent").strip() == "active"
    finally:
        nspawn.terminate()
        try:
            nspawn.wait(timeout=60)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait(timeout=30)
        log.close()
        root("tfo-agent", "cleanup", "-c", "/tmp/booted.yaml")


def test_upgrade_keeps_edited_config_then_purge_removes_everything(
    installed: tuple[Chroot, set[str]], newer_deb: Path
) -> None:
    root, before = installed
    conf = root.root / "etc/tfo-agent/config.yaml"
    edited = conf.read_text().replace('listen_address: "0.0.0.0:9435"', 'listen_address: "127.0.0.1:9999"')
    assert edited != conf.read_text()
    conf.write_text("# edited by the operator\n" + edited)
    root.install(newer_deb)
    # (the code is the same: only the package version differs, as dpkg sees it)
    assert root("dpkg-query", "-W", "-f=${Version}", "tfo-agent") == f"{__version__}+pkgtest1-1"
    assert root("tfo-agent", "config", "validate", "/etc/tfo-agent/config.yaml").strip().endswith(": valid")
    assert conf.read_text() == "# edited by the operator\n" + edited
    assert (root.root / "etc/systemd/system/multi-user.target.wants/tfo-agent.service").is_symlink()

    root.apt("purge", "tfo-agent", offline=True)
    assert "tfo-agent" not in root("dpkg-query", "-W", "-f=${Package}\n")
    # Everything the package brought, its conffile, bytecode, state and enablement are gone;
    # only the distro dependencies (installed before the snapshot) stay, as apt leaves them.
    assert root.snapshot() - before == set()
    assert not (root.root / "etc/tfo-agent").exists()
