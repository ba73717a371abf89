"""The floor under the TLS part of collect_http: what one uprobe hit costs on this machine.

A C loop calls a two-instruction function; the agent's own uprobe programs (``up_ssl_read`` at the
entry, ``up_ssl_return`` at the return, loaded from ``syscalls.bpf.o`` with no collector on, so
they return at once) are attached to it in turn. The added time per call is the kernel's uprobe
path (breakpoint trap, single-step or emulation, return trampoline), not the programs' work.

Run: .venv/bin/python -m bench.uprobe_floor [--rounds 3] [--calls 20000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from agent.libbpf import BpfObject
from tests.conftest import BPF_DIR

LOOP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
__attribute__((noinline)) int target(int x) { __asm__ volatile("" ::: "memory"); return x + 1; }
int main(int argc, char **argv) {
    long n = atol(argv[1]); struct timespec a, b; int s = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) s += target(i);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return s == 7;
}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tfo-bench-uprobe-"))
    (work / "loop.c").write_text(LOOP)
    exe = str(work / "loop")
    subprocess.run(["gcc", "-O2", "-o", exe, str(work / "loop.c")], check=True)
    obj = BpfObject(str(BPF_DIR / "syscalls.bpf.o"))
    for p in obj.program_names:
        obj.set_autoload(p, p.startswith("up_"))
    obj.load()

    def ns_per_call() -> float:
        return float(subprocess.run([exe, str(args.calls)], capture_output=True, text=True, check=True).stdout)

    arms: dict[str, list[float]] = {"no uprobe": [], "entry uprobe": [], "entry + return uprobes": []}
    try:
        for _ in range(args.rounds):
            arms["no uprobe"].append(ns_per_call())
            links = [obj.attach_uprobe("up_ssl_read", exe, "target")]
            arms["entry uprobe"].append(ns_per_call())
            links.append(obj.attach_uprobe("up_ssl_return", exe, "target", retprobe=True))
            arms["entry + return uprobes"].append(ns_per_call())
            for link in links:
                link.destroy()
    finally:
        obj.close()
    print(f"median ns per call over {args.rounds} interleaved rounds of {args.calls:,} calls:")
    for arm, values in arms.items():
        print(f"  {arm:24} {statistics.median(values):,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
