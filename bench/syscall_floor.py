"""The floor under any syscall-wide collector: sys_enter/sys_exit programs that return at once.

Attaching anything to the raw_syscalls tracepoints sends every syscall of every task through the
kernel's traced syscall path and runs a program on entry and exit; these programs do nothing else,
so a workload's loss under them is what no syscall collector on these hooks can go below. The
benchmarks run this configuration next to the agent's in the same rounds. The object is built
here with clang (benchmarks only: the agent never compiles at run time).
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from agent.libbpf import BpfObject
from tests.conftest import BPF_DIR, Agent, running_agent

FLOOR = "empty syscall hooks (floor)"
SOURCE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
SEC("raw_tp/sys_enter") int floor_sys_enter(void *ctx) { return 0; }
SEC("raw_tp/sys_exit") int floor_sys_exit(void *ctx) { return 0; }
"""
_ARCH = {"x86_64": "x86", "aarch64": "arm64"}


@contextlib.contextmanager
def empty_syscall_hooks(workdir: Path) -> Iterator[Optional[Agent]]:
    """The two empty programs attached for the block."""
    src, out = workdir / "floor.bpf.c", workdir / "floor.bpf.o"
    if not out.exists():
        src.write_text(SOURCE)
        arch = _ARCH.get(platform.machine(), platform.machine())
        flags = ["-O2", "-target", "bpf", f"-D__TARGET_ARCH_{arch}", f"-I{BPF_DIR}"]
        subprocess.run(["clang", *flags, "-c", str(src), "-o", str(out)], check=True)
    obj = BpfObject(str(out))
    try:
        obj.load()
        links = [obj.attach(p) for p in obj.program_names]
        try:
            yield None
        finally:
            for link in links:
                link.destroy()
    finally:
        obj.close()


def configured(
    config: str, ebpf: Optional[dict[str, Any]], workdir: Path
) -> contextlib.AbstractContextManager[Optional[Agent]]:
    """The block runs under ``config``: the floor's empty hooks, an agent, or nothing (``ebpf`` None)."""
    return empty_syscall_hooks(workdir) if config == FLOOR else running_agent(ebpf, workdir)
