"""Scheduler collector against the kernel's own per-task accounting in /proc."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import Agent
from tests.test_file_io import UNCAPPED, Workload

# Pinned to CPU 0 next to a CPU hog: 300 rounds of 5 ms of CPU then a 1 ms sleep give voluntary
# switches (the sleeps) and involuntary ones (the hog preempting it).
WORKLOAD = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(0, &set);
    sched_setaffinity(0, sizeof set, &set);
    for (int i = 0; i < 300; i++) {
        double until = cpu_now() + 0.005;
        while (cpu_now() < until);
        usleep(1000);
    }
    printf("done\n");
    fflush(stdout);
    getchar(); /* blocked: its counters are final until the test lets it go */
    return 0;
}
"""

HOG = "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.endswith("ctxt_switches"):
            out[key] = int(value)
    return out


@pytest.mark.parametrize("sample_rate", [100, 10])
def test_runtime_and_context_switches_match_proc(
    agent_factory: Callable[..., Agent], build_c: Callable[[str, str], Path], sample_rate: int
) -> None:
    """CPU time and switches are deltas of the kernel's counters: exact at any sample_rate.

    /proc counts the child from fork; the collector counts what the child did before its exec
    under the name it had then (the test runner's), typically ~100 us and a switch or two.
    """
    comm = f"sch_{uuid.uuid4().hex[:8]}"
    exe = build_c(comm, WORKLOAD)
    ebpf = {"collect_scheduler": True, "sample_rate": sample_rate, **UNCAPPED}
    agent = agent_factory({"integrations": {"ebpf": ebpf}})
    runq0 = agent.value("ebpf_runqueue_latency_seconds_count")
    hog = subprocess.Popen(["python3", "-c", HOG])
    work = Workload(exe, Path(os.devnull))
    try:
        work.expect("done")
        work.wait_blocked()
        runtime_ns = int(Path(f"/proc/{work.proc.pid}/schedstat").read_text().split()[0])
        status = proc_status(work.proc.pid)
        m = agent.scrape()
    finally:
        hog.kill()
        hog.wait()
        work.finish()
    runtime = m[("ebpf_process_runtime_seconds_total", frozenset({("comm", comm)}))]
    switches = {
        k: m[("ebpf_context_switches_total", frozenset({("comm", comm), ("type", k)}))]
        for k in ("voluntary", "involuntary")
    }
    print(f"runtime: ebpf {runtime * 1e9:.0f} ns, schedstat {runtime_ns} ns; switches: ebpf {switches}, /proc {status}")
    assert abs(runtime * 1e9 - runtime_ns) <= runtime_ns * 0.02, f"runtime {runtime}s, schedstat {runtime_ns}ns"
    for kind, key in (("voluntary", "voluntary_ctxt_switches"), ("involuntary", "nonvoluntary_ctxt_switches")):
        got = switches[kind]
        want = status[key]
        assert abs(got - want) <= max(5, want * 0.02), f"{kind} switches {got}, /proc says {want}"
    assert status["nonvoluntary_ctxt_switches"] > 10, "the hog did not preempt the workload: nothing tested"
    assert m[("ebpf_runqueue_latency_seconds_count", frozenset())] - runq0 >= sum(status.values())
