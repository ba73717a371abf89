"""What ``tfo-agent check`` asks of each collector: not only that its programs load, but that the mode
the agent would use counts right. The collector is started with a filter on this process alone
(renamed for the test), a small workload of known size runs here, and the collector's figures are
compared with the workload or with the kernel's own per-process accounting.

A mode that loads but counts wrong (0 sent bytes, as fexit on sock_sendmsg gave on 6.1 and 6.12) fails.
"""

from __future__ import annotations

import mmap
import os
import resource
import socket
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Callable

from agent import host
from agent.collectors import BpfCollector, CollectorError
from agent.collectors.selftest_l7 import N_QUERIES, DnsProbe, HttpProbe
from agent.config import EbpfConfig
from agent.filters import Filters
from agent.registry import HistogramSample, MetricFamily

N_SYSCALLS = 1000
N_BYTES = 64 * 1024
N_DATAGRAM = 1000
N_SLEEPS = 20
N_PAGES = 1024


class SelfTestFailed(CollectorError):
    """The collector loaded but did not count the workload right; the message says what it saw."""


def value(families: Iterable[MetricFamily], name: str, **labels: str) -> float:
    """Sum of the series of family ``name`` whose labels include ``labels`` (histograms: their count)."""
    total = 0.0
    for fam in families:
        if fam.name != name:
            continue
        for s in fam.samples:
            have = dict(zip(fam.label_names, s.labels))
            if all(have.get(k) == v for k, v in labels.items()):
                total += s.count if isinstance(s, HistogramSample) else s.value
    return total


def _tcp_and_udp(_: str) -> None:
    """A loopback TCP connection carrying N_BYTES, and one UDP datagram of N_DATAGRAM bytes."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        got = bytearray()

        def serve() -> None:
            conn, _ = srv.accept()
            with conn:
                while len(got) < N_BYTES and (chunk := conn.recv(65536)):
                    got.extend(chunk)

        reader = threading.Thread(target=serve)
        reader.start()
        with socket.create_connection(srv.getsockname()) as cli:
            cli.sendall(b"x" * N_BYTES)
        reader.join(10)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("127.0.0.1", 0))
        tx.sendto(b"u" * N_DATAGRAM, rx.getsockname())
        rx.recv(N_DATAGRAM)


def _files(scratch: str) -> None:
    path = os.path.join(scratch, "f")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"f" * N_BYTES)
    os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    os.read(fd, N_BYTES)
    os.close(fd)


def _getppid(_: str) -> None:
    for _ in range(N_SYSCALLS):
        os.getppid()


def _sleeps(_: str) -> None:
    for _ in range(N_SLEEPS):
        time.sleep(0.001)


def _touch_pages(_: str) -> None:
    size = N_PAGES * mmap.PAGESIZE
    with mmap.mmap(-1, size) as m:
        for off in range(0, size, mmap.PAGESIZE):
            m[off] = 1


def _voluntary_switches() -> int:
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        except (OSError, StopIteration):
            continue
    return total


@dataclass(frozen=True)
class Probe:
    """A workload (given a scratch directory), and what the collector must then show:
    ``expect(figures, comm, kernel_delta)`` returns "" when right, else what was seen. ``kernel``
    reads the kernel's own per-process figure before and after the workload, for counts that
    depend on the kernel (switches, faults)."""

    work: Callable[[str], None]
    expect: Callable[[list[MetricFamily], str, int], str]
    kernel: Callable[[], int] = lambda: 0
    setup: Callable[[BpfCollector], None] = lambda _: None  # after start, before the workload


def exactly(*wants: tuple[str, float, dict[str, str]]) -> Callable[[list[MetricFamily], str, int], str]:
    """Each (family, value, labels) must be exactly value; a label value "{comm}" means the test's comm."""

    def expect(families: list[MetricFamily], comm: str, _: int) -> str:
        wrong = []
        for name, want, labels in wants:
            sel = {k: comm if v == "{comm}" else v for k, v in labels.items()}
            got = value(families, name, **sel)
            if got != want:
                wrong.append(f"{name}{sel or ''} {got:g}, expected {want:g}")
        return "; ".join(wrong)

    return expect


def like_the_kernel(name: str, **labels: str) -> Callable[[list[MetricFamily], str, int], str]:
    """At least 90% of what the kernel counted for this process, and more than 0."""

    def expect(families: list[MetricFamily], comm: str, want: int) -> str:
        got = value(families, name, comm=comm, **labels)
        return "" if got > 0 and got >= 0.9 * want else f"{name} {got:g}, the kernel counted {want}"

    return expect


def _dns_probe(dns: DnsProbe) -> Probe:
    return Probe(
        dns.work,
        exactly(
            ("ebpf_dns_queries", 1, {"comm": "{comm}", "qtype": "A"}),
            ("ebpf_dns_queries", 1, {"comm": "{comm}", "qtype": "AAAA"}),
            ("ebpf_dns_responses", 1, {"comm": "{comm}", "qtype": "A", "rcode": "No Error"}),
            ("ebpf_dns_responses", 1, {"comm": "{comm}", "qtype": "AAAA", "rcode": "Non-Existent Domain"}),
            ("ebpf_dns_latency_seconds", N_QUERIES, {"comm": "{comm}"}),
        ),
        setup=dns.setup,
    )


def _http_probe(http: HttpProbe) -> Probe:
    return Probe(http.work, lambda families, comm, _: exactly(*http.expected())(families, comm, 0))


PROBES: dict[str, Probe] = {
    "syscalls": Probe(_getppid, exactly(("ebpf_syscall_count", N_SYSCALLS, {"syscall": "getppid"}))),
    "network": Probe(
        _tcp_and_udp,
        exactly(
            *((("ebpf_network_bytes", N_BYTES, {"direction": d, "protocol": "tcp"})) for d in ("sent", "received")),
            *((("ebpf_network_bytes", N_DATAGRAM, {"direction": d, "protocol": "udp"})) for d in ("sent", "received")),
            ("ebpf_tcp_connect_latency_seconds", 1, {}),
        ),
    ),
    "tcp_events": Probe(_tcp_and_udp, exactly(("ebpf_tcp_opens", 1, {"type": "active"}))),
    "file_io": Probe(
        _files,
        exactly(
            ("ebpf_file_write_bytes", N_BYTES, {"comm": "{comm}"}),
            ("ebpf_file_read_bytes", N_BYTES, {"comm": "{comm}"}),
            ("ebpf_file_open_count", 2, {"comm": "{comm}"}),
        ),
    ),
    "scheduler": Probe(_sleeps, like_the_kernel("ebpf_context_switches", type="voluntary"), _voluntary_switches),
    "memory": Probe(
        _touch_pages,
        like_the_kernel("ebpf_page_faults"),
        lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
    ),
    "dns": _dns_probe(DnsProbe()),
    "http": _http_probe(HttpProbe()),
}


def self_test(cls: type[BpfCollector], ebpf: EbpfConfig) -> str:
    """Start ``cls`` as the agent would (same objects, modes and BTF), count a workload of this
    process and return the mode it used; raise CollectorError if it does not load, SelfTestFailed
    if it loads but counts wrong."""
    comm = f"tfo-chk-{os.getpid() % 10**6}"
    cfg = replace(
        ebpf, process_filter=(comm,), exclude_processes=(), container_filter=(), namespace_filter=(), sample_rate=100
    )
    cfg = replace(cfg, labels=tuple(dict.fromkeys(("comm", *cfg.labels))))  # the probes find their figures by comm
    collector = cls(cfg, Filters.from_config(cfg))
    collector.start(pin=False)
    try:
        label = collector.mode.label if collector.mode else collector.attach_type
        with open("/proc/self/comm") as f:
            old = f.read().strip()
        probe = PROBES[cls.name]
        probe.setup(collector)
        with tempfile.TemporaryDirectory(prefix="tfo-check-") as scratch:
            host.set_process_name(comm)  # from here on, only the workload's own system calls
            try:
                before = probe.kernel()
                probe.work(scratch)
                wrong = probe.expect(collector.collect(), comm, probe.kernel() - before)
            finally:
                host.set_process_name(old)
    finally:
        collector.stop()
    if wrong:
        raise SelfTestFailed(f"{label} loads but counts wrong: {wrong}")
    return label
