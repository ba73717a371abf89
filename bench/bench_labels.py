"""Container labels: what they cost per syscall, and a scrape with 200 containers.

1. Per syscall: 5,000,000 ``getppid`` untraced and under the agent (syscall collector alone) with
   ``labels: [comm]`` (the default: per-syscall array) and ``labels: [comm, namespace, pod,
   container]`` (counts per cgroup and syscall as well: a per-CPU cache slot, a hash behind it),
   fast and compat builds, arms
   interleaved round by round (one agent at a time); the workload's own CPU time (user+sys from
   wait4), median of the rounds. The workload runs on the host: the kernel keys any task by its
   cgroup the same way, in a container or not. Then, as CPU time under load is noisy at the scale
   of nanoseconds, the same arms again with ``kernel.bpf_stats_enabled`` (``--stats-rounds``): the
   kernel's own run time of the sys_enter and sys_exit programs per syscall, which the rest of the
   host does not blur (it adds its own 20-30 ns per program run, equally to every arm).
2. Scrape: a real containerd (``tests/conftest_cri.py``) runs ``--pods`` pods of one container each;
   the agent (syscalls and file I/O, ``max_comm_series`` 1000 so that every container keeps its own
   series) is scraped ``--scrapes`` times with labels off (the reference), then with labels on
   after every container made 1000 syscalls and wrote to a file: wall time of GET /metrics and the
   agent's own ``tfo_agent_scrape_duration_seconds``, median and max.

Run: .venv/bin/python -m bench.bench_labels [--rounds 7] [--stats-rounds 5] [--calls 5000000]
     [--pods 200] [--scrapes 20] [--max-series 1000] [--skip-syscalls] [--skip-scrape]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_syscalls import WORKLOAD, cpu_seconds_of
from bench.bpf_stats import bpf_stats, program_costs
from bench.c_program import compile_c
from tests.conftest import running_agent, wait_for
from tests.conftest_cri import Containerd, Cri, build_image

LABELS_ON = ["comm", "namespace", "pod", "container"]
ARMS: dict[str, tuple[list[str], str]] = {  # arm -> (labels, forced build)
    "labels off": (["comm"], ""),
    "labels on": (LABELS_ON, ""),
    "compat labels off": (["comm"], "compat"),
    "compat labels on": (LABELS_ON, "compat"),
}


def under_arm(arm: str, work: Path, cmd: list[str], stats: bool = False) -> float:
    """Run ``cmd`` under an agent of ``arm``: its CPU seconds, or with ``stats`` the BPF programs'
    ns per syscall (sys_enter + sys_exit run time over sys_exit runs)."""
    labels, variant = ARMS[arm]
    saved = dict(os.environ)
    if variant:
        os.environ["TFO_AGENT_FORCE_VARIANT"] = variant
    try:
        ebpf = {"collect_syscalls": True, "labels": labels, "container_runtime_endpoint": "/nonexistent.sock"}
        with running_agent(ebpf, work) as agent:
            assert agent is not None and agent.proc is not None
            if not stats:
                return cpu_seconds_of(cmd)
            with bpf_stats():
                before = program_costs(agent.proc.pid)
                cpu_seconds_of(cmd)
                after = program_costs(agent.proc.pid)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    delta = {k: (after[k][0] - before.get(k, (0, 0))[0], after[k][1] - before.get(k, (0, 0))[1]) for k in after}
    enter = sum(ns for k, (_, ns) in delta.items() if k.endswith("sys_enter"))
    exits = [(runs, ns) for k, (runs, ns) in delta.items() if k.endswith("sys_exit")]
    return (enter + sum(ns for _, ns in exits)) / max(1, sum(runs for runs, _ in exits))


def syscall_cost(work: Path, rounds: int, calls: int, stats_rounds: int) -> None:
    exe = compile_c(work, "getppid_loop", WORKLOAD)
    cmd = [str(exe), str(calls)]
    times: dict[str, list[float]] = {"untraced": [], **{arm: [] for arm in ARMS}}
    for r in range(rounds):
        times["untraced"].append(cpu_seconds_of(cmd))
        for arm in ARMS:
            times[arm].append(under_arm(arm, work, cmd))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    if rounds:
        per_call = {k: statistics.median(v) / calls * 1e9 for k, v in times.items()}
        print(f"\nmedian CPU time per getppid over {rounds} interleaved rounds ({calls:,} calls each):")
        for k, ns in per_call.items():
            spread = f"{min(times[k]) / calls * 1e9:.0f}-{max(times[k]) / calls * 1e9:.0f}"
            added = "" if k == "untraced" else f", added {ns - per_call['untraced']:.0f} ns"
            print(f"  {k:18} {ns:.0f} ns/call (rounds {spread}){added}")
        for build, prefix in (("fast", ""), ("compat", "compat ")):
            on_off = per_call[f"{prefix}labels on"] - per_call[f"{prefix}labels off"]
            print(f"  labels on - off, {build} build: {on_off:+.1f} ns/syscall")
    prog: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in range(stats_rounds):
        for arm in ARMS:
            prog[arm].append(under_arm(arm, work, cmd, stats=True))
        print(f"stats round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} ns" for k, v in prog.items()), flush=True)
    if stats_rounds:
        med = {k: statistics.median(v) for k, v in prog.items()}
        print("\nBPF run time per syscall (sys_enter + sys_exit, kernel.bpf_stats_enabled), median:")
        for k, ns in med.items():
            print(f"  {k:18} {ns:.1f} ns (rounds {min(prog[k]):.1f}-{max(prog[k]):.1f})")
        for build, prefix in (("fast", ""), ("compat", "compat ")):
            on_off = med[f"{prefix}labels on"] - med[f"{prefix}labels off"]
            print(f"  labels on - off, {build} build: {on_off:+.1f} ns/syscall")


def scrape_times(agent: Any, scrapes: int) -> tuple[list[float], list[float], int]:
    """(wall seconds per scrape, the agent's own scrape durations, series in the last scrape)."""
    wall, own = [], []
    text = ""
    for _ in range(scrapes):
        t0 = time.perf_counter()
        text = agent.scrape_text()
        wall.append(time.perf_counter() - t0)
        for line in text.splitlines():
            if line.startswith("tfo_agent_scrape_duration_seconds "):
                own.append(float(line.split()[1]))
        time.sleep(0.2)
    return wall, own[1:], sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def scrape_with_pods(work: Path, npods: int, scrapes: int, max_series: int) -> None:
    ctd = Containerd(Path(f"/run/tfo-bench-ctd-{os.getpid()}"), build_image(work / "image.tar", work))
    ctd.start()
    cri = Cri(ctd, work / "pods")
    try:
        t0 = time.monotonic()
        pods = [cri.run_pod(f"web-{i}", f"ns-{i % 10}", {"app": (1000, 4096)}) for i in range(npods)]
        print(f"\n{npods} pods started in {time.monotonic() - t0:.0f} s", flush=True)
        for labels in (["comm"], LABELS_ON):  # the reference first: the containers work under the labelled agent
            ebpf = {
                "collect_syscalls": True,
                "collect_file_io": True,
                "labels": labels,
                "container_runtime_endpoint": ctd.socket,
                "max_comm_series": max_series,
            }
            with running_agent(ebpf, work) as agent:
                assert agent is not None
                if labels == LABELS_ON:
                    want = f"tfo_agent_cri_containers {npods}.0"
                    assert wait_for(lambda: want in agent.scrape_text(), 30)  # noqa: B023 (used at once)
                    for pod in pods:
                        pod.go()
                    for pod in pods:
                        pod.wait_done(120)
                wall, own, series = scrape_times(agent, scrapes)
            print(
                f"labels {labels}: {series} series; GET /metrics median {statistics.median(wall) * 1e3:.1f} ms "
                f"(max {max(wall) * 1e3:.1f}); tfo_agent_scrape_duration_seconds median "
                f"{statistics.median(own) * 1e3:.1f} ms (max {max(own) * 1e3:.1f})",
                flush=True,
            )
    finally:
        t0 = time.monotonic()
        cri.close()
        ctd.stop()
        ctd.cleanup()
        shutil.rmtree(ctd.base, ignore_errors=True)
        print(f"pods removed in {time.monotonic() - t0:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5_000_000)
    ap.add_argument("--pods", type=int, default=200)
    ap.add_argument("--scrapes", type=int, default=20)
    ap.add_argument("--stats-rounds", type=int, default=5)
    ap.add_argument("--max-series", type=int, default=1000, help="max_comm_series: room for every container")
    ap.add_argument("--skip-syscalls", action="store_true")
    ap.add_argument("--skip-scrape", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tfo-bench-labels-"))
    print(f"load average at start: {os.getloadavg()}", flush=True)
    if not args.skip_syscalls:
        syscall_cost(work, args.rounds, args.calls, args.stats_rounds)
    if not args.skip_scrape:
        scrape_with_pods(work, args.pods, args.scrapes, args.max_series)
    print(f"load average at end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
