"""File I/O collector against a workload whose bytes and opens are known exactly."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Callable

import pytest

from agent.collectors import FORCE_ATTACH_ENV
from tests.conftest import Agent, deep_merge, wait_for

W = 32 << 20  # bytes written, then read back
K = 10_000  # opens
CHUNK = 64 << 10
# Accuracy tests give every process its own series: a busy host must not fold the workload's name.
UNCAPPED = {"max_comm_series": 10_000}

WORKLOAD = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define W (32L << 20)
#define CHUNK (64 << 10)
static char buf[CHUNK];

static void step(const char *what) { printf("%s\n", what); fflush(stdout); getchar(); }
static void die(const char *what) { perror(what); exit(1); }

/* Move n bytes from `from` to `to` through a socket pair or a pipe, CHUNK at a time. */
static void pump(int out, int in, long n) {
    for (long done = 0; done < n;) {
        ssize_t w = write(out, buf, CHUNK), r;
        if (w <= 0) die("write");
        for (long got = 0; got < w; got += r)
            if ((r = read(in, buf, w - got)) <= 0) die("read");
        done += w;
    }
}

int main(int argc, char **argv) {
    int fd, sv[2], p[2];
    long done;
    memset(buf, 'x', sizeof buf);
    step("ready");
    /* half with write(2), half with pwrite64(2) */
    if ((fd = open(argv[1], O_CREAT | O_TRUNC | O_WRONLY, 0600)) < 0) die("open");
    for (done = 0; done < W / 2;) { ssize_t n = write(fd, buf, CHUNK); if (n <= 0) die("write"); done += n; }
    for (; done < W;) { ssize_t n = pwrite(fd, buf, CHUNK, done); if (n <= 0) die("pwrite"); done += n; }
    close(fd);
    /* half with read(2), the rest with readv(2) up to EOF */
    if ((fd = open(argv[1], O_RDONLY)) < 0) die("open");
    for (done = 0; done < W / 2;) { ssize_t n = read(fd, buf, CHUNK); if (n <= 0) die("read"); done += n; }
    struct iovec iov = { buf, CHUNK };
    for (ssize_t n; (n = readv(fd, &iov, 1)) > 0;) done += n;
    close(fd);
    for (int i = 0; i < 10000; i++) { if ((fd = open(argv[1], O_RDONLY)) < 0) die("open"); close(fd); }
    step("files done");
    /* the same amount through a socket pair and a pipe, plus writes to a character device */
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) die("socketpair");
    pump(sv[0], sv[1], W);
    if (pipe(p)) die("pipe");
    pump(p[1], p[0], W);
    if ((fd = open("/dev/null", O_WRONLY)) < 0) die("open");
    for (done = 0; done < W; done += write(fd, buf, CHUNK));
    step("others done");
    return 0;
}
"""


class Workload:
    """The workload above, driven step by step through its stdin/stdout."""

    def __init__(self, exe: Path, data: Path) -> None:
        self.proc = subprocess.Popen([str(exe), str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def expect(self, line: str) -> None:
        assert self.proc.stdout is not None
        got = self.proc.stdout.readline().strip()
        assert got == line, f"workload said {got!r}, expected {line!r}"

    def wait_blocked(self) -> None:
        """Wait until it sleeps waiting for its next step: its kernel counters are final then."""
        stat = Path(f"/proc/{self.proc.pid}/stat")
        assert wait_for(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "S"), "workload never blocked"

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        """Let it run to the end (every further step goes ahead on EOF)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            assert self.proc.wait(timeout=60) == 0
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def file_counters(agent: Agent, comm: str) -> tuple[float, float, float]:
    m = agent.scrape()
    key = frozenset({("comm", comm)})
    return (
        m.get(("ebpf_file_write_bytes_total", key), 0.0),
        m.get(("ebpf_file_read_bytes_total", key), 0.0),
        m.get(("ebpf_file_open_count_total", key), 0.0),
    )


@pytest.mark.parametrize(
    ("mode", "syscalls"),
    [("tp_btf", True), ("raw_tp", True), ("tracepoint", True), ("tp_btf", False), ("raw_tp", False)],
    ids=["tp_btf", "raw_tp", "tracepoint", "tp_btf-alone", "raw_tp-alone"],
)
def test_bytes_and_opens_match_the_workload_and_sockets_pipes_do_not_count(
    agent_factory: Callable[..., Agent],
    build_c: Callable[[str, str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    syscalls: bool,
) -> None:
    """Every attach mode of the shared syscall hooks, with the syscall collector on and off."""
    monkeypatch.setenv(FORCE_ATTACH_ENV, f"syscalls={mode},file_io={mode}")
    comm = f"fio_{uuid.uuid4().hex[:8]}"
    exe = build_c(comm, WORKLOAD)
    agent = agent_factory(
        {"integrations": {"ebpf": {"collect_file_io": True, "collect_syscalls": syscalls, **UNCAPPED}}}
    )
    attached = [dict(k[1]) for k in agent.scrape() if k[0] == "tfo_agent_program_attached"]
    assert {a["attach_type"] for a in attached if a["collector"] == "file_io"} == {mode}
    work = Workload(exe, tmp_path / "data")
    try:
        work.expect("ready")  # the loader's own reads (ld.so reading libc) are before this point
        w0, r0, o0 = file_counters(agent, comm)
        lat0 = agent.value("ebpf_file_io_latency_seconds_count", op="open")
        work.go()
        work.expect("files done")
        w1, r1, o1 = file_counters(agent, comm)
        print(
            f"file I/O: wrote {W} counted {w1 - w0:.0f}; read {W} counted {r1 - r0:.0f}; "
            f"opened {K + 2} counted {o1 - o0:.0f}"
        )
        assert abs((w1 - w0) - W) <= W * 0.005, f"write bytes rose by {w1 - w0}, wrote {W}"
        assert abs((r1 - r0) - W) <= W * 0.005, f"read bytes rose by {r1 - r0}, read {W}"
        assert abs((o1 - o0) - (K + 2)) <= 10, f"opens rose by {o1 - o0}, opened {K + 2}"
        assert agent.value("ebpf_file_io_latency_seconds_count", op="open") - lat0 >= K + 2
        work.go()
        work.expect("others done")
        assert file_counters(agent, comm) == (w1, r1, o1), "socket, pipe or /dev/null traffic counted as file I/O"
    finally:
        work.finish()


def test_excluded_process_is_not_counted(
    agent_factory: Callable[..., Agent], build_c: Callable[[str, str], Path], tmp_path: Path
) -> None:
    comm = f"fix_{uuid.uuid4().hex[:8]}"
    exe = build_c(comm, WORKLOAD)
    agent = agent_factory({"integrations": {"ebpf": {"collect_file_io": True, "exclude_processes": [comm]}}})
    work = Workload(exe, tmp_path / "data")
    try:
        work.expect("ready")
        work.go()
        work.expect("files done")
        assert file_counters(agent, comm) == (0.0, 0.0, 0.0)
    finally:
        work.finish()


def test_counters_survive_an_agent_restart(
    agent_factory: Callable[..., Agent], build_c: Callable[[str, str], Path], tmp_path: Path
) -> None:
    comm = f"frs_{uuid.uuid4().hex[:8]}"
    exe = build_c(comm, WORKLOAD)
    config = {"integrations": {"ebpf": {"collect_file_io": True, **UNCAPPED}}}
    first = agent_factory(config)
    work = Workload(exe, tmp_path / "data")
    try:
        work.expect("ready")
        work.go()
        work.expect("files done")
    finally:
        work.finish()
    before = file_counters(first, comm)
    assert before[0] >= W
    first.stop()
    second = agent_factory(deep_merge(config, {"integrations": {"ebpf": {"pin_path": first.pin_path}}}))
    assert file_counters(second, comm) == before
