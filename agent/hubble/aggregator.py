"""Flow aggregation: one composite key per flow, the hubble_* families derived from it per window.

Per flow the hot path only decodes the message, reads the fields the metrics need into one tuple
(``FlowKey``) and bumps a counter for it. Once per ``aggregation_window`` the keys of the window are
projected onto the metric families and merged into cumulative totals, which ``families()`` returns:
exported values move once per window, all together.
"""

from __future__ import annotations

import re
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

from google.protobuf.message import DecodeError

from agent.hubble.proto import enum_names, flow_pb2, observer_pb2, relay_pb2
from agent.registry import Kind, MetricFamily

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
# Cilium's DNS rcode label values.
RCODES = {
    0: "No Error",
    1: "Format Error",
    2: "Server Failure",
    3: "Non-Existent Domain",
    4: "Not Implemented",
    5: "Query Refused",
}
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
MAX_TRACKED_CONNECTIONS = 65536
_POD_SUFFIX = (re.compile(r"^(.+)-[a-z0-9]{6,10}-[a-z0-9]{5}$"), re.compile(r"^(.+)-(?:[a-z0-9]{5}|\d+)$"))
_GRPC_PATH = re.compile(r"^(?:[a-z]+://[^/]*)?(/[\w.]+/\w+)")


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


def rcode_name(code: int) -> str:
    """DNS rcode as Cilium labels it; unknown codes as their number."""
    return RCODES.get(code) or str(code)


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


class Stats:
    """Self-metric counters the aggregator keeps (read by the integration's collect)."""

    def __init__(self) -> None:
        self.flows_processed = 0
        self.flows_filtered = 0
        self.flows_duplicate = 0
        self.decode_errors = 0
        self.flow_errors = 0
        self.windows = 0
        self.lost_events: dict[str, int] = {}
        self.node_status: dict[str, int] = {}
        self.series_overflow: dict[str, int] = {}


class Aggregator:
    """Turns raw ``GetFlowsResponse`` bytes into window-aggregated hubble_* families."""

    def __init__(
        self, groups: Groups, keep_ns: Callable[[str, str], bool], scale: int = 1, max_series: int = 10000
    ) -> None:
        self.groups = groups
        self.scale = scale
        self.max_series = max_series
        self.stats = Stats()
        self._keep_ns = keep_ns
        self._keep_cache: dict[tuple[str, str], bool] = {}
        self._wl_cache: dict[str, str] = {}
        self._pending: dict[tuple, list[int]] = {}  # FlowKey fields -> [count, bytes]
        self._hist: dict[tuple[str, tuple[str, ...]], list] = {}
        # endpoint -> (last window seen, last window with a forwarded flow)
        self._endpoints: dict[tuple[str, str, str], tuple[int, int]] = {}
        self._window_no = 0
        self.endpoint_windows = 1  # how many recent windows make an endpoint "active"
        self._conns: dict[tuple, tuple[float, tuple[str, ...]]] = {}
        self._cum: dict[str, dict[tuple[str, ...], float]] = {n: {} for n in FAMILIES}
        self._cum_hist: dict[str, dict[tuple[str, ...], list]] = {n: {} for n in FAMILIES}
        self._gauges: dict[str, dict[tuple[str, ...], float]] = {}
        self._published: list[MetricFamily] = []
        self._lock = threading.Lock()
        # resume bookkeeping: highest flow time seen and the flows carrying exactly that time
        self.high_water_ns = 0
        self._at_high_water: set[bytes] = set()
        self._resuming = False

    # -- hot path ---------------------------------------------------------------------------

    def begin_resume(self) -> None:
        """A new stream starts: flows up to the high-water mark were counted already."""
        self._resuming = self.high_water_ns > 0

    def add(self, raw: bytes) -> None:
        """Decode one GetFlowsResponse and account for it."""
        try:
            resp = observer_pb2.GetFlowsResponse.FromString(raw)
        except DecodeError:
            self.stats.decode_errors += 1
            return
        which = resp.WhichOneof("response_types")
        if which == "flow":
            try:
                self._add_flow(resp.flow, raw, resp.node_name)
            except Exception:  # a flow this code cannot handle must not stop the aggregation
                self.stats.flow_errors += 1
        elif which == "lost_events":
            lost = resp.lost_events
            src = LOST_SOURCES.get(lost.source) or str(lost.source)
            self.stats.lost_events[src] = self.stats.lost_events.get(src, 0) + lost.num_events_lost
        elif which == "node_status":
            state = NODE_STATES.get(resp.node_status.state_change) or str(resp.node_status.state_change)
            self.stats.node_status[state] = self.stats.node_status.get(state, 0) + 1

    def _is_duplicate(self, ts: int, raw: bytes) -> bool:
        hw = self.high_water_ns
        if ts > hw:
            self.high_water_ns = ts
            self._at_high_water = {raw}
            self._resuming = False
            return False
        if ts == hw:
            if raw in self._at_high_water:
                return self._resuming
            self._at_high_water.add(raw)
            return False
        return self._resuming

    def _endpoint(self, ep: flow_pb2.Endpoint) -> tuple[str, str, str]:
        ns = ep.namespace
        pod = ep.pod_name
        if pod:
            wls = ep.workloads
            if wls:
                return ns, wls[0].name, pod
            wl = self._wl_cache.get(pod)
            if wl is None:
                if len(self._wl_cache) > 100000:
                    self._wl_cache.clear()
                wl = self._wl_cache[pod] = workload_of(pod)
            return ns, wl, pod
        return ns, ("" if ns else RESERVED.get(ep.identity, "")), ""

    def _add_flow(self, f: flow_pb2.Flow, raw: bytes, resp_node: str) -> None:
        t = f.time
        ts = t.seconds * 1_000_000_000 + t.nanos
        if self._is_duplicate(ts, raw):
            self.stats.flows_duplicate += 1
            return
        src_ns, src_wl, src_pod = self._endpoint(f.source)
        dst_ns, dst_wl, dst_pod = self._endpoint(f.destination)
        pair = (src_ns, dst_ns)
        keep = self._keep_cache.get(pair)
        if keep is None:
            keep = self._keep_cache[pair] = self._keep_ns(src_ns, dst_ns)
        if not keep:
            self.stats.flows_filtered += 1
            return
        self.stats.flows_processed += 1
        node = (f.node_name or resp_node) if self.groups.node_label else ""
        verdict = VERDICTS.get(f.verdict) or str(f.verdict)
        l4 = f.l4
        protocol = l4.WhichOneof("protocol") or ""
        direction = f.traffic_direction
        ftype = FLOW_TYPES.get(f.Type) or str(f.Type)
        drop = ""
        if f.verdict == 2:
            drop = DROP_REASONS.get(f.drop_reason_desc) or str(f.drop_reason_desc or f.drop_reason)
        match = ""
        if f.event_type.type == POLICY_VERDICT_EVENT:
            match = POLICY_MATCH.get(f.policy_match_type) or str(f.policy_match_type)
        syn = False
        scale = self.scale
        if protocol == "TCP":
            flags = l4.TCP.flags
            if flags.SYN or flags.FIN or flags.RST:
                prefix = (node,) if self.groups.node_label else ()
                syn = self._track_tcp(f, flags, ts, (*prefix, src_ns, src_wl, dst_ns, dst_wl), scale)
        l7 = l7_type = a = b = c = svc_ns = svc = ""
        if f.HasField("l7"):
            rec = f.l7
            l7_type = L7_TYPES.get(rec.type) or str(rec.type)
            l7, a, b, c = self._l7(rec)
            if l7:
                if l7_type == "REQUEST" and not match:
                    match = "l7/" + ("http" if l7 == "grpc" else l7)
                reply = l7_type == "RESPONSE"
                ep = f.source_service if reply else f.destination_service
                svc_ns, svc = (ep.namespace, ep.name) if ep.name else ((src_ns, src_wl) if reply else (dst_ns, dst_wl))
                latency = rec.latency_ns
                if latency and reply:
                    self._observe_latency(
                        l7,
                        (src_ns, src_wl, dst_ns, dst_wl),
                        a,
                        b,
                        REPORTERS.get(direction, "unknown"),
                        (svc_ns, svc, l7),
                        latency / 1e9,
                        node,
                        scale,
                    )
        key = (  # a plain tuple in FlowKey's field order: cheaper than the NamedTuple per flow
            node,
            src_ns,
            src_wl,
            dst_ns,
            dst_wl,
            ftype,
            verdict,
            protocol,
            l7,
            l7_type,
            a,
            b,
            c,
            REPORTERS.get(direction, "unknown"),
            drop,
            match,
            DIRECTIONS.get(direction, "unknown"),
            syn,
            svc_ns,
            svc,
        )
        slot = self._pending.get(key)
        if slot is None:
            self._pending[key] = [scale, len(raw) * scale]
        else:
            slot[0] += scale
            slot[1] += len(raw) * scale
        if src_pod or dst_pod:
            w = self._window_no
            ok = verdict in ("FORWARDED", "REDIRECTED", "TRANSLATED")
            eps = self._endpoints
            for ns, pod in ((src_ns, src_pod), (dst_ns, dst_pod)):
                if pod:
                    k = (node, ns, pod)
                    eps[k] = (w, w if ok else eps.get(k, (0, -1))[1])

    @staticmethod
    def _l7(rec: flow_pb2.Layer7) -> tuple[str, str, str, str]:
        kind = rec.WhichOneof("record")
        if kind == "http":
            http = rec.http
            proto = http.protocol
            if proto.startswith("HTTP/2"):
                grpc_status = ""
                is_grpc = False
                for h in http.headers:
                    k = h.key.lower()
                    if k == "content-type" and h.value.startswith("application/grpc"):
                        is_grpc = True
                    elif k == "grpc-status":
                        grpc_status = h.value
                if is_grpc:
                    m = _GRPC_PATH.match(http.url)
                    return "grpc", (m.group(1) if m else http.url), grpc_status, proto
            return "http", http.method, (str(http.code) if http.code else ""), proto
        if kind == "dns":
            dns = rec.dns
            return "dns", ",".join(dns.qtypes), rcode_name(dns.rcode), ""
        if kind == "kafka":
            k = rec.kafka
            return "kafka", k.api_key, str(k.error_code), k.topic
        return "", "", "", ""

    def _track_tcp(
        self, f: flow_pb2.Flow, flags: flow_pb2.TCPFlags, ts: int, labels: tuple[str, ...], scale: int
    ) -> bool:
        ip, tcp = f.IP, f.l4.TCP
        fwd = (ip.source, tcp.source_port, ip.destination, tcp.destination_port)
        if flags.SYN and not flags.ACK:
            is_reply = f.is_reply.value if f.HasField("is_reply") else f.reply
            if is_reply:
                return False
            if fwd not in self._conns:
                if len(self._conns) >= MAX_TRACKED_CONNECTIONS:
                    del self._conns[next(iter(self._conns))]
                self._conns[fwd] = (ts / 1e9, labels)
            return True
        if flags.FIN or flags.RST:
            start = self._conns.pop(fwd, None) or self._conns.pop((fwd[2], fwd[3], fwd[0], fwd[1]), None)
            if start is not None and self.groups.flows:
                self._hist_add("hubble_tcp_connection_duration_seconds", start[1], ts / 1e9 - start[0], scale)
        return False

    def _observe_latency(
        self,
        l7: str,
        ctx: tuple[str, ...],
        a: str,
        b: str,
        reporter: str,
        svc: tuple[str, str, str],
        seconds: float,
        node: str,
        scale: int,
    ) -> None:
        n = (node,) if self.groups.node_label else ()
        if self.groups.l7:
            if l7 == "http":
                self._hist_add("hubble_http_request_duration_seconds", n + ctx + (a, reporter), seconds, scale)
            elif l7 == "grpc":
                self._hist_add("hubble_grpc_request_duration_seconds", n + ctx + (a, b, reporter), seconds, scale)
        if self.groups.services and l7 in ("http", "grpc", "kafka"):
            self._hist_add("hubble_service_request_duration_seconds", n + svc, seconds, scale)

    def _hist_add(self, family: str, labels: tuple[str, ...], value: float, scale: int) -> None:
        slot = self._hist.get((family, labels))
        if slot is None:
            slot = self._hist[(family, labels)] = [[0] * (len(FAMILIES[family][4]) + 1), 0.0]
        slot[0][bisect_left(FAMILIES[family][4], value)] += scale
        slot[1] += value * scale

    # -- once per window ----------------------------------------------------------------------

    def _project(self, k: FlowKey) -> Iterator[tuple[str, tuple[str, ...], int]]:
        """(family, labels, which value: 0 count / 1 bytes) for every family a key counts in."""
        g = self.groups
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
            elif k.l7_type == "RESPONSE" and _is_error(k):
                yield "hubble_service_errors", svc, 0

    def _series(self, table: dict, family: str, labels: tuple[str, ...], amount: float) -> Optional[tuple[str, ...]]:
        """The label set to book under, honouring the per-family series cap."""
        if labels in table or len(table) < self.max_series:
            return labels
        self.stats.series_overflow[family] = self.stats.series_overflow.get(family, 0) + int(amount)
        return (OVERFLOW,) * len(labels)

    def publish(self) -> None:
        """Close the window: fold its flows into the cumulative families, atomically."""
        node_label = self.groups.node_label
        for raw_key, (count, size) in self._pending.items():
            key = FlowKey._make(raw_key)
            prefix = (key.node,) if node_label else ()
            for family, labels, which in self._project(key):
                amount = size if which else count
                table = self._cum[family]
                labels = self._series(table, family, prefix + labels, amount)
                table[labels] = table.get(labels, 0.0) + amount
        for (family, labels), (counts, total) in self._hist.items():
            table = self._cum_hist[family]
            labels = self._series(table, family, labels, sum(counts))
            slot = table.setdefault(labels, [[0] * len(counts), 0.0])
            slot[0] = [x + y for x, y in zip(slot[0], counts)]
            slot[1] += total
        count: dict[tuple[str, ...], float] = {}
        ready: dict[tuple[str, ...], float] = {}
        oldest = self._window_no - self.endpoint_windows + 1
        self._endpoints = {k: v for k, v in self._endpoints.items() if v[0] >= oldest}
        for (node, ns, _pod), (_seen, fwd) in self._endpoints.items():
            labels = (node, ns) if node_label else (ns,)
            count[labels] = count.get(labels, 0) + 1
            ready[labels] = ready.get(labels, 0) + (fwd >= oldest)
        self._pending = {}
        self._hist = {}
        self._window_no += 1
        gauges = {"hubble_endpoint_count": count, "hubble_endpoint_ready": ready}
        families = self._build(gauges)
        with self._lock:
            self._published = families
            self.stats.windows += 1

    def _build(self, gauges: dict[str, dict[tuple[str, ...], float]]) -> list[MetricFamily]:
        groups = {
            "flows": self.groups.flows,
            "l7": self.groups.l7,
            "drops": self.groups.drops,
            "policies": self.groups.policies,
            "services": self.groups.services,
        }
        node = ("node",) if self.groups.node_label else ()
        out = []
        for name, (kind, help_text, labels, group, buckets) in FAMILIES.items():
            if not groups[group]:
                continue
            fam = MetricFamily(name, kind, help_text, node + labels)
            if kind is Kind.HISTOGRAM:
                for lbl, (counts, total) in sorted(self._cum_hist[name].items()):
                    fam.add_histogram(lbl, buckets, counts, total)
            else:
                source = gauges.get(name, self._cum[name]) if kind is Kind.GAUGE else self._cum[name]
                for lbl, value in sorted(source.items()):
                    fam.add(lbl, value)
            out.append(fam)
        return out

    def families(self) -> list[MetricFamily]:
        """The hubble_* families as of the last closed window."""
        with self._lock:
            return [MetricFamily(f.name, f.kind, f.help, f.label_names, list(f.samples)) for f in self._published]


def _is_error(k: FlowKey) -> bool:
    if k.l7 == "http":
        return k.b.isdigit() and int(k.b) >= 500
    if k.l7 in ("grpc", "kafka"):
        return k.b not in ("", "0")
    return k.b == RCODES[2]
