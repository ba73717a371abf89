"""File I/O cost of the agent: small-file throughput, cached 4 KiB reads, and ns added per syscall.

Configurations, interleaved round by round (one agent at a time, started before and stopped after
each configuration's workloads): untraced; empty programs on the syscall hooks (the floor of any
syscall-wide collector, ``bench/syscall_floor.py``); the file_io collector alone; the seed's default
collectors (syscalls, network, file I/O, tcp events); the defaults plus scheduler and memory.
Workloads (C, fixed duration, files on tmpfs so that the syscall path is what is measured):
small files (create + write 4 KiB + close, then open + read 4 KiB + close, over 256 files),
4 KiB pread64 of a cached file, and a getppid loop (a syscall the file collector must skip cheaply).
Rates are per CPU-second of the workload (user + system time), not per wall-clock second, so that
other load on the host does not pass for overhead. Other BPF programs on the syscall path (another
agent, a tracer) would burden every configuration, the untraced one included: before each
configuration the bench waits until no such program is loaded, and says how often it had to give
up. Each configuration is compared with the untraced run of the same round (paired, so that drift
in the host's load cancels) and the figure is the median over the rounds; a second untraced run
per round, compared the same way, shows the noise floor. Last, one run of the workloads under the
defaults plus scheduler and memory with ``kernel.bpf_stats_enabled`` switched on (and back to its
previous value) gives each BPF program's cost per run.

Run: .venv/bin/python -m bench.bench_file_io [--rounds 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from bench.bpf_stats import bpf_stats, program_costs
from bench.c_program import compile_c
from bench.syscall_floor import FLOOR, configured
from tests.conftest import running_agent

WORKLOAD = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define FILES 256
static char buf[4096];

/* The workload's own CPU time (user + system): figures are per CPU-second, so that other load on
 * the host changes how long a run takes, not what it measures. */
static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* small <dir> <seconds>: files written and read back per second */
static double small(const char *dir, double secs) {
    char path[4096];
    long n = 0;
    double t0 = now(), t = t0;
    while (t - t0 < secs) {
        for (int i = 0; i < FILES; i++, n++) {
            snprintf(path, sizeof path, "%s/f%d", dir, i);
            int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0600);
            if (fd < 0 || write(fd, buf, sizeof buf) != sizeof buf) exit(2);
            close(fd);
            fd = open(path, O_RDONLY);
            if (fd < 0 || read(fd, buf, sizeof buf) != sizeof buf) exit(3);
            close(fd);
        }
        t = now();
    }
    return n / (t - t0);
}

/* pread <dir> <seconds>: MB/s of 4 KiB preads over a cached 1 MiB file */
static double cached_pread(const char *dir, double secs) {
    char path[4096];
    long long bytes = 0;
    snprintf(path, sizeof path, "%s/cached", dir);
    int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0600);
    for (int i = 0; i < 256; i++) if (write(fd, buf, sizeof buf) != sizeof buf) exit(4);
    double t0 = now(), t = t0;
    while (t - t0 < secs) {
        for (int i = 0; i < 4096; i++) bytes += pread(fd, buf, sizeof buf, (i & 255) * 4096L);
        t = now();
    }
    close(fd);
    return bytes / (t - t0) / 1e6;
}

/* getppid <seconds>: ns per call */
static double getppid_ns(double secs) {
    long n = 0;
    double t0 = now(), t = t0;
    while (t - t0 < secs) {
        for (int i = 0; i < 100000; i++) syscall(SYS_getppid);
        n += 100000;
        t = now();
    }
    return (t - t0) / n * 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) return 1;
    double secs = atof(argv[3]);
    if (!strcmp(argv[1], "small")) printf("%.1f\n", small(argv[2], secs));
    else if (!strcmp(argv[1], "pread")) printf("%.1f\n", cached_pread(argv[2], secs));
    else if (!strcmp(argv[1], "getppid")) printf("%.2f\n", getppid_ns(secs));
    else return 1;
    return 0;
}
"""

DEFAULTS = {"collect_syscalls": True, "collect_network": True, "collect_file_io": True, "collect_tcp_events": True}
CONFIGS: dict[str, Optional[dict[str, Any]]] = {
    "untraced": None,
    "untraced again (noise floor)": None,
    FLOOR: None,
    "file_io": {"collect_syscalls": False, "collect_file_io": True},
    "defaults": DEFAULTS,
    "defaults+sched+mem": {**DEFAULTS, "collect_scheduler": True, "collect_memory": True},
}
WORKLOADS = {  # name -> (mode, higher is better)
    "small files write+read (files/s)": ("small", True),
    "4 KiB cached pread (MB/s)": ("pread", True),
    "getppid (ns/call)": ("getppid", False),
}


SETTLE = 1.0  # seconds between start and workloads: collectors' start-up work is not the workload's


def foreign_syscall_hooks() -> list[str]:
    """Loaded BPF programs on the syscall tracepoints (none of ours is loaded when this is called)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return [p.get("name", "?") for p in json.loads(out) if "sys_e" in p.get("name", "")]


def wait_quiet(timeout: float = 300.0) -> bool:
    """Wait until no other program traces syscalls; False if one still does after ``timeout``."""
    deadline = time.monotonic() + timeout
    while foreign_syscall_hooks():
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def measure_programs(exe: Path, data: Path, work: Path, seconds: float) -> dict[str, tuple[int, int]]:
    """BPF program name -> (runs, ns) over one run of the workloads, all collectors on."""
    with running_agent(CONFIGS["defaults+sched+mem"], work) as agent:
        assert agent is not None and agent.proc is not None
        time.sleep(SETTLE)
        with bpf_stats():
            run_workloads(exe, data, seconds)
        return program_costs(agent.proc.pid)


def run_workloads(exe: Path, data: Path, seconds: float) -> dict[str, float]:
    out = {}
    for name, (mode, _) in WORKLOADS.items():
        res = subprocess.run(
            [str(exe), mode, str(data), str(seconds)], capture_output=True, text=True, check=True, timeout=60
        )
        out[name] = float(res.stdout)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--seconds", type=float, default=1.0, help="CPU seconds of each workload run")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tfo-bench-fio-"))
    # tmpfs when there is one: on ext4 two untraced runs in a row differed by 7-9% (writeback, journal)
    data = Path(tempfile.mkdtemp(prefix="tfo-bench-fio-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    exe = compile_c(work, "fiobench", WORKLOAD)

    try:
        results: dict[str, dict[str, list[float]]] = {c: {w: [] for w in WORKLOADS} for c in CONFIGS}
        noisy = 0
        for r in range(args.rounds):
            for config, ebpf in CONFIGS.items():
                noisy += not wait_quiet()
                with configured(config, ebpf, work):
                    time.sleep(SETTLE)
                    for w, v in run_workloads(exe, data, args.seconds).items():
                        results[config][w].append(v)
            print(f"round {r + 1}/{args.rounds} done", flush=True)

        costs = measure_programs(exe, data, work, args.seconds)
    finally:
        shutil.rmtree(data, ignore_errors=True)

    base = results["untraced"]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{args.rounds} interleaved rounds, {args.seconds:g} CPU-s per run; load average {load}")
    print(f"runs with another program on the syscall tracepoints: {noisy} of {args.rounds * len(CONFIGS)}")
    print("median; in brackets the median over rounds of the change against the same round's untraced run")
    print(f"| configuration | {' | '.join(WORKLOADS)} |")
    print(f"|---|{'---|' * len(WORKLOADS)}")
    for config in CONFIGS:
        cells = []
        for w, (_, higher_is_better) in WORKLOADS.items():
            runs, med = results[config][w], statistics.median(results[config][w])
            if config == "untraced":
                cells.append(f"{med:,.1f}")
            elif higher_is_better:
                loss = statistics.median(100 * (1 - v / b) for v, b in zip(runs, base[w]))
                cells.append(f"{med:,.1f} ({loss:+.1f}% loss)")
            else:
                added = statistics.median(v - b for v, b in zip(runs, base[w]))
                cells.append(f"{med:,.1f} ({added:+.1f} ns)")
        print(f"| {config} | {' | '.join(cells)} |")

    print("\nper BPF program, one run of the workloads, all collectors on (bpf_stats adds ~20-30 ns a run):")
    print("| program | runs | ns per run | ms in total |")
    print("|---|---|---|---|")
    for name, (runs, ns) in sorted(costs.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {runs:,} | {ns / runs:,.0f} | {ns / 1e6:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
