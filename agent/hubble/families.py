"""What the hubble_* metrics are: their families, labels and the flow key they are derived from.

A flow is reduced to one composite key (``RawKey``: enum numbers, pods), counted per window; once
per window each distinct key becomes a ``FlowKey`` of label values (``flow_key``) and is
projected onto the families it counts in (``project``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Callable, NamedTuple

from agent.hubble.proto import enum_names, relay_pb2
from agent.l7names import RCODES
from agent.registry import Kind

VERDICTS = enum_names("Verdict")
DROP_REASONS = enum_names("DropReason")
FLOW_TYPES = enum_names("FlowType")
L7_TYPES = enum_names("L7FlowType")
LOST_SOURCES = enum_names("LostEventSource")
NODE_STATES = enum_names("NodeState", relay_pb2)
DIRECTIONS = {0: "unknown", 1: "ingress", 2: "egress"}
REPORTERS = {0: "unknown", 1: "server", 2: "client"}
# Cilium's monitor PolicyMatchType names, and the layer each one stands for (L7 is the proxy's).
POLICY_MATCH = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all", 5: "L3-Proto", 6: "Proto-Only"}
MATCH_LAYER = {"L3-Only": "L3", "all": "L3", "L3-L4": "L4", "L4-Only": "L4", "L3-Proto": "L4", "Proto-Only": "L4"}
# Cilium's reserved security identities: the "workload" of an endpoint without a pod.
RESERVED = {
    1: "reserved:host",
    2: "reserved:world",
    3: "reserved:unmanaged",
    4: "reserved:health",
    5: "reserved:init",
    6: "reserved:remote-node",
    7: "reserved:kube-apiserver",
    8: "reserved:ingress",
    9: "reserved:world-ipv4",
    10: "reserved:world-ipv6",
}
POLICY_VERDICT_EVENT = 5  # Cilium monitor MessageTypePolicyVerdict
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONN_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
OVERFLOW = "__overflow__"
_POD_SUFFIX = (re.compile(r"^(.+)-[a-z0-9]{6,10}-[a-z0-9]{5}$"), re.compile(r"^(.+)-(?:[a-z0-9]{5}|\d+)$"))
GRPC_PATH = re.compile(r"^(?:[a-z]+://[^/]*)?(/[\w.]+/\w+)")


class FlowKey(NamedTuple):
    """Everything the metric families need from one flow; flows with equal keys count together."""

    node: str
    src_ns: str
    src_wl: str
    dst_ns: str
    dst_wl: str
    type: str
    verdict: str
    protocol: str
    l7: str  # "", dns, http, grpc, kafka
    l7_type: str  # REQUEST, RESPONSE, SAMPLE or ""
    a: str  # http method | grpc method path | kafka api_key | dns qtypes
    b: str  # http status | grpc status | kafka error_code | dns rcode name
    c: str  # http protocol | kafka topic
    reporter: str
    drop_reason: str
    match: str  # policy match ("" when the flow is no policy decision)
    direction: str
    syn: bool  # a TCP connection attempt (SYN without ACK, not a reply)
    svc_ns: str
    svc: str


@dataclass(frozen=True)
class Groups:
    """Which metric groups are on (the collect_* switches) and whether series carry ``node``."""

    flows: bool = True
    l7: bool = True
    drops: bool = True
    policies: bool = True
    services: bool = True
    node_label: bool = False


CTX = ("source_namespace", "source_workload", "destination_namespace", "destination_workload")
SVC = ("destination_namespace", "destination_service", "protocol")
# name -> (kind, help, labels after the context, group, buckets)
FAMILIES: dict[str, tuple[Kind, str, tuple[str, ...], str, tuple[float, ...]]] = {
    "hubble_flows": (
        Kind.COUNTER,
        "Flow events by type, verdict and L4 protocol",
        (*CTX, "type", "verdict", "protocol"),
        "flows",
        (),
    ),
    "hubble_flow_bytes": (
        Kind.COUNTER,
        "Encoded size of the flow events received (Cilium flows carry no packet byte count)",
        (*CTX, "type", "verdict", "protocol"),
        "flows",
        (),
    ),
    "hubble_tcp_connections": (
        Kind.COUNTER,
        "TCP connection attempts: SYN without ACK flow events",
        (*CTX, "verdict"),
        "flows",
        (),
    ),
    "hubble_tcp_connection_duration_seconds": (
        Kind.HISTOGRAM,
        "Time from a connection's first SYN to its first FIN or RST",
        CTX,
        "flows",
        CONN_BUCKETS,
    ),
    "hubble_udp_flows": (Kind.COUNTER, "UDP flow events", (*CTX, "verdict"), "flows", ()),
    "hubble_http_requests": (
        Kind.COUNTER,
        "HTTP requests seen by the L7 proxy",
        (*CTX, "method", "protocol", "reporter"),
        "l7",
        (),
    ),
    "hubble_http_responses": (
        Kind.COUNTER,
        "HTTP responses by status",
        (*CTX, "method", "status", "reporter"),
        "l7",
        (),
    ),
    "hubble_http_request_duration_seconds": (
        Kind.HISTOGRAM,
        "HTTP latency from the response's latency_ns",
        (*CTX, "method", "reporter"),
        "l7",
        LATENCY_BUCKETS,
    ),
    "hubble_grpc_requests": (
        Kind.COUNTER,
        "gRPC requests (HTTP/2 with content-type application/grpc)",
        (*CTX, "grpc_method", "reporter"),
        "l7",
        (),
    ),
    "hubble_grpc_request_duration_seconds": (
        Kind.HISTOGRAM,
        "gRPC latency from the response's latency_ns",
        (*CTX, "grpc_method", "grpc_status", "reporter"),
        "l7",
        LATENCY_BUCKETS,
    ),
    "hubble_dns_queries": (Kind.COUNTER, "DNS queries by query types", (*CTX, "qtypes"), "l7", ()),
    "hubble_dns_responses": (Kind.COUNTER, "DNS responses by rcode", (*CTX, "rcode", "qtypes"), "l7", ()),
    "hubble_kafka_requests": (Kind.COUNTER, "Kafka requests", (*CTX, "topic", "api_key", "reporter"), "l7", ()),
    "hubble_drop": (Kind.COUNTER, "Dropped flow events by drop reason", (*CTX, "reason", "protocol"), "drops", ()),
    "hubble_drop_bytes": (
        Kind.COUNTER,
        "Encoded size of the dropped flow events (Cilium flows carry no packet byte count)",
        (*CTX, "reason", "protocol"),
        "drops",
        (),
    ),
    "hubble_policy_verdicts": (
        Kind.COUNTER,
        "Policy verdicts (verdict ALLOWED/DENIED/AUDIT; action is Cilium's)",
        (*CTX, "direction", "match", "action", "verdict"),
        "policies",
        (),
    ),
    "hubble_policy_match": (
        Kind.COUNTER,
        "Policy decisions by the layer of the matching rule (L3, L4, L7)",
        (*CTX, "direction", "type"),
        "policies",
        (),
    ),
    "hubble_service_requests": (Kind.COUNTER, "L7 requests by destination service", SVC, "services", ()),
    "hubble_service_errors": (
        Kind.COUNTER,
        "L7 error responses by service (HTTP 5xx, gRPC status != 0, Kafka error, DNS SERVFAIL)",
        SVC,
        "services",
        (),
    ),
    "hubble_service_request_duration_seconds": (
        Kind.HISTOGRAM,
        "L7 latency by service, from responses' latency_ns",
        SVC,
        "services",
        LATENCY_BUCKETS,
    ),
    "hubble_endpoint_count": (
        Kind.GAUGE,
        "Distinct pods seen as source or destination of a flow in the last 5 minutes",
        ("namespace",),
        "flows",
        (),
    ),
    "hubble_endpoint_ready": (
        Kind.GAUGE,
        "Pods of hubble_endpoint_count with a forwarded flow in the last 5 minutes",
        ("namespace",),
        "flows",
        (),
    ),
}

_ALLOWED = {
    "FORWARDED": "ALLOWED",
    "REDIRECTED": "ALLOWED",
    "TRANSLATED": "ALLOWED",
    "DROPPED": "DENIED",
    "AUDIT": "AUDIT",
}


def workload_of(pod: str) -> str:
    """Pod name -> its controller's name (Deployment/DaemonSet/StatefulSet/Job naming rules)."""
    for pattern in _POD_SUFFIX:
        m = pattern.match(pod)
        if m:
            return m.group(1)
    return pod


def namespace_rule(watch: Iterable[str], exclude: Iterable[str]) -> Callable[[str, str], bool]:
    """The flow namespace filter: keep a flow when one of its sides is in a watched, non-excluded
    namespace; a flow with no namespace on either side (host, world) is kept when ``watch`` is empty."""
    watch_set, exclude_set = frozenset(watch), frozenset(exclude)

    def keep(src_ns: str, dst_ns: str) -> bool:
        sides = [ns for ns in (src_ns, dst_ns) if ns]
        if not sides:
            return not watch_set
        return any(ns not in exclude_set and (not watch_set or ns in watch_set) for ns in sides)

    return keep


# The per-flow key: node, source namespace/workload/pod, destination namespace/workload/pod, Type and
# verdict (Cilium's enum numbers), protocol, l7, l7_type, a, b, c (label values as in FlowKey),
# traffic_direction (number), drop, match, syn, svc_ns, svc. Numbers become names, and pods
# endpoint gauges, once per window per distinct key (``flow_key``), not per flow.
RawKey = tuple
FORWARDING = frozenset(n for n, name in VERDICTS.items() if name in ("FORWARDED", "REDIRECTED", "TRANSLATED"))


def flow_key(raw: RawKey) -> FlowKey:
    """The label values of a per-flow key."""
    node, src_ns, src_wl, _, dst_ns, dst_wl, _, ftype, verdict, protocol, l7, l7_type, a, b, c, direction, *rest = raw
    drop, match, syn, svc_ns, svc = rest
    return FlowKey(
        node, src_ns, src_wl, dst_ns, dst_wl,
        FLOW_TYPES.get(ftype) or str(ftype), VERDICTS.get(verdict) or str(verdict), protocol,
        l7, l7_type, a, b, c, REPORTERS.get(direction, "unknown"), drop, match, DIRECTIONS.get(direction, "unknown"),
        syn, svc_ns, svc,
    )  # fmt: skip


def project(g: Groups, k: FlowKey) -> Iterator[tuple[str, tuple[str, ...], int]]:
    """(family, labels after node, which value: 0 count / 1 bytes) for every family a key counts in."""
    ctx = (k.src_ns, k.src_wl, k.dst_ns, k.dst_wl)
    if g.flows:
        yield "hubble_flows", (*ctx, k.type, k.verdict, k.protocol), 0
        yield "hubble_flow_bytes", (*ctx, k.type, k.verdict, k.protocol), 1
        if k.syn:
            yield "hubble_tcp_connections", (*ctx, k.verdict), 0
        if k.protocol == "UDP":
            yield "hubble_udp_flows", (*ctx, k.verdict), 0
    if g.l7 and k.l7:
        request = k.l7_type == "REQUEST"
        response = k.l7_type == "RESPONSE"
        if k.l7 == "http":
            if request:
                yield "hubble_http_requests", (*ctx, k.a, k.c, k.reporter), 0
            elif response:
                yield "hubble_http_responses", (*ctx, k.a, k.b, k.reporter), 0
        elif k.l7 == "grpc" and request:
            yield "hubble_grpc_requests", (*ctx, k.a, k.reporter), 0
        elif k.l7 == "dns":
            if request:
                yield "hubble_dns_queries", (*ctx, k.a), 0
            elif response:
                yield "hubble_dns_responses", (*ctx, k.b, k.a), 0
        elif k.l7 == "kafka" and request:
            yield "hubble_kafka_requests", (*ctx, k.c, k.a, k.reporter), 0
    if g.drops and k.drop_reason:
        yield "hubble_drop", (*ctx, k.drop_reason, k.protocol), 0
        yield "hubble_drop_bytes", (*ctx, k.drop_reason, k.protocol), 1
    if g.policies and k.match:
        yield (
            "hubble_policy_verdicts",
            (*ctx, k.direction, k.match, k.verdict.lower(), _ALLOWED.get(k.verdict, k.verdict)),
            0,
        )
        layer = "L7" if k.match.startswith("l7/") else MATCH_LAYER.get(k.match)
        if layer:
            yield "hubble_policy_match", (*ctx, k.direction, layer), 0
    if g.services and k.l7:
        svc = (k.svc_ns, k.svc, k.l7)
        if k.l7_type == "REQUEST":
            yield "hubble_service_requests", svc, 0
        elif k.l7_type == "RESPONSE" and is_error(k):
            yield "hubble_service_errors", svc, 0


def is_error(k: FlowKey) -> bool:
    """Whether an L7 response key is an error (HTTP >= 500, gRPC/Kafka status != 0, DNS SERVFAIL)."""
    if k.l7 == "http":
        return k.b.isdigit() and int(k.b) >= 500
    if k.l7 in ("grpc", "kafka"):
        return k.b not in ("", "0")
    return k.b == RCODES[2]
