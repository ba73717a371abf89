"""`tfo-agent check`'s collector self-tests: each collector counts its workload on this kernel, in
the mode the agent picks (and, under $TFO_AGENT_FORCE_VARIANT, in that build), and a mode that
loads but counts wrong is reported as such, not as OK."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from agent.collectors import FORCE_ATTACH_ENV, FORCE_VARIANT_ENV, Mode
from agent.collectors.catalog import COLLECTORS
from agent.collectors.network import NetworkCollector
from agent.collectors.selftest import SelfTestFailed, self_test
from agent.config import EbpfConfig
from tests.conftest import BPF_DIR, ROOT


@pytest.mark.parametrize("cls", COLLECTORS, ids=lambda c: c.name)
def test_each_collector_counts_its_workload(cls: type) -> None:
    mode = self_test(cls, replace(EbpfConfig(), programs_path=str(BPF_DIR)))
    assert mode in {m.label for m in cls.modes}


def test_a_mode_that_loads_but_misses_bytes_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the state-change program attached: it loads and attaches, but sees no bytes (as fexit on
    sock_sendmsg did on 6.1 and 6.12), and the self-test says what it saw."""
    monkeypatch.delenv(FORCE_VARIANT_ENV, raising=False)
    monkeypatch.delenv(FORCE_ATTACH_ENV, raising=False)

    class Blind(NetworkCollector):
        modes = (Mode("raw_tp", "raw_set_state"),)

    with pytest.raises(
        SelfTestFailed, match=r"ebpf_network_bytes\{'direction': 'sent', 'protocol': 'tcp'\} 0, expected 65536"
    ):
        self_test(Blind, replace(EbpfConfig(), programs_path=str(BPF_DIR)))


def test_check_reports_each_collector_with_its_mode(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "integrations:\n  ebpf:\n"
        f"    programs_path: {BPF_DIR}\n    pin_path: /sys/fs/bpf/tfo-selftest\n"
        "    collect_scheduler: true\n    collect_memory: true\n    collect_dns: true\n    collect_http: true\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "agent", "check", "-c", str(cfg), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(out.stdout)
    collectors = {c["name"]: c for c in report["checks"] if c["name"].startswith("collector ")}
    assert set(collectors) == {f"collector {c.name}" for c in COLLECTORS}
    for c in collectors.values():
        assert c["ok"] and "counts a test workload" in c["found"], c
    assert out.returncode == 0, out.stdout + out.stderr
