"""After the run: print the accuracy figures of test_default.py (agent counter deltas vs. the kernel's)
and write the failed tests to FAILURES_LOG, which `make molecule` prints last when verify fails
(molecule's destroy output would otherwise push them out of sight)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ACCURACY_LOG = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/tmp")) / "accuracy.jsonl"
FAILURES_LOG = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", ".")) / "build" / "molecule-verify-failures.txt"


def pytest_sessionstart(session: Any) -> None:
    ACCURACY_LOG.unlink(missing_ok=True)
    FAILURES_LOG.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    failed = terminalreporter.stats.get("failed", []) + terminalreporter.stats.get("error", [])
    if failed:
        FAILURES_LOG.parent.mkdir(parents=True, exist_ok=True)
        FAILURES_LOG.write_text("".join(f"FAILED {r.nodeid}: {_reason(r)}\n" for r in failed))
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


def _reason(report: Any) -> str:
    """The one-line reason pytest's short summary shows (the assertion or exception message)."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return " ".join(text.split())[:400]
