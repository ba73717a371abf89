"""The C workloads of the benchmarks, built where they run."""

from __future__ import annotations

import subprocess
from pathlib import Path


def compile_c(work: Path, name: str, source: str) -> Path:
    """``source`` written to ``work/NAME.c`` and built (gcc -O2) into ``work/NAME``; its path."""
    (work / f"{name}.c").write_text(source)
    exe = work / name
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(work / f"{name}.c")], check=True)
    return exe
