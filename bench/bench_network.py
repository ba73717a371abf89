"""Loopback TCP cost of the agent: bulk throughput (64 KiB and 1 KiB writes) and connection rate.

Configurations, interleaved round by round (one agent at a time, started before and stopped after
each configuration's workloads): untraced; empty programs on the syscall hooks (the floor of any
syscall-wide collector, ``bench/syscall_floor.py``); the network + tcp_events collectors alone; the seed's
default collectors (syscalls, network, file I/O, tcp events); the defaults plus scheduler and
memory. Each workload is a C sender and receiver on 127.0.0.1 running for a fixed time, both
pinned to one CPU (``--cpu``, the last by default): where the two ends land moves loopback
throughput by ±6% between identical runs, pinned by ±1.5%. The figure is the median over the
rounds; the loss is the median over rounds of the change against the same round's untraced run
(paired, so that drift in the host's load cancels), both per wall-clock second (throughput) and
per CPU second the workload's processes used (throughput at equal CPU: robust when other work
shares the machine; softirq work on loopback is charged to them).

Run: .venv/bin/python -m bench.bench_network [--rounds 5] [--seconds 3] [--cpu N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from bench.bpf_stats import bpf_stats, program_costs
from bench.c_program import compile_c
from bench.syscall_floor import FLOOR, configured
from tests.conftest import running_agent

WORKLOAD = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int listener(struct sockaddr_in *addr) {
    socklen_t len = sizeof(*addr);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    addr->sin_family = AF_INET;
    addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr->sin_port = 0;
    if (bind(s, (struct sockaddr *)addr, sizeof(*addr)) || listen(s, 4096) ||
        getsockname(s, (struct sockaddr *)addr, &len))
        exit(2);
    return s;
}

static int dial(struct sockaddr_in *addr) {
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)addr, sizeof(*addr)))
        exit(3);
    return c;
}

/* bulk <msg bytes> <seconds>: bytes per second from a sender to a receiving child. */
static void bulk(long msg, double secs) {
    static char buf[1 << 18];
    struct sockaddr_in addr;
    int l = listener(&addr);
    long long total = 0;
    pid_t pid = fork();
    if (pid == 0) {
        int c = accept(l, NULL, NULL);
        while (read(c, buf, sizeof(buf)) > 0)
            ;
        _exit(0);
    }
    int c = dial(&addr);
    double t0 = now(), t = t0;
    while (t - t0 < secs) {
        for (int i = 0; i < 64; i++) {
            ssize_t n = write(c, buf, msg);
            if (n <= 0)
                exit(4);
            total += n;
        }
        t = now();
    }
    close(c);
    waitpid(pid, NULL, 0);
    printf("%.0f %lld\n", total / (t - t0), total);
}

/* crr <seconds>: connect, 1-byte request, 1-byte response, close; connections per second.
 * The client aborts (SO_LINGER 0) so that TIME-WAIT does not exhaust the ephemeral ports. */
static void crr(double secs) {
    struct sockaddr_in addr;
    struct linger lg = {1, 0};
    char b = 0;
    long n = 0;
    int l = listener(&addr);
    pid_t pid = fork();
    if (pid == 0) {
        for (;;) {
            int c = accept(l, NULL, NULL);
            if (read(c, &b, 1) == 1)
                write(c, &b, 1);
            close(c);
        }
    }
    double t0 = now(), t = t0;
    while (t - t0 < secs) {
        int c = dial(&addr);
        if (write(c, &b, 1) != 1 || read(c, &b, 1) != 1)
            exit(5);
        setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        close(c);
        n++;
        t = now();
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    printf("%.0f %ld\n", n / (t - t0), n);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc == 4 && !strcmp(argv[1], "bulk"))
        bulk(atol(argv[2]), atof(argv[3]));
    else if (argc == 3 && !strcmp(argv[1], "crr"))
        crr(atof(argv[2]));
    else
        return 1;
    return 0;
}
"""

DEFAULTS = {"collect_syscalls": True, "collect_network": True, "collect_file_io": True, "collect_tcp_events": True}
CONFIGS: dict[str, Optional[dict[str, Any]]] = {
    "untraced": None,
    FLOOR: None,
    "network+tcp_events": {"collect_syscalls": False, "collect_network": True, "collect_tcp_events": True},
    "defaults": DEFAULTS,
    "defaults+sched+mem": {**DEFAULTS, "collect_scheduler": True, "collect_memory": True},
}
WORKLOADS = {
    "bulk 64 KiB writes (MB/s)": ("bulk", "65536"),
    "bulk 1 KiB writes (MB/s)": ("bulk", "1024"),
    "connect/request/close (conn/s)": ("crr",),
}


def run_workloads(exe: Path, seconds: float, cpu: Optional[int]) -> dict[str, tuple[float, float]]:
    """Workload -> (rate per wall second, rate per CPU second of the workload's processes); both
    ends run on ``cpu`` when given (placement on one or two cores moves loopback throughput by
    ±6% between identical runs, pinned by ±1.5%)."""
    out = {}
    pin = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
    for name, args in WORKLOADS.items():
        proc = subprocess.Popen([str(exe), *args, str(seconds)], stdout=subprocess.PIPE, text=True, preexec_fn=pin)
        _, status, usage = os.wait4(proc.pid, 0)
        assert proc.stdout is not None
        if status != 0:
            raise RuntimeError(f"{proc.args} failed with status {status}")
        rate, units = (float(v) for v in proc.stdout.read().split())
        scale = 1e6 if args[0] == "bulk" else 1.0
        out[name] = (rate / scale, units / (usage.ru_utime + usage.ru_stime) / scale)
    return out


def measure_programs(
    exe: Path, work: Path, seconds: float, config: str, cpu: Optional[int]
) -> dict[str, tuple[int, int]]:
    """Program name -> (runs, ns) over one run of the workloads under ``config``."""
    with running_agent(CONFIGS[config], work) as agent:
        assert agent is not None and agent.proc is not None
        with bpf_stats():
            run_workloads(exe, seconds, cpu)
        return program_costs(agent.proc.pid)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of each workload run")
    ap.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1, help="CPU both ends run on; -1: not pinned")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="untraced is always run")
    args = ap.parse_args()
    pin_cpu = None if args.cpu < 0 else args.cpu
    configs = {c: e for c, e in CONFIGS.items() if c == "untraced" or c in args.configs}
    work = Path(tempfile.mkdtemp(prefix="tfo-bench-net-"))
    exe = compile_c(work, "tcpbench", WORKLOAD)

    wall: dict[str, dict[str, list[float]]] = {c: {w: [] for w in WORKLOADS} for c in configs}
    cpu: dict[str, dict[str, list[float]]] = {c: {w: [] for w in WORKLOADS} for c in configs}
    for r in range(args.rounds):
        for config, ebpf in configs.items():
            with configured(config, ebpf, work):
                for w, (per_wall, per_cpu) in run_workloads(exe, args.seconds, pin_cpu).items():
                    wall[config][w].append(per_wall)
                    cpu[config][w].append(per_cpu)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    where = "not pinned" if pin_cpu is None else f"both ends on CPU {pin_cpu}"
    load = os.getloadavg()[0]
    print(f"\nmedian of {args.rounds} interleaved rounds, {args.seconds:g} s per run, {where}, load {load:.1f}:")
    for title, results in (("per wall-clock second", wall), ("per CPU second of the workload", cpu)):
        base = results["untraced"]
        print(f"\n{title}:\n")
        print(f"| configuration | {' | '.join(WORKLOADS)} |")
        print(f"|---|{'---|' * len(WORKLOADS)}")
        for config in configs:
            cells = []
            for w in WORKLOADS:
                med = statistics.median(results[config][w])
                paired = (100 * (1 - v / b) for v, b in zip(results[config][w], base[w]))
                loss = "" if config == "untraced" else f" ({statistics.median(paired):+.1f}%)"
                cells.append(f"{med:,.0f}{loss}")
            print(f"| {config} | {' | '.join(cells)} |")

    for config in configs:
        if CONFIGS[config] is None:
            continue
        print(f"\n{config}: programs during one run of the workloads (kernel.bpf_stats_enabled):\n")
        print("| program | runs | ns per run | ms in total |\n|---|---|---|---|")
        costs = measure_programs(exe, work, args.seconds, config, pin_cpu)
        for name, (runs, ns) in sorted(costs.items(), key=lambda kv: -kv[1][1]):
            print(f"| {name} | {runs:,} | {ns / runs:.0f} | {ns / 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
