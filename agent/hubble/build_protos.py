"""Generate the Python protobuf/gRPC modules for the Hubble API subset.

Run at build time: ``python agent/hubble/build_protos.py`` (by path: it needs only grpcio-tools,
while ``-m`` would import the ``agent.hubble`` package, which builds on import when it must).
Writes ``agent/hubble/proto_gen/`` (git-ignored) from ``agent/hubble/protos/*/*.proto`` with
grpcio-tools, then rewrites the generated absolute imports (``from flow import flow_pb2``) into
package imports.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE / "protos"
OUT_DIR = HERE / "proto_gen"
PACKAGES = ("flow", "relay", "observer", "health")
_IMPORT_RE = re.compile(r"^from ({}) import ".format("|".join(PACKAGES)), re.MULTILINE)


def build(out_dir: Path = OUT_DIR) -> None:
    """Compile the protos into ``out_dir``; raises RuntimeError when protoc fails."""
    from grpc_tools import protoc  # build-time dependency only

    include = Path(protoc.__file__).resolve().parent / "_proto"
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sources = [str(p.relative_to(PROTO_DIR)) for p in sorted(PROTO_DIR.glob("*/*.proto"))]
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={tmp}", f"--grpc_python_out={tmp}"]
    if protoc.main([*args, *sources]) != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError("protoc failed on " + ", ".join(sources))
    pkg = "agent.hubble." + out_dir.name
    for py in tmp.rglob("*.py"):
        py.write_text(_IMPORT_RE.sub(rf"from {pkg}.\1 import ", py.read_text()))
    for d in [tmp, *(p for p in tmp.iterdir() if p.is_dir())]:
        (d / "__init__.py").touch()
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def outdated(out_dir: Path = OUT_DIR, missing_only: bool = False) -> bool:
    """True when a generated module is missing or (unless ``missing_only``) older than its .proto."""
    for proto in PROTO_DIR.glob("*/*.proto"):
        gen = out_dir / proto.parent.name / f"{proto.stem}_pb2.py"
        if not gen.exists() or (not missing_only and gen.stat().st_mtime < proto.stat().st_mtime):
            return True
    return False


def main() -> int:
    """Command-line entry: build and report."""
    try:
        build()
    except (ImportError, RuntimeError) as exc:
        print(f"build_protos: {exc}", file=sys.stderr)
        return 1
    print(f"generated {OUT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
