"""DNS collector: queries, responses and their latency per process, from the syscall hooks (``bpf/dns.bpf.h``).

Client side over UDP: a message a process sends to a DNS server port (53) is a query, one it
receives from there is a response, matched with its query by socket and transaction id. Exposed as
``ebpf_dns_queries_total{comm,qtype}``, ``ebpf_dns_responses_total{comm,qtype,rcode}`` (rcode with
Cilium's names, as ``hubble_dns_responses``) and ``ebpf_dns_latency_seconds{comm}`` (query to
matching response; its count is the responses'), with the parse-error self-metric
``tfo_agent_dns_parse_errors_total{reason}``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import ClassVar

from agent.collectors.l7 import L7Collector, add_hist
from agent.filters import UNIT
from agent.l7names import qtype_name, rcode_name
from agent.registry import Kind, MetricFamily

DNS_QUERY, DNS_RESPONSE = 0, 1
MAX_PORTS = 4  # DNS_PORTS


class DnsCollector(L7Collector):
    """DNS over UDP at the socket syscalls, client side."""

    name = "dns"
    switch = "collect_dns"
    feature = 4  # F_DNS
    pinned = ("dns_counts", "dns_latency", "dns_errors")
    errors_map = "dns_errors"
    error_reasons = ("truncated", "malformed", "not_query", "unmatched", "unparsed")
    ports: ClassVar[Sequence[int]] = (53,)  # server ports: the self-test adds one of its own

    def start(self, pin: bool = True) -> None:
        super().start(pin)
        self.set_ports(self.ports)

    def set_ports(self, ports: Sequence[int]) -> None:
        """The server ports whose traffic is DNS (at most MAX_PORTS)."""
        assert self.obj is not None
        padded = [*ports, *[0] * MAX_PORTS][:MAX_PORTS]
        self.obj.map(".data.dns").update(b"\0\0\0\0", struct.pack(f"<{MAX_PORTS}H", *padded))

    def read_l7(self) -> Iterable[MetricFamily]:
        assert self.obj is not None
        queries = MetricFamily(
            "ebpf_dns_queries", Kind.COUNTER, "DNS queries sent to a DNS server port.", ("comm", "qtype")
        )
        responses = MetricFamily(
            "ebpf_dns_responses",
            Kind.COUNTER,
            "DNS responses received that matched a query, by rcode.",
            ("comm", "qtype", "rcode"),
        )
        latency = MetricFamily(
            "ebpf_dns_latency_seconds",
            Kind.HISTOGRAM,
            "From a DNS query to its response (log2 buckets of ns, in seconds).",
            ("comm",),
        )
        counts: dict[tuple[str, ...], int] = {}  # several qtypes can share the label "other"
        for (comm, what), (n,) in self.stats.read(self.obj.map("dns_counts")).items():
            if what.kind == DNS_QUERY:
                labels: tuple[str, ...] = (comm, qtype_name(what.code))
            else:
                labels = (comm, qtype_name(what.code), rcode_name(what.a))
            counts[labels] = counts.get(labels, 0) + n
        for labels, n in sorted(counts.items()):
            (queries if len(labels) == 2 else responses).add(labels, n / UNIT)
        for (comm, _), values in sorted(self.stats.read(self.obj.map("dns_latency")).items()):
            add_hist(latency, (comm,), values)
        return (queries, responses, latency)
