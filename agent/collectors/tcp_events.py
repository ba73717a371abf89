"""TCP events collector (``bpf/tcp_events.bpf.c``): connection opens, closes and resets.

``ebpf_tcp_opens_total{type}``, ``ebpf_tcp_closes_total``, ``ebpf_tcp_resets_total{direction}``,
and ``ebpf_tcp_connections`` unless the network collector, which exports the same gauge, is on.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from agent.collectors import RAW_TP, TP_BTF, TRACEPOINT, sum_percpu_u64
from agent.collectors.network import TcpStateCollector
from agent.filters import UNIT
from agent.registry import Kind, MetricFamily

N_EVENTS = 5  # ACTIVE_OPEN, PASSIVE_OPEN, CLOSE, RESET_SENT, RESET_RECEIVED


class TcpEventsCollector(TcpStateCollector):
    """sock:inet_sock_set_state and the TCP reset tracepoints, counted per CPU in the kernel."""

    name = "tcp_events"
    switch = "collect_tcp_events"
    pinned = ("tcp_events",)
    modes = (TP_BTF, RAW_TP, TRACEPOINT, TP_BTF.compat(), RAW_TP.compat(), TRACEPOINT.compat())

    def read(self) -> Iterable[MetricFamily]:
        assert self.obj is not None
        events = self.obj.map("tcp_events")
        active, passive, closes, rst_sent, rst_received = (
            sum_percpu_u64(raw, events.slot_size, 1)[0] / UNIT if raw else 0.0
            for raw in (events.lookup(struct.pack("<I", i)) for i in range(N_EVENTS))
        )
        opens = MetricFamily(
            "ebpf_tcp_opens",
            Kind.COUNTER,
            "TCP opens: active = connect() sent a SYN, passive = a listener created a connection.",
            ("type",),
        )
        opens.add(("active",), active)
        opens.add(("passive",), passive)
        close = MetricFamily("ebpf_tcp_closes", Kind.COUNTER, "TCP sockets that reached CLOSE after being established.")
        close.add((), closes)
        resets = MetricFamily("ebpf_tcp_resets", Kind.COUNTER, "TCP RST segments sent and received.", ("direction",))
        resets.add(("sent",), rst_sent)
        resets.add(("received",), rst_received)
        families = [opens, close, resets]
        if not self.cfg.collect_network:  # otherwise the network collector exports the gauge
            families.append(self.connections())
        return families
