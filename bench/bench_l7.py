"""What collect_http and collect_dns cost: nginx requests/s, a resolver's queries/s, and ns per getppid.

Configurations, interleaved round by round (one agent at a time, started before and stopped after
each configuration's workloads): the seed's default collectors (syscalls, network, file I/O, tcp
events), the defaults plus ``collect_http``, and the defaults plus ``collect_dns``. Workloads: wrk
against nginx (one worker, keep-alive, a 23-byte file) over plaintext and TLS; dnsperf against
unbound serving a local zone in a network namespace (port 53); a C loop of getppid (CPU time per
call: the path of every syscall that moves no socket data). Each figure is the median over the
rounds; each loss the median of the changes against the same round's defaults run (paired, so
that drift in the host's load cancels). Then one more run of every workload with both L7
collectors on and ``kernel.bpf_stats_enabled``, for the per-program cost.

Run: .venv/bin/python -m bench.bench_l7 [--rounds 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench_syscalls import WORKLOAD as GETPPID_LOOP
from bench.bench_syscalls import cpu_seconds_of
from bench.bpf_stats import bpf_stats, program_costs
from tests.conftest import running_agent
from tests.l7servers import ZONE, Nginx, Resolver, nginx, resolver

DEFAULTS = {"collect_network": True, "collect_file_io": True, "collect_tcp_events": True}
CONFIGS = {
    "defaults": DEFAULTS,
    "defaults+http": {**DEFAULTS, "collect_http": True},
    "defaults+dns": {**DEFAULTS, "collect_dns": True},
}
GETPPID_CALLS = 2_000_000
WORKLOADS = ("nginx plaintext (req/s)", "nginx TLS (req/s)", "unbound via dnsperf (q/s)", "getppid (ns/call)")


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


def run_workloads(srv: Nginx, res: Resolver, queries: Path, getppid: Path, seconds: float) -> dict[str, float]:
    return {
        WORKLOADS[0]: wrk(f"http://127.0.0.1:{srv.port}/index.html", seconds),
        WORKLOADS[1]: wrk(f"https://127.0.0.1:{srv.tls_port}/index.html", seconds),
        WORKLOADS[2]: dnsperf(res, queries, seconds),
        WORKLOADS[3]: cpu_seconds_of([str(getppid), str(GETPPID_CALLS)]) / GETPPID_CALLS * 1e9,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each wrk and dnsperf run")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tfo-bench-l7-"))
    (work / "getppid.c").write_text(GETPPID_LOOP)
    getppid = work / "getppid_loop"
    subprocess.run(["gcc", "-O2", "-o", str(getppid), str(work / "getppid.c")], check=True)
    queries = work / "queries.txt"
    queries.write_text("".join(f"a.{ZONE} {t}\n" for t in ("A", "AAAA", "MX", "TXT")) + f"nx.{ZONE} A\n")
    results: dict[str, dict[str, list[float]]] = {c: {w: [] for w in WORKLOADS} for c in CONFIGS}
    with nginx(work, "nginx") as srv, resolver(work) as res:
        for r in range(args.rounds):
            for config, ebpf in CONFIGS.items():
                with running_agent(ebpf, work):
                    for w, v in run_workloads(srv, res, queries, getppid, args.seconds).items():
                        results[config][w].append(v)
            print(f"round {r + 1}/{args.rounds}: load {os.getloadavg()[0]:.1f}", flush=True)
        report(results, args)
        with running_agent({**DEFAULTS, "collect_http": True, "collect_dns": True}, work) as agent:
            assert agent is not None and agent.proc is not None
            with bpf_stats():
                run_workloads(srv, res, queries, getppid, args.seconds)
            costs = program_costs(agent.proc.pid)
    print("\ndefaults+http+dns: programs during one run of the workloads (kernel.bpf_stats_enabled):\n")
    print("| program | runs | ns per run | ms in total |\n|---|---|---|---|")
    for name, (runs, ns) in sorted(costs.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {runs:,} | {ns / runs:.0f} | {ns / 1e6:.0f} |")
    return 0


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    base = results["defaults"]
    print(f"\nmedian of {args.rounds} interleaved rounds, {args.seconds:g} s per run, load {os.getloadavg()[0]:.1f}:\n")
    print(f"| configuration | {' | '.join(WORKLOADS)} |\n|---|{'---|' * len(WORKLOADS)}")
    for config in CONFIGS:
        cells = []
        for w in WORKLOADS:
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


if __name__ == "__main__":
    sys.exit(main())
