"""What collect_http and collect_dns cost: nginx requests/s, a resolver's queries/s, and ns per getppid.

Configurations, interleaved round by round (one agent at a time, started before and stopped after
each configuration's workloads): the seed's default collectors (syscalls, network, file I/O, tcp
events), the defaults plus ``collect_http``, and the defaults plus ``collect_dns``. Workloads: wrk
against nginx (one worker, keep-alive, a 23-byte file) over plaintext and TLS; dnsperf against
unbound serving a local zone in a network namespace (port 53), and a Python loop of
``getaddrinfo`` against it (glibc's resolver: the issue's other resolver load); a C loop of
getppid (CPU time per call: the path of every syscall that moves no socket data).

Each figure is the median over the rounds; each loss the median of the changes against the same
round's defaults run (paired, so that drift in the host's load cancels). Each round starts with the
next configuration: on this VM an A/A run (the same configuration twice) gave the second run 10%
fewer dnsperf queries/s. The rates swing by 10-20% from run to run here, so each workload also
reports the CPU its client and server spent per request, query or lookup (the agent's programs run
in their context): the steadier measure of what a collector adds. Then one more run of the
workloads per configuration with ``kernel.bpf_stats_enabled``, for the per-program cost. With
``collect_http``, twice: TLS probed where the agent probes it (OpenSSL 3.0's internal functions),
and forced onto the exported SSL_read/SSL_write (other OpenSSL builds).

Run: .venv/bin/python -m bench.bench_l7 [--rounds 5] [--seconds 5] [--only http|dns]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from agent.collectors import FORCE_ATTACH_ENV
from bench.bench_syscalls import WORKLOAD as GETPPID_LOOP
from bench.bench_syscalls import cpu_seconds_of
from bench.bpf_stats import bpf_stats, program_costs
from bench.c_program import compile_c
from tests.conftest import running_agent
from tests.l7servers import ZONE, Nginx, Resolver, nginx, resolver

DEFAULTS = {"collect_network": True, "collect_file_io": True, "collect_tcp_events": True}
CONFIGS = {
    "defaults": DEFAULTS,
    "defaults+http": {**DEFAULTS, "collect_http": True},
    "defaults+http, TLS at SSL_read/SSL_write": {**DEFAULTS, "collect_http": True},
    "defaults+dns": {**DEFAULTS, "collect_dns": True},
}
# The environment of a configuration's agent: the TLS uprobes forced onto the exported functions
# (the placement for OpenSSL builds whose internal functions are not found; agent/collectors/tls.py).
CONFIG_ENV = {"defaults+http, TLS at SSL_read/SSL_write": {FORCE_ATTACH_ENV: "tls=exported"}}
GETPPID_CALLS = 2_000_000
WORKLOADS = (
    "nginx plaintext (req/s)",
    "nginx TLS (req/s)",
    "unbound via dnsperf (q/s)",
    "getppid (ns/call)",
    "unbound via a Python getaddrinfo loop (lookups/s)",
)
# One process resolving a.ZONE with glibc (an A and an AAAA query per lookup, sent with sendmmsg)
# for argv[1] seconds; prints lookups per second.
LOOKUP_LOOP = """
import socket, sys, time
end = time.monotonic() + float(sys.argv[1])
n = 0
while time.monotonic() < end:
    socket.getaddrinfo(sys.argv[2], 80, type=socket.SOCK_STREAM)
    n += 1
print(n / float(sys.argv[1]))
"""


def children_cpu() -> float:
    """CPU seconds of this process's children waited for so far (the clients: wrk, dnsperf, python)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` (all threads) and its child processes (nginx's worker)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    pids = [pid, *map(int, children)]
    total = 0
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measured(server_pid: int, run: Callable[[], float], seconds: float) -> tuple[float, tuple[float, float]]:
    """The rate ``run`` reports, and the CPU microseconds (client, server) spent per unit of it."""
    client, server = children_cpu(), tree_cpu(server_pid)
    rate = run()
    units = rate * seconds / 1e6
    return rate, ((children_cpu() - client) / units, (tree_cpu(server_pid) - server) / units)


def wrk(url: str, seconds: float) -> float:
    out = subprocess.run(
        ["wrk", "-t1", "-c4", f"-d{seconds:g}s", url], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk said: {out}")
    return float(m.group(1))


def dnsperf(res: Resolver, queries: Path, seconds: float) -> float:
    out = res.run("dnsperf", "-s", "127.0.0.1", "-d", str(queries), "-l", f"{seconds:g}", "-c", "1", "-q", "20")
    m = re.search(r"Queries per second:\s+([\d.]+)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"dnsperf said: {out.stdout}{out.stderr}")
    return float(m.group(1))


def lookups(res: Resolver, seconds: float) -> float:
    out = res.run(sys.executable, "-c", LOOKUP_LOOP, f"{seconds:g}", f"a.{ZONE}")
    if out.returncode != 0:
        raise RuntimeError(f"the getaddrinfo loop said: {out.stdout}{out.stderr}")
    return float(out.stdout)


def rate_runs(
    srv: Nginx, res: Resolver, queries: Path, seconds: float, only: str = ""
) -> dict[str, tuple[int, Callable[[], float]]]:
    """The rate workloads ``only`` selects (all by default): each its server's pid and a run that
    returns its rate."""
    runs: dict[str, tuple[int, Callable[[], float]]] = {}
    if only != "dns":
        nginx_pid = int((srv.dir / "nginx.pid").read_text())
        runs[WORKLOADS[0]] = (nginx_pid, lambda: wrk(f"http://127.0.0.1:{srv.port}/index.html", seconds))
        runs[WORKLOADS[1]] = (nginx_pid, lambda: wrk(f"https://127.0.0.1:{srv.tls_port}/index.html", seconds))
    if only != "http":
        unbound_pid = int((res.dir / "unbound.pid").read_text())
        runs[WORKLOADS[2]] = (unbound_pid, lambda: dnsperf(res, queries, seconds))
        runs[WORKLOADS[4]] = (unbound_pid, lambda: lookups(res, seconds))
    return runs


def run_workloads(
    srv: Nginx, res: Resolver, queries: Path, getppid: Path, seconds: float, only: str = ""
) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Each workload's figure (a rate; ns per getppid), and the CPU per request/query/lookup of the
    rate workloads (client, server; by the kernel's accounting)."""
    out = {WORKLOADS[3]: cpu_seconds_of([str(getppid), str(GETPPID_CALLS)]) / GETPPID_CALLS * 1e9}
    cpu: dict[str, tuple[float, float]] = {}
    for w, (pid, run) in rate_runs(srv, res, queries, seconds, only).items():
        out[w], cpu[w] = measured(pid, run, seconds)
    return out, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each wrk and dnsperf run")
    ap.add_argument("--only", choices=("http", "dns"), default="", help="one collector's arm and workloads")
    args = ap.parse_args()
    arms = ("defaults", f"defaults+{args.only}")
    configs = {c: e for c, e in CONFIGS.items() if not args.only or c == arms[0] or c.startswith(arms[1])}
    work = Path(tempfile.mkdtemp(prefix="tfo-bench-l7-"))
    getppid = compile_c(work, "getppid_loop", GETPPID_LOOP)
    queries = work / "queries.txt"
    queries.write_text("".join(f"a.{ZONE} {t}\n" for t in ("A", "AAAA", "MX", "TXT")) + f"nx.{ZONE} A\n")
    results: dict[str, dict[str, list[float]]] = {c: {w: [] for w in WORKLOADS} for c in configs}
    cpus: dict[str, dict[str, list[tuple[float, float]]]] = {c: {w: [] for w in WORKLOADS} for c in configs}
    order = list(configs)
    with nginx(work, "nginx") as srv, resolver(work) as res:
        for r in range(args.rounds):
            # each round starts with the next configuration: no arm always runs first
            for config in order[r % len(order) :] + order[: r % len(order)]:
                with config_env(config), running_agent(configs[config], work):
                    figures, cpu = run_workloads(srv, res, queries, getppid, args.seconds, args.only)
                for w, v in figures.items():
                    results[config][w].append(v)
                for w, v in cpu.items():
                    cpus[config][w].append(v)
            print(f"round {r + 1}/{args.rounds}: load {os.getloadavg()[0]:.1f}", flush=True)
        report(results, cpus, args)
        print(
            "\nBPF cost by workload (kernel.bpf_stats_enabled; one run each, after the rounds): all the agent's"
            " programs per request, query, lookup or call, then sys_exit and the uprobes per run:\n"
        )
        print(f"| configuration | {' | '.join(w.split(' (')[0] for w in WORKLOADS)} |\n|---|{'---|' * len(WORKLOADS)}")
        for config, ebpf in configs.items():
            with config_env(config), running_agent(ebpf, work) as agent:
                assert agent is not None and agent.proc is not None
                cells = [program_ns(agent.proc.pid, srv, res, queries, getppid, args, w) for w in WORKLOADS]
            print(f"| {config} | {' | '.join(cells)} |")
    return 0


@contextlib.contextmanager
def config_env(config: str) -> Iterator[None]:
    """The environment CONFIG_ENV gives ``config``'s agent, for the block."""
    saved = dict(os.environ)
    os.environ.update(CONFIG_ENV.get(config, {}))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def program_ns(
    pid: int, srv: Nginx, res: Resolver, queries: Path, getppid: Path, args: argparse.Namespace, workload: str
) -> str:
    """One run of ``workload`` with bpf_stats on: ns per run of tpbtf_sys_exit and of the uprobes,
    and every program of the agent together per unit of work (request, query, lookup, call)."""
    rates = rate_runs(srv, res, queries, args.seconds, args.only)
    if workload != WORKLOADS[3] and workload not in rates:
        return "-"
    before = program_costs(pid)
    with bpf_stats():
        if workload == WORKLOADS[3]:
            cpu_seconds_of([str(getppid), str(GETPPID_CALLS)])
            units = float(GETPPID_CALLS)
        else:
            units = rates[workload][1]() * args.seconds
        after = program_costs(pid)
    cells = []
    for name in ("tpbtf_sys_exit", "up_ssl_return", "up_ssl_read", "up_ssl_write", "up_ssl_read_ex", "up_ssl_write_ex"):
        runs, ns = (a - b for a, b in zip(after.get(name, (0, 0)), before.get(name, (0, 0))))
        if runs:
            cells.append(f"{name.removeprefix('tpbtf_')} {ns / runs:.0f} ns x {runs:,}")
    total = sum(a[1] - before.get(name, (0, 0))[1] for name, a in after.items())
    return f"all {total / units:,.0f} ns/unit: " + "; ".join(cells)


def report(
    results: dict[str, dict[str, list[float]]],
    cpus: dict[str, dict[str, list[tuple[float, float]]]],
    args: argparse.Namespace,
) -> None:
    base = results["defaults"]
    print(f"\nmedian of {args.rounds} interleaved rounds, {args.seconds:g} s per run, load {os.getloadavg()[0]:.1f}:\n")
    print(f"| configuration | {' | '.join(WORKLOADS)} |\n|---|{'---|' * len(WORKLOADS)}")
    for config in results:
        cells = []
        for w in WORKLOADS:
            if not results[config][w]:
                cells.append("-")
                continue
            med = statistics.median(results[config][w])
            if config == "defaults":
                cells.append(f"{med:,.0f}")
            elif w.startswith("getppid"):  # added ns per call
                cells.append(
                    f"{med:,.0f} ({statistics.median(v - b for v, b in zip(results[config][w], base[w])):+.1f} ns)"
                )
            else:  # loss in rate
                loss = statistics.median(100 * (1 - v / b) for v, b in zip(results[config][w], base[w]))
                cells.append(f"{med:,.0f} ({loss:+.1f}%)")
        print(f"| {config} | {' | '.join(cells)} |")
    rated = [w for w in WORKLOADS if any(cpus[c][w] for c in cpus)]
    for whose, part in (("client and server", sum), ("the server alone (nginx, unbound)", lambda cs: cs[1])):
        print(f"\nCPU of {whose} per request, query or lookup (us; median, and the median of the paired changes):\n")
        print(f"| configuration | {' | '.join(w.split(' (')[0] for w in rated)} |\n|---|{'---|' * len(rated)}")
        for config in cpus:
            cells = []
            for w in rated:
                values, base_values = [part(cs) for cs in cpus[config][w]], [part(cs) for cs in cpus["defaults"][w]]
                med = statistics.median(values)
                change = statistics.median(100 * (v / b - 1) for v, b in zip(values, base_values))
                cells.append(f"{med:,.1f}" if config == "defaults" else f"{med:,.1f} ({change:+.1f}%)")
            print(f"| {config} | {' | '.join(cells)} |")


if __name__ == "__main__":
    sys.exit(main())
