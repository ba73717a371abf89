"""SIGHUP reload on a real agent: valid changes apply without detaching or resetting, invalid ones change nothing.

"Not detached" is checked in the kernel: the BPF link ids the agent holds (``/proc/PID/fdinfo``)
are the same before and after the reload.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Callable

from agent.collectors.catalog import COLLECTORS
from tests.conftest import Agent, getppid_workload, wait_for

N = 5_000
COUNT = "ebpf_syscall_count_total"


def link_ids(agent: Agent) -> set[int]:
    """BPF link ids held open by the agent process."""
    assert agent.proc is not None
    ids = set()
    fdinfo = f"/proc/{agent.proc.pid}/fdinfo"
    for fd in os.listdir(fdinfo):
        try:
            with open(f"{fdinfo}/{fd}") as f:
                ids.update(int(line.split()[1]) for line in f if line.startswith("link_id:"))
        except OSError:  # fd closed meanwhile
            continue
    return ids


def reload(agent: Agent, result: str) -> None:
    """SIGHUP and wait until the agent counted a reload with ``result`` (success or failure)."""
    key = {"result": result}
    before = agent.value("tfo_agent_config_reloads_total", **key)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: agent.value("tfo_agent_config_reloads_total", **key) > before, 10), agent.log()


def getppid(agent: Agent) -> float:
    return agent.value(COUNT, syscall="getppid")


def names(*prefixes: str) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"{p}{tag}" for p in prefixes]


def file_io_series(agent: Agent) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    """What shows the file I/O switch: its collector's up series, or the feature-unavailable report."""
    fileio = [c.name for c in COLLECTORS if c.switch == "collect_file_io"]
    wanted = {("tfo_agent_feature_unavailable", frozenset({("feature", "collect_file_io")}))}
    wanted |= {("tfo_agent_collector_up", frozenset({("collector", n)})) for n in fileio}
    return wanted & set(agent.scrape())


def test_valid_reload_applies_without_detach_or_reset(agent_factory: Callable[..., Agent]) -> None:
    kept, excluded = names("tfokeep", "tfoexcl")
    agent = agent_factory({"integrations": {"ebpf": {"process_filter": [kept, excluded], "collect_file_io": True}}})
    getppid_workload(kept, N)
    getppid_workload(excluded, N)
    assert getppid(agent) == 2 * N
    assert file_io_series(agent)
    links = link_ids(agent)
    assert links

    ebpf = {"collect_file_io": False, "exclude_processes": ["tfo-agent", "systemd", excluded]}
    agent.write_config({"integrations": {"ebpf": ebpf}, "logging": {"format": "json"}})
    reload(agent, "success")
    after = link_ids(agent)
    # Nothing (re)attached: link ids only grow, so every remaining link is one from before.
    assert after and after <= links
    assert agent.value("tfo_agent_collector_up", collector="syscalls") == 1
    assert getppid(agent) == 2 * N  # no counter reset
    assert not file_io_series(agent)
    getppid_workload(kept, N)
    getppid_workload(excluded, N)  # excluded now: not counted
    assert getppid(agent) == 3 * N
    entries = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]  # now JSON lines
    assert any(e["level"] == "info" and e["msg"].startswith("reloaded") and "filters" in e["msg"] for e in entries)


def test_collector_switched_off_and_on_keeps_counters(agent_factory: Callable[..., Agent]) -> None:
    (name,) = names("tfosw")
    agent = agent_factory({"integrations": {"ebpf": {"process_filter": [name]}}})
    getppid_workload(name, N)
    assert getppid(agent) == N
    agent.write_config({"integrations": {"ebpf": {"collect_syscalls": False}}})
    reload(agent, "success")
    assert not link_ids(agent)
    assert agent.value("tfo_agent_collector_up", collector="syscalls") == 0
    assert (COUNT, frozenset({("syscall", "getppid")})) not in agent.scrape()
    agent.write_config({"integrations": {"ebpf": {"collect_syscalls": True}}})
    reload(agent, "success")
    assert agent.value("tfo_agent_collector_up", collector="syscalls") == 1
    assert getppid(agent) == N  # pinned maps: the count continues
    getppid_workload(name, N)
    assert getppid(agent) == 2 * N


def test_invalid_reload_changes_nothing(agent_factory: Callable[..., Agent]) -> None:
    (name,) = names("tfoinv")
    agent = agent_factory({"integrations": {"ebpf": {"process_filter": [name]}}})
    getppid_workload(name, N)
    links = link_ids(agent)
    # Would stop syscalls and exclude the workload, but sample_rate is out of range: rejected whole.
    agent.write_config(
        {"integrations": {"ebpf": {"collect_syscalls": False, "exclude_processes": [name], "sample_rate": 0}}}
    )
    reload(agent, "failure")
    log = agent.log()
    assert "reload rejected, keeping the running config" in log
    assert f"{agent.config_path}:" in log and "sample_rate: expected an integer 1 to 100, found 0" in log
    assert link_ids(agent) == links
    getppid_workload(name, N)
    assert getppid(agent) == 2 * N  # still collecting, filters unchanged
    assert agent.value("tfo_agent_config_reloads_total", result="success") == 0


def test_file_io_switched_off_leaves_the_shared_hooks_to_syscalls(
    agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    """file_io and syscalls share one hook pair: switching file_io off keeps the hooks (syscalls
    counts on) and stops file accounting in the kernel (pinned counters show nothing while off)."""
    (name,) = names("tfodd")
    dd = tmp_path / name
    shutil.copy(shutil.which("dd") or "/bin/dd", dd)
    key = {"comm": name}

    def write_mib() -> None:
        cmd = [str(dd), "if=/dev/zero", f"of={tmp_path / 'out'}", "bs=64k", "count=16", "status=none"]
        subprocess.run(cmd, check=True)

    agent = agent_factory({"integrations": {"ebpf": {"collect_file_io": True, "max_comm_series": 10_000}}})
    write_mib()
    assert agent.value("ebpf_file_write_bytes_total", **key) == 1 << 20
    links = link_ids(agent)
    agent.write_config({"integrations": {"ebpf": {"collect_file_io": False}}})
    reload(agent, "success")
    assert link_ids(agent) == links  # the hooks stay, for syscalls
    write_mib()
    agent.write_config({"integrations": {"ebpf": {"collect_file_io": True, "max_comm_series": 10_000}}})
    reload(agent, "success")
    assert agent.value("ebpf_file_write_bytes_total", **key) == 1 << 20  # nothing counted while off
    write_mib()
    assert agent.value("ebpf_file_write_bytes_total", **key) == 2 << 20
