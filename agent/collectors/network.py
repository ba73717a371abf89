"""Network collector (``bpf/network.bpf.c``): TCP/UDP bytes and packets, connections, connect
latency, RTT and retransmissions. The README says exactly what each metric counts.

Also home of ``TcpStateCollector``, the base both TCP collectors share for the
``ebpf_tcp_connections`` gauge (``bpf/tcp_state.bpf.h``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

from agent.collectors import RAW_TP, TP_BTF, TRACEPOINT, BpfCollector, Mode, log2_histogram, sum_percpu_u64
from agent.filters import UNIT
from agent.registry import Kind, MetricFamily

HIST_SLOTS = 40  # TFO_HIST_SLOTS
MIN_SLOT, MAX_SLOT = 10, 37  # ~1 us .. ~137 s (a connect with SYN retries takes a minute or two)
NS, US = 1e-9, 1e-6
DIRECTIONS = ("sent", "received")
PROTOCOLS = ("tcp", "udp")
TCP_ESTABLISHED = "01"  # state column of /proc/net/tcp{,6}
_ZERO = b"\0\0\0\0"


def netns_proc_dirs(proc: str = "/proc") -> list[str]:
    """One ``/proc/<pid>`` per network namespace that has a process in it."""
    seen: dict[str, str] = {}
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            ns = os.readlink(f"{proc}/{pid}/ns/net")
        except OSError:  # gone, or a kernel thread
            continue
        seen.setdefault(ns, f"{proc}/{pid}")
    return list(seen.values())


def established_sockets(proc: str = "/proc") -> int:
    """TCP sockets in ESTABLISHED over every network namespace a process lives in."""
    total = 0
    for d in netns_proc_dirs(proc):
        for table in ("tcp", "tcp6"):
            try:
                with open(f"{d}/net/{table}") as f:
                    next(f, None)
                    total += sum(1 for line in f if line.split(None, 4)[3] == TCP_ESTABLISHED)
            except OSError:
                continue
    return total


SYSCALLS = Mode("raw_tp", "sys_", name="raw_tp/syscalls")


class TcpStateCollector(BpfCollector):
    """A collector whose object maintains ``tcp_established`` (delta since load).

    The gauge is that delta plus the sockets already established when the collector started,
    counted in ``/proc/<pid>/net/tcp{,6}`` of every network namespace holding a process.
    """

    baseline = 0

    def start(self, pin: bool = True) -> None:
        super().start(pin)
        self.baseline = established_sockets()

    def connections(self) -> MetricFamily:
        assert self.obj is not None
        fam = MetricFamily(
            "ebpf_tcp_connections",
            Kind.GAUGE,
            "TCP sockets in ESTABLISHED state, host-wide (both ends of a local connection count).",
        )
        m = self.obj.map("tcp_established")
        raw = m.lookup(_ZERO)
        delta = sum_percpu_u64(raw, m.slot_size, 1)[0] % 2**64 if raw else 0  # per-CPU s64, summed
        if delta >= 2**63:
            delta -= 2**64
        fam.add((), max(0, self.baseline + delta))
        return fam


class NetworkCollector(TcpStateCollector):
    """Socket send/recv, TCP state changes and retransmissions, aggregated in the kernel."""

    name = "network"
    switch = "collect_network"
    pinned = ("traffic", "connect_latency", "retransmits")
    # tp_btf reads socket fields without helpers. Kernels before 6.3 lack the sock_*_length
    # tracepoints: there the bytes come from the socket syscalls' returns (raw_tp/syscalls), and
    # before 5.11 from the compat build of that mode.
    modes = (TP_BTF, RAW_TP, TRACEPOINT, SYSCALLS, SYSCALLS.compat())

    def read(self) -> Iterable[MetricFamily]:
        assert self.obj is not None
        labels = ("direction", "protocol")
        nbytes = MetricFamily(
            "ebpf_network_bytes", Kind.COUNTER, "Payload bytes sent/received through sockets by processes.", labels
        )
        packets = MetricFamily(
            "ebpf_network_packets", Kind.COUNTER, "TCP segments and UDP datagrams sent/received by processes.", labels
        )
        traffic = self.obj.map("traffic")
        for i, (d, p) in enumerate((d, p) for d in DIRECTIONS for p in PROTOCOLS):
            raw = traffic.lookup(struct.pack("<I", i))
            b, n = sum_percpu_u64(raw, traffic.slot_size, 2) if raw else (0, 0)
            nbytes.add((d, p), b / UNIT)
            packets.add((d, p), n / UNIT)

        hist = self.obj.map("connect_latency")
        raw = hist.lookup(_ZERO)
        slots_and_sum = sum_percpu_u64(raw, hist.slot_size, HIST_SLOTS + 1) if raw else [0] * (HIST_SLOTS + 1)
        latency = MetricFamily(
            "ebpf_tcp_connect_latency_seconds",
            Kind.HISTOGRAM,
            "Active TCP opens: time from SYN sent (connect) to ESTABLISHED.",
        )
        bounds, counts = log2_histogram(slots_and_sum[:HIST_SLOTS], MIN_SLOT, MAX_SLOT, NS)
        latency.add_histogram((), bounds, counts, slots_and_sum[HIST_SLOTS] / UNIT * NS)

        rtt = MetricFamily(
            "ebpf_tcp_rtt_seconds",
            Kind.GAUGE,
            "Mean smoothed RTT over established TCP sockets of observed processes, each as of its latest send/receive.",
        )
        raw = self.obj.map("rtt_sum").lookup(_ZERO)
        sum_us, sockets = struct.unpack_from("<qq", raw) if raw else (0, 0)
        rtt.add((), sum_us / sockets * US if sockets > 0 else 0.0)

        retrans = self.obj.map("retransmits")
        raw = retrans.lookup(_ZERO)
        retransmits = MetricFamily("ebpf_tcp_retransmits", Kind.COUNTER, "TCP segments retransmitted, host-wide.")
        retransmits.add((), (sum_percpu_u64(raw, retrans.slot_size, 1)[0] if raw else 0) / UNIT)
        return (nbytes, packets, self.connections(), latency, rtt, retransmits)
