"""The integration manager in process: crash supervision with real BPF collectors, Hubble wiring."""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from agent import config, manager
from agent.collectors.syscalls import SyscallsCollector
from agent.libbpf import LibbpfError
from agent.manager import IntegrationManager
from agent.registry import Registry
from tests.conftest import BPF_DIR, BPFFS, getppid_workload, wait_for


def make_config(**sections: Any) -> config.Config:
    """A validated config: syscalls only from ./bpf on a unique pin path, no listener."""
    base: dict[str, Any] = {
        "integrations": {
            "ebpf": {
                "programs_path": str(BPF_DIR),
                "pin_path": str(BPFFS / f"tfo-test-{uuid.uuid4().hex[:12]}"),
                "collect_network": False,
                "collect_file_io": False,
                "collect_tcp_events": False,
            }
        },
        "exporters": {"prometheus": {"enabled": False}},
    }
    for key, value in sections.items():
        base["integrations"]["ebpf"][key] = value
    return config.parse(yaml.safe_dump(base), "<test>")


@pytest.fixture
def running() -> Iterator[list[IntegrationManager]]:
    """Managers started by a test; stopped and unpinned afterwards."""
    started: list[IntegrationManager] = []
    yield started
    for m in started:
        m.stop()
        shutil.rmtree(m.cfg.ebpf.pin_path, ignore_errors=True)


class FlakySyscalls(SyscallsCollector):
    """The real syscall collector, whose next ``failing_reads`` map reads fail (a crash)."""

    failing_reads = 0

    def read(self) -> Any:
        if FlakySyscalls.failing_reads:
            FlakySyscalls.failing_reads -= 1
            raise LibbpfError(5, "injected map read failure")
        return super().read()


def getppid_count(registry: Registry) -> float:
    for fam in registry.collect():
        if fam.name == "ebpf_syscall_count":
            return next((s.value for s in fam.samples if s.labels == ("getppid",)), 0.0)  # type: ignore[union-attr]
    return 0.0


def test_crashed_collector_is_restarted_with_backoff(
    monkeypatch: pytest.MonkeyPatch, running: list[IntegrationManager]
) -> None:
    monkeypatch.setattr(manager, "COLLECTORS", (FlakySyscalls,))
    name = f"tfomgr{uuid.uuid4().hex[:6]}"
    registry = Registry()
    m = IntegrationManager(make_config(process_filter=[name]), registry)
    m.start()
    running.append(m)
    getppid_workload(name, 1000)
    assert getppid_count(registry) == 1000
    unit = m.units["syscalls"]
    FlakySyscalls.failing_reads = manager.CRASH_AFTER
    for _ in range(manager.CRASH_AFTER):
        registry.collect()  # each failed read is isolated by the registry and counted by the supervisor
    assert registry.read_errors["syscalls"] == manager.CRASH_AFTER
    assert wait_for(lambda: not unit.running, 5)
    ready, why = m.readiness()
    assert not ready and "crashed: 3 reads in a row failed" in why["syscalls"]
    assert unit.retry_at > time.monotonic()  # waits its backoff before the restart
    assert wait_for(lambda: unit.running, 10)
    assert unit.restarts == 1 and m.readiness() == (True, {})
    assert getppid_count(registry) == 1000  # pinned maps: the restart did not reset the counter
    getppid_workload(name, 1000)
    assert getppid_count(registry) == 2000


def test_hubble_unavailable_when_its_import_fails(
    monkeypatch: pytest.MonkeyPatch, running: list[IntegrationManager]
) -> None:
    monkeypatch.setitem(sys.modules, "agent.hubble", None)  # import of agent.hubble now fails
    cfg = make_config(enabled=False, cilium={"enabled": True, "hubble_tls_enabled": False})
    assert "cilium" in manager.unavailable_features(cfg)
    registry = Registry()
    m = IntegrationManager(cfg, registry)
    m.start()
    running.append(m)
    assert "hubble" not in m.units
    fams = {f.name: f for f in registry.collect()}
    assert [s.labels for s in fams["tfo_agent_feature_unavailable"].samples] == [("cilium",)]


def test_hubble_supervised_and_reported(running: list[IntegrationManager]) -> None:
    pytest.importorskip("grpc")
    from tests.conftest_hubble import FIXTURE_FILES, relay

    if not FIXTURE_FILES:
        pytest.skip("no Hubble fixtures in shared/")
    cilium = {"enabled": True, "hubble_tls_enabled": False, "aggregation_window": "200ms"}
    nowhere = make_config(enabled=False, cilium={**cilium, "hubble_address": "127.0.0.1:1"})
    m = IntegrationManager(nowhere, Registry())
    m.start()
    running.append(m)
    ready, why = m.readiness()
    assert not ready and "not connected to 127.0.0.1:1" in why["hubble"]
    with relay(FIXTURE_FILES[0]) as (_, address):
        registry = Registry()
        m = IntegrationManager(make_config(enabled=False, cilium={**cilium, "hubble_address": address}), registry)
        m.start()
        running.append(m)
        assert wait_for(lambda: m.readiness() == (True, {}), 10)
        assert wait_for(lambda: any(f.name.startswith("hubble_") for f in registry.collect()), 10)
