"""Syscall collector against workloads whose syscall counts are known exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest

from agent.collectors import FORCE_ATTACH_ENV, FORCE_VARIANT_ENV, forced_variant
from agent.collectors.syscalls import SyscallsCollector
from agent.config import EbpfConfig
from agent.filters import Filters
from tests.conftest import BPF_DIR, Agent, wait_for

WORKLOAD = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* usage: workload getppid|enoent N [wait]  -- with "wait", read one byte from stdin first */
int main(int argc, char **argv) {
    long n = atol(argv[2]);
    if (argc > 3) { char c; if (read(0, &c, 1) != 1) return 1; }
    if (!strcmp(argv[1], "getppid")) {
        for (long i = 0; i < n; i++) syscall(SYS_getppid);
    } else {
        for (long i = 0; i < n; i++) open("/nonexistent-tfo-test/file", O_RDONLY);
    }
    return 0;
}
"""

COUNT = "ebpf_syscall_count_total"
LATENCY_COUNT = "ebpf_syscall_latency_seconds_count"


@pytest.fixture(scope="module")
def workload_src(build_c: Callable[[str, str], Path]) -> Path:
    return build_c("tfo_workload", WORKLOAD)


def named(src: Path, tmp_path: Path, prefix: str) -> Path:
    """A copy of the workload under a unique name: its comm is that name."""
    exe = tmp_path / f"{prefix}{uuid.uuid4().hex[:6]}"
    shutil.copy(src, exe)
    return exe


def run(exe: Path, mode: str, n: int) -> None:
    subprocess.run([str(exe), mode, str(n)], check=True, timeout=120)


@pytest.mark.parametrize("mode", ["tp_btf", "raw_tp", "tracepoint"])
@pytest.mark.parametrize("file_io", [False, True], ids=["alone", "with_file_io"])
def test_getppid_count_and_latency_exact(
    agent_factory: Callable[..., Agent],
    workload_src: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    file_io: bool,
) -> None:
    """Every attach mode, alone and sharing its hooks with the file I/O collector."""
    monkeypatch.setenv(FORCE_ATTACH_ENV, f"syscalls={mode},file_io={mode}")
    exe = named(workload_src, tmp_path, "tfoppid")
    agent = agent_factory({"integrations": {"ebpf": {"process_filter": [exe.name], "collect_file_io": file_io}}})
    attached = [dict(k[1]) for k in agent.scrape() if k[0] == "tfo_agent_program_attached"]
    assert {a["attach_type"] for a in attached if a["collector"] == "syscalls"} == {mode}
    before = agent.value(COUNT, syscall="getppid"), agent.value(LATENCY_COUNT, syscall="getppid")
    n = 200_000
    run(exe, "getppid", n)
    after = agent.value(COUNT, syscall="getppid"), agent.value(LATENCY_COUNT, syscall="getppid")
    assert n <= after[0] - before[0] <= n + 10
    assert n <= after[1] - before[1] <= n + 10
    assert after[0] == after[1]


def test_openat_enoent_errors(agent_factory: Callable[..., Agent], workload_src: Path, tmp_path: Path) -> None:
    exe = named(workload_src, tmp_path, "tfoenoent")
    agent = agent_factory({"integrations": {"ebpf": {"process_filter": [exe.name]}}})
    key = {"syscall": "openat", "errno": "ENOENT"}
    before = agent.value("ebpf_syscall_errors_total", **key)
    n = 50_000
    run(exe, "enoent", n)
    assert n <= agent.value("ebpf_syscall_errors_total", **key) - before <= n + 10


def test_exclude_processes_wins_over_process_filter(
    agent_factory: Callable[..., Agent], workload_src: Path, tmp_path: Path
) -> None:
    kept, dropped = named(workload_src, tmp_path, "tfokeep"), named(workload_src, tmp_path, "tfodrop")
    agent = agent_factory(
        {"integrations": {"ebpf": {"process_filter": [kept.name, dropped.name], "exclude_processes": [dropped.name]}}}
    )
    before = agent.value(COUNT, syscall="getppid")
    run(dropped, "getppid", 30_000)
    run(kept, "getppid", 20_000)
    assert 20_000 <= agent.value(COUNT, syscall="getppid") - before <= 20_010


def cgroup_roots() -> list[Path]:
    """A writable v1 hierarchy and the v2 tree, where this host has them."""
    roots = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fstype, point = post.split(" ", 1)[0], Path(pre.split(" ")[4])
        if (fstype == "cgroup2" or (fstype == "cgroup" and point.name == "memory")) and os.access(point, os.W_OK):
            roots.append(point)
    return roots


@pytest.mark.parametrize("root", cgroup_roots(), ids=lambda p: str(p))
@pytest.mark.parametrize("created", ["before-start", "after-start"])
def test_container_filter_counts_only_the_container(
    agent_factory: Callable[..., Agent], workload_src: Path, tmp_path: Path, root: Path, created: str
) -> None:
    """A workload moved into a cgroup named like a container scope is counted; one outside is not."""
    cid = uuid.uuid4().hex
    cgroup = root / f"docker-{cid}.scope"
    if created == "before-start":
        cgroup.mkdir()
    try:
        agent = agent_factory({"integrations": {"ebpf": {"container_filter": [cid[:12]]}}})
        if created == "after-start":
            cgroup.mkdir()
            wait_for(lambda: False, timeout=2.5)  # the agent rescans cgroups every 2 s
        inside, outside = named(workload_src, tmp_path, "tfoin"), named(workload_src, tmp_path, "tfoout")
        before = agent.value(COUNT, syscall="getppid")
        child = subprocess.Popen([str(inside), "getppid", "40000", "wait"], stdin=subprocess.PIPE)
        (cgroup / "cgroup.procs").write_text(str(child.pid))
        assert child.stdin is not None
        child.stdin.write(b"x")
        child.stdin.close()
        assert child.wait(60) == 0
        run(outside, "getppid", 25_000)
        assert 40_000 <= agent.value(COUNT, syscall="getppid") - before <= 40_010
    finally:
        if cgroup.exists():
            for pid in (cgroup / "cgroup.procs").read_text().split():
                (root / "cgroup.procs").write_text(pid)
            cgroup.rmdir()


def test_sample_rate_estimate_within_3_percent(
    agent_factory: Callable[..., Agent], workload_src: Path, tmp_path: Path
) -> None:
    exe = named(workload_src, tmp_path, "tfosample")
    agent = agent_factory({"integrations": {"ebpf": {"process_filter": [exe.name], "sample_rate": 50}}})
    before = agent.value(COUNT, syscall="getppid")
    n = 400_000
    run(exe, "getppid", n)
    estimate = agent.value(COUNT, syscall="getppid") - before
    assert abs(estimate - n) <= 0.03 * n, estimate
    assert estimate != n  # it really sampled: an exact count at 50% would be a one-in-a-thousand coincidence


def prog_ids_using(map_path: str) -> set[int]:
    """IDs of loaded BPF programs that use the map pinned at ``map_path``."""
    map_id = json.loads(
        subprocess.run(
            ["bpftool", "-j", "map", "show", "pinned", map_path], check=True, capture_output=True, text=True
        ).stdout
    )["id"]
    progs = json.loads(
        subprocess.run(["bpftool", "-j", "prog", "show"], check=True, capture_output=True, text=True).stdout
    )
    return {p["id"] for p in progs if map_id in p.get("map_ids", [])}


def test_counters_survive_kill_9_and_clean_stop_detaches(
    agent_factory: Callable[..., Agent], workload_src: Path, tmp_path: Path
) -> None:
    exe = named(workload_src, tmp_path, "tforestart")
    cfg = {"integrations": {"ebpf": {"process_filter": [exe.name]}}}
    first = agent_factory(cfg)
    run(exe, "getppid", 10_000)
    before = {k: v for k, v in first.scrape().items() if k[0].startswith("ebpf_syscall")}
    stats_pin = f"{first.pin_path}/syscalls/syscall_stats"
    assert prog_ids_using(stats_pin)
    first.stop(signal.SIGKILL)
    assert wait_for(lambda: not prog_ids_using(stats_pin), timeout=10)

    second = agent_factory({"integrations": {"ebpf": {"process_filter": [exe.name], "pin_path": first.pin_path}}})
    after = second.scrape()
    assert before, "the first agent exported no syscall series"
    for key, value in before.items():
        assert after.get(key, 0.0) >= value, key
    run(exe, "getppid", 5_000)
    assert second.value(COUNT, syscall="getppid") >= before[(COUNT, frozenset({("syscall", "getppid")}))] + 5_000
    assert second.stop() == 0
    # the kernel frees a detached program after an RCU grace period
    assert wait_for(lambda: not prog_ids_using(stats_pin), timeout=5), "programs still attached after a clean stop"


def test_cleanup_removes_pins(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory()
    agent.stop()
    assert os.path.exists(f"{agent.pin_path}/syscalls/syscall_stats")
    out = subprocess.run(
        ["python3", "-m", "agent", "cleanup", "-c", str(agent.config_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert not os.path.exists(agent.pin_path)


def test_promtool_accepts_exposition(agent_factory: Callable[..., Agent], workload_src: Path, tmp_path: Path) -> None:
    agent = agent_factory({"integrations": {"ebpf": {"collect_dns": True}}})  # on, but not in this build
    run(named(workload_src, tmp_path, "tfoprom"), "enoent", 100)
    text = agent.scrape_text()
    assert "ebpf_syscall_errors_total" in text and "tfo_agent_feature_unavailable" in text
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0 and not out.stdout and not out.stderr, out.stdout + out.stderr


def test_self_metrics_report_attachment(agent_factory: Callable[..., Agent]) -> None:
    series = agent_factory().scrape()
    assert series[("tfo_agent_collector_up", frozenset({("collector", "syscalls")}))] == 1
    attached = [dict(k[1]) for k in series if k[0] == "tfo_agent_program_attached"]
    assert {a["program"] for a in attached} >= {"tpbtf_sys_enter", "tpbtf_sys_exit"}
    assert {a["attach_type"] for a in attached} == {"tp_btf"}


def test_cast_build_first_then_the_plain_object(tmp_path: Path) -> None:
    """tp_btf comes from syscalls.cast.bpf.o where the kernel has bpf_rdonly_cast (this one does),
    and from syscalls.bpf.o where that build is missing or refused (kernels before 6.2)."""
    if forced_variant():
        pytest.skip(f"{FORCE_VARIANT_ENV} replaces the choice of build this test is about")
    cfg = replace(EbpfConfig(), programs_path=str(BPF_DIR))
    for programs, expected in ((BPF_DIR, "syscalls.cast.bpf.o"), (tmp_path, "syscalls.bpf.o")):
        if programs == tmp_path:
            shutil.copy(BPF_DIR / "syscalls.bpf.o", tmp_path)
        collector = SyscallsCollector(replace(cfg, programs_path=str(programs)), Filters.from_config(cfg))
        collector.start(pin=False)
        try:
            assert collector.obj is not None and collector.attach_type == "tp_btf"
            assert os.path.basename(collector.obj.path) == expected
        finally:
            collector.stop()
