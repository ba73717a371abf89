"""Generate the Python protobuf/gRPC modules of the project's API subsets.

Run at build time: ``python agent/hubble/build_protos.py`` (by path: it needs only grpcio-tools,
while ``-m`` would import the ``agent.hubble`` package, which builds on import when it must).
Each ``Tree`` is one API subset: ``PROTOS/<package>/*.proto`` compiled with grpcio-tools into the
git-ignored package ``OUT`` (the Hubble API into ``agent/hubble/proto_gen/``, the container
runtime's CRI into ``agent/cri/proto_gen/``), with the generated absolute imports
(``from flow import flow_pb2``) rewritten into package imports.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
AGENT = HERE.parent


class Tree(NamedTuple):
    """One API subset: where its .proto files are, where the modules go, their proto packages."""

    protos: Path
    out: Path
    packages: tuple[str, ...]


HUBBLE = Tree(HERE / "protos", HERE / "proto_gen", ("flow", "relay", "observer", "health"))
CRI = Tree(AGENT / "cri" / "protos", AGENT / "cri" / "proto_gen", ("runtime",))
TREES = (HUBBLE, CRI)
PROTO_DIR, OUT_DIR, PACKAGES = HUBBLE


def build(out_dir: Path = OUT_DIR, tree: Tree = HUBBLE) -> None:
    """Compile ``tree``'s protos into ``out_dir``; raises RuntimeError when protoc fails."""
    from grpc_tools import protoc  # build-time dependency only

    include = Path(protoc.__file__).resolve().parent / "_proto"
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sources = [str(p.relative_to(tree.protos)) for p in sorted(tree.protos.glob("*/*.proto"))]
    args = ["protoc", f"-I{tree.protos}", f"-I{include}", f"--python_out={tmp}", f"--grpc_python_out={tmp}"]
    if protoc.main([*args, *sources]) != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError("protoc failed on " + ", ".join(sources))
    pkg = ".".join(("agent", tree.out.parent.name, out_dir.name))
    import_re = re.compile(r"^from ({}) import ".format("|".join(tree.packages)), re.MULTILINE)
    for py in tmp.rglob("*.py"):
        py.write_text(import_re.sub(rf"from {pkg}.\1 import ", py.read_text()))
    for d in [tmp, *(p for p in tmp.iterdir() if p.is_dir())]:
        (d / "__init__.py").touch()
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def build_all() -> None:
    """Every tree into its own package (make protos, the package build)."""
    for tree in TREES:
        build(tree.out, tree)


def outdated(out_dir: Path = OUT_DIR, missing_only: bool = False, tree: Tree = HUBBLE) -> bool:
    """True when a generated module is missing or (unless ``missing_only``) older than its .proto."""
    for proto in tree.protos.glob("*/*.proto"):
        gen = out_dir / proto.parent.name / f"{proto.stem}_pb2.py"
        if not gen.exists() or (not missing_only and gen.stat().st_mtime < proto.stat().st_mtime):
            return True
    return False


def main() -> int:
    """Command-line entry: build and report."""
    try:
        build_all()
    except (ImportError, RuntimeError) as exc:
        print(f"build_protos: {exc}", file=sys.stderr)
        return 1
    print("generated " + ", ".join(str(t.out) for t in TREES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
