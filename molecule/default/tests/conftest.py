"""Print the accuracy figures of test_default.py (agent counter deltas vs. the kernel's) after the run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ACCURACY_LOG = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/tmp")) / "accuracy.jsonl"


def pytest_sessionstart(session: Any) -> None:
    ACCURACY_LOG.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    if not ACCURACY_LOG.exists():
        return
    rows = [json.loads(line) for line in ACCURACY_LOG.read_text().splitlines() if line.strip()]
    tr = terminalreporter
    tr.write_sep("=", f"agent counters vs. the kernel's accounting ({ACCURACY_LOG})")
    for r in sorted(rows, key=lambda r: (r["host"], r["series"])):
        delta = "absent" if r["agent_delta"] is None else f"{r['agent_delta']:.0f}"
        tr.write_line(
            f"{'ok  ' if r['ok'] else 'FAIL'} {r['host']:<15} {r['kernel']:<22} {r['series']:<62}"
            f" agent {delta:>10}  expected {r['expected']:>10.0f} ±{r['tolerance']:<7} ({r['expected_is']};"
            f" {r.get('mode', '?')})"
        )
