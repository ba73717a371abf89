"""Memory collector against the kernel's own accounting: /proc/<pid>/stat faults, OOM kills."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from agent.collectors import FORCE_ATTACH_ENV
from agent.collectors.memory import MemoryCollector
from tests.conftest import Agent, skip_unless_built, wait_for
from tests.test_file_io import UNCAPPED, Workload

P = 50_000  # fresh pages touched

TOUCH = r"""
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

int main(void) {
    long page = sysconf(_SC_PAGESIZE), n = 50000;
    char *p = mmap(NULL, n * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 1;
    madvise(p, n * page, MADV_NOHUGEPAGE); /* one fault per page */
    for (long i = 0; i < n; i++) p[i * page] = 1;
    printf("done\n");
    fflush(stdout);
    getchar();
    return 0;
}
"""

HOG = r"""
#include <stdlib.h>
#include <string.h>

int main(void) {
    for (int i = 0; i < 4096; i++) { /* up to 4 GiB, 1 MiB at a time, every page touched */
        char *p = malloc(1 << 20);
        if (p) memset(p, 1, 1 << 20);
    }
    return 0;
}
"""


def faults(pid: int) -> int:
    """minflt + majflt of /proc/<pid>/stat (fields 10 and 12)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]) + int(fields[9])


def vmstat(key: str) -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name == key:
            return int(value)
    return 0


MODES = list(dict.fromkeys(m.attach_type for m in MemoryCollector.modes))


def forced(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Pin the memory collector of agents started from now on to one attach mode."""
    skip_unless_built(MemoryCollector, mode)
    monkeypatch.setenv(FORCE_ATTACH_ENV, f"memory={mode}")


def attach_types(agent: Agent) -> set[str]:
    return {
        dict(k[1])["attach_type"]
        for k in agent.scrape()
        if k[0] == "tfo_agent_program_attached" and dict(k[1])["collector"] == "memory"
    }


@pytest.mark.parametrize("mode", MODES)
def test_page_faults_match_proc(
    agent_factory: Callable[..., Agent], build_c: Callable[[str, str], Path], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    comm = f"pf_{uuid.uuid4().hex[:8]}"
    exe = build_c(comm, TOUCH)
    forced(monkeypatch, mode)
    agent = agent_factory({"integrations": {"ebpf": {"collect_memory": True, **UNCAPPED}}})
    assert attach_types(agent) == {mode}
    work = Workload(exe, Path(os.devnull))
    try:
        work.expect("done")
        work.wait_blocked()
        want = faults(work.proc.pid)
        got = agent.value("ebpf_page_faults_total", comm=comm)
    finally:
        work.finish()
    print(f"page faults: ebpf {got:.0f}, /proc minflt+majflt {want}")
    assert want >= P
    assert abs(got - want) <= want * 0.02, f"ebpf counted {got} faults, /proc/<pid>/stat says {want}"


def _memory_controller() -> tuple[Path, str]:
    """Where to create a memory cgroup: (mount point, 'v1' or 'v2')."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fstype, _, options = post.split(" ", 2)
        mount = Path(pre.split(" ")[4])
        if fstype == "cgroup" and "memory" in options.split()[-1].split(","):
            return mount, "v1"
        if fstype == "cgroup2" and "memory" in (mount / "cgroup.controllers").read_text().split():
            return mount, "v2"
    pytest.skip("no cgroup memory controller")


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A fresh memory-limited cgroup (v1 or v2, no swap); removed afterwards."""
    root, version = _memory_controller()
    cg = root / f"tfo-test-oom-{uuid.uuid4().hex[:12]}"
    if version == "v2":
        (root / "cgroup.subtree_control").write_text("+memory")
    cg.mkdir()
    try:
        if version == "v1":
            (cg / "memory.limit_in_bytes").write_text(str(limit))
            if (cg / "memory.memsw.limit_in_bytes").exists():
                (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
        else:
            (cg / "memory.max").write_text(str(limit))
            if (cg / "memory.swap.max").exists():
                (cg / "memory.swap.max").write_text("0")
        yield cg
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                cg.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@pytest.mark.parametrize("mode", MODES)
def test_oom_kill_counted_once_with_victim_name(
    agent_factory: Callable[..., Agent], build_c: Callable[[str, str], Path], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    comm = f"oom_{uuid.uuid4().hex[:8]}"
    exe = build_c(comm, HOG)
    forced(monkeypatch, mode)
    agent = agent_factory({"integrations": {"ebpf": {"collect_memory": True, **UNCAPPED}}})
    assert attach_types(agent) == {mode}

    def all_kills() -> float:
        return sum(v for (name, _), v in agent.scrape().items() if name == "ebpf_oom_kills_total")

    before, kernel_before = all_kills(), vmstat("oom_kill")
    with memory_cgroup(32 << 20) as cg:
        procs = cg / "cgroup.procs"
        child = subprocess.Popen([str(exe)], preexec_fn=lambda: procs.write_text(str(os.getpid())))
        assert child.wait(timeout=60) == -9, "the workload was not OOM-killed"
    assert wait_for(lambda: agent.value("ebpf_oom_kills_total", comm=comm) >= 1)
    time.sleep(0.5)  # a second (wrong) count would have arrived by now
    print(f"oom kills: ebpf +{all_kills() - before:.0f}, /proc/vmstat oom_kill +{vmstat('oom_kill') - kernel_before}")
    assert agent.value("ebpf_oom_kills_total", comm=comm) == 1
    assert all_kills() - before == 1
    assert vmstat("oom_kill") - kernel_before == 1
