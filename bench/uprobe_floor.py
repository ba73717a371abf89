"""The floor under the TLS part of collect_http: what one uprobe hit costs on this machine.

A C loop calls a short function; the agent's own uprobe programs (``up_ssl_read`` at the entry,
``up_ssl_return`` at the return, loaded from ``syscalls.bpf.o`` with no collector on, so they return
at once) are attached to it in turn. The added time per call is the kernel's uprobe path (breakpoint
trap, single-step or emulation of the probed instruction, return trampoline), not the programs' work.
Two functions: one that starts like OpenSSL 3.0's exported SSL_read (``sub $0x18,%rsp``, which the
kernel single-steps) and one that starts like the internal function the agent probes instead
(``push %r13``, which the kernel emulates).

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
from bench.c_program import compile_c
from tests.conftest import BPF_DIR

LOOP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
__attribute__((naked, noinline)) int sub_first(int x)
{ __asm__ volatile("sub $0x18,%rsp\n add $0x18,%rsp\n lea 1(%rdi),%eax\n ret"); }
__attribute__((naked, noinline)) int push_first(int x)
{ __asm__ volatile("push %r13\n pop %r13\n lea 1(%rdi),%eax\n ret"); }
int main(int argc, char **argv) {
    long n = atol(argv[1]); struct timespec a, b; int s = 0;
    int (*f)(int) = strcmp(argv[2], "push_first") ? sub_first : push_first;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) s += f(i);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return s == 7;
}
"""
FUNCTIONS = {"sub_first": "sub $0x18,%rsp first (SSL_read)", "push_first": "push %r13 first (ssl_read_internal)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tfo-bench-uprobe-"))
    exe = str(compile_c(work, "loop", LOOP))
    obj = BpfObject(str(BPF_DIR / "syscalls.bpf.o"))
    for p in obj.program_names:
        obj.set_autoload(p, p.startswith("up_"))
    obj.load()

    def ns_per_call(func: str) -> float:
        return float(subprocess.run([exe, str(args.calls), func], capture_output=True, text=True, check=True).stdout)

    arms: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for func, shape in FUNCTIONS.items():
                arms.setdefault(f"{shape}: no uprobe", []).append(ns_per_call(func))
                links = [obj.attach_uprobe("up_ssl_read", exe, func)]
                arms.setdefault(f"{shape}: entry", []).append(ns_per_call(func))
                links.append(obj.attach_uprobe("up_ssl_return", exe, func, retprobe=True))
                arms.setdefault(f"{shape}: entry + return", []).append(ns_per_call(func))
                for link in links:
                    link.destroy()
    finally:
        obj.close()
    print(f"median ns per call over {args.rounds} interleaved rounds of {args.calls:,} calls:")
    for arm, values in arms.items():
        print(f"  {arm:58} {statistics.median(values):>9,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
