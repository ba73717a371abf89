"""The comm label cap: bounded series per per-process family, whatever the host runs."""

from __future__ import annotations

import subprocess
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Callable

from agent.collectors.comm_cap import OTHER, CommCap
from tests.conftest import Agent, Series

CAP = 20
N = 500  # short-lived processes, each with its own name
PER_PROCESS = (
    "ebpf_file_read_bytes_total",
    "ebpf_file_write_bytes_total",
    "ebpf_file_open_count_total",
    "ebpf_process_runtime_seconds_total",
    "ebpf_context_switches_total",
    "ebpf_page_faults_total",
    "ebpf_memory_allocations_total",
    "ebpf_oom_kills_total",
)

# Opens a regular file three times, faults some pages in, sleeps once, exits.
SHORT = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(void) {
    for (int i = 0; i < 3; i++) close(open("/etc/hostname", O_RDONLY));
    memset(malloc(1 << 18), 1, 1 << 18);
    usleep(1000);
    return 0;
}
"""


def comms_per_family(m: Series) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for (name, labels), _ in m.items():
        if name in PER_PROCESS:
            out[name].add(dict(labels)["comm"])
    return out


def opens(m: Series) -> float:
    return sum(v for (name, _), v in m.items() if name == "ebpf_file_open_count_total")


def test_distinct_names_never_exceed_the_cap_and_folds_are_counted(
    agent_factory: Callable[..., Agent], build_c: Callable[[str, str], Path], tmp_path: Path
) -> None:
    exe = build_c("short_lived", SHORT)
    tag = uuid.uuid4().hex[:6]
    names = []
    for i in range(N):  # the name a process runs under is its executable's
        link = tmp_path / f"c{i:03d}_{tag}"
        link.symlink_to(exe)
        names.append(link)
    ebpf = {"collect_file_io": True, "collect_scheduler": True, "collect_memory": True, "max_comm_series": CAP}
    agent = agent_factory({"integrations": {"ebpf": ebpf}})
    opens0 = opens(agent.scrape())
    for start in range(0, N, 50):
        batch = [subprocess.Popen([str(p)]) for p in names[start : start + 50]]
        assert all(p.wait(timeout=30) == 0 for p in batch)
        for family, comms in comms_per_family(agent.scrape()).items():
            assert len(comms) <= CAP, f"{family} has {len(comms)} comm values, cap {CAP}"
    m = agent.scrape()
    seen = comms_per_family(m)
    for family in ("ebpf_file_open_count_total", "ebpf_process_runtime_seconds_total", "ebpf_page_faults_total"):
        assert OTHER in seen[family], f"nothing folded into {family}"
    print(
        {f: len(c) for f, c in seen.items()},
        {c: m[(f"tfo_agent_{c}_comm_folded_total", frozenset())] for c in ("file_io", "scheduler", "memory")},
    )
    for collector in ("file_io", "scheduler", "memory"):
        folded = m[(f"tfo_agent_{collector}_comm_folded_total", frozenset())]
        assert folded >= N - (CAP - 1), f"{collector} folded {folded} names, expected at least {N - CAP + 1}"
    # folding moves counts into comm="other", it does not lose them
    assert opens(m) - opens0 >= 3 * N
    text = agent.scrape_text()
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout + lint.stderr


def test_cap_admits_first_names_and_counts_each_folded_name_once() -> None:
    cap = CommCap(3)
    assert [cap.label(c) for c in ("a", "b", "c", "a", "d", "c")] == ["a", "b", OTHER, "a", OTHER, OTHER]
    assert cap.folded == 2
    assert cap.label(OTHER) == OTHER and cap.label("") == OTHER  # never a series of their own
    assert cap.folded == 4
