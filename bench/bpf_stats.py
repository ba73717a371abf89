"""Per-program BPF cost from the kernel's own accounting (``kernel.bpf_stats_enabled``).

The switch adds some 20-30 ns to every program run, so the benchmarks turn it on only for a
separate run of their workloads, after the timed rounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """Run time and run counts of every BPF program are kept for the block (the setting is restored)."""
    previous = STATS.read_text().strip()
    STATS.write_text("1")
    try:
        yield
    finally:
        STATS.write_text(previous)


def program_costs(pid: int) -> dict[str, tuple[int, int]]:
    """Program name -> (runs, ns in total) of the BPF programs process ``pid`` holds; same-named
    programs of several objects (the filter-cache programs every object has) add up."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:  # closed meanwhile
            continue
        ids.update(int(m) for m in re.findall(r"^prog_id:\s+(\d+)", text, re.M))
    costs: dict[str, tuple[int, int]] = {}
    for i in sorted(ids):
        out = subprocess.run(["bpftool", "prog", "show", "id", str(i), "-j"], capture_output=True, check=True).stdout
        info = json.loads(out)
        if info.get("run_cnt"):
            runs, ns = costs.get(info["name"], (0, 0))
            costs[info["name"]] = (runs + info["run_cnt"], ns + info["run_time_ns"])
    return costs
