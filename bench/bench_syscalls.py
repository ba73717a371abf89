"""Syscall overhead: 5,000,000 getppid untraced, under the agent, and under libbpf-tools ``syscount -L``.

The agent runs the syscall collector alone in its fast build and in the compat build (kernels
before 5.11, forced with TFO_AGENT_FORCE_VARIANT), and the default collectors with the network
collector in tp_btf and in its raw_tp/syscalls mode (kernels before 6.3). All arms are interleaved
round by round (one tracer at a time); the workload's own CPU time (user+sys from wait4) is
compared, median of the rounds. Then the agent idles at the default
scrape interval while Prometheus-style scrapes hit it, and its RSS and CPU use are read from /proc.

Run: .venv/bin/python -m bench.bench_syscalls [--rounds 5] [--calls 5000000] [--idle 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.c_program import compile_c
from tests.conftest import running_agent

WORKLOAD = r"""
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    return 0;
}
"""
SYSCALLS_ONLY = {"collect_syscalls": True}
DEFAULTS = {"collect_network": True, "collect_file_io": True, "collect_tcp_events": True}
# arm -> (collectors, environment of the agent)
AGENT_ARMS: dict[str, tuple[dict[str, bool], dict[str, str]]] = {
    "agent": (SYSCALLS_ONLY, {}),
    "agent compat": (SYSCALLS_ONLY, {"TFO_AGENT_FORCE_VARIANT": "compat"}),
    "defaults": (DEFAULTS, {}),
    "defaults net-sys": (DEFAULTS, {"TFO_AGENT_FORCE_ATTACH": "network=raw_tp/syscalls"}),
}


def cpu_seconds_of(cmd: list[str]) -> float:
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{cmd} failed with status {status}")
    return usage.ru_utime + usage.ru_stime


def start_syscount() -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["stdbuf", "-oL", "syscount", "-L"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "Tracing syscalls, ..." once attached
    if "Tracing" not in line:
        raise RuntimeError(f"syscount did not start: {line}")
    return proc


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return cpu, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5_000_000)
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of idle measurement")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tfo-bench-"))
    exe = compile_c(work, "getppid_loop", WORKLOAD)
    cmd = [str(exe), str(args.calls)]

    times: dict[str, list[float]] = {"untraced": [], **{arm: [] for arm in AGENT_ARMS}, "syscount -L": []}
    for r in range(args.rounds):
        times["untraced"].append(cpu_seconds_of(cmd))
        for arm, (collectors, env) in AGENT_ARMS.items():
            saved = dict(os.environ)
            os.environ.update(env)
            try:
                with running_agent(collectors, work):
                    times[arm].append(cpu_seconds_of(cmd))
            finally:
                os.environ.clear()
                os.environ.update(saved)
        sc = start_syscount()
        try:
            times["syscount -L"].append(cpu_seconds_of(cmd))
        finally:
            sc.terminate()
            sc.wait(30)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    per_call = {k: v / args.calls * 1e9 for k, v in med.items()}
    added = {k: per_call[k] - per_call["untraced"] for k in times if k != "untraced"}
    print(f"\nmedian CPU time of {args.calls:,} getppid over {args.rounds} interleaved rounds:")
    for k in times:
        print(f"  {k:18} {med[k]:.3f} s  = {per_call[k]:.0f} ns/call")
    for k, ns in added.items():
        print(f"  added by {k + ':':22} {ns:.0f} ns/syscall")
    print(f"  ratio agent/syscount:          {added['agent'] / added['syscount -L']:.2f}")
    print(f"  ratio compat/fast build:       {added['agent compat'] / added['agent']:.2f}")
    print(f"  ratio net-sys/tp_btf defaults: {added['defaults net-sys'] / added['defaults']:.2f}")

    with running_agent(DEFAULTS, work) as agent:  # the seed's default collectors
        assert agent is not None and agent.proc is not None
        time.sleep(5)
        cpu0, _ = proc_stat(agent.proc.pid)
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.idle:
            agent.scrape_text()
            time.sleep(15)
        cpu1, rss = proc_stat(agent.proc.pid)
        elapsed = time.monotonic() - t0
    print(f"\nagent idle for {elapsed:.0f} s, scraped every 15 s (the seed's default collectors):")
    print(f"  RSS {rss / 2**20:.1f} MiB, CPU {100 * (cpu1 - cpu0) / elapsed:.2f}% of one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
