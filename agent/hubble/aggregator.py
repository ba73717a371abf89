"""Flow aggregation: one composite key per flow, the hubble_* families derived from it per window.

Per flow the hot path only decodes the message, reads the fields the metrics need into one tuple
(a ``RawKey``: enum numbers and pods as they come) and bumps a counter for it. Once per
``aggregation_window`` the keys of the window are turned into label values, projected onto the
metric families (agent/hubble/families.py) and merged into cumulative totals, which
``families()`` returns: exported values move once per window, all together.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import deque
from typing import Any, Callable, Optional

from google.protobuf.message import DecodeError

from agent.hubble.families import (
    DROP_REASONS,
    FAMILIES,
    FORWARDING,
    GRPC_PATH,
    L7_TYPES,
    LOST_SOURCES,
    NODE_STATES,
    OVERFLOW,
    POLICY_MATCH,
    POLICY_VERDICT_EVENT,
    REPORTERS,
    RESERVED,
    Groups,
    flow_key,
    project,
    workload_of,
)
from agent.hubble.flow_view import Endpoint, GetFlowsResponseView
from agent.hubble.proto import flow_pb2
from agent.l7names import rcode_name
from agent.registry import Kind, MetricFamily

MAX_TRACKED_CONNECTIONS = 65536
MAX_ENDPOINT_PAIRS = 30000  # endpoint pairs whose labels are kept (≤ ~20 MB; the cache starts over beyond)


class Stats:
    """Self-metric counters the aggregator keeps (read by the integration's collect)."""

    def __init__(self) -> None:
        self.flows_processed = 0
        self.flows_filtered = 0
        self.flows_duplicate = 0
        self.decode_errors = 0
        self.flow_errors = 0
        self.windows = 0
        # Known label values start at 0, so that increase() and alerts see the first events too.
        self.lost_events: dict[str, int] = dict.fromkeys(LOST_SOURCES.values(), 0)
        self.node_status: dict[str, int] = {}
        self.series_overflow: dict[str, int] = dict.fromkeys(FAMILIES, 0)


def _workload(ep: flow_pb2.Endpoint) -> str:
    """The workload label of an endpoint: its first workload, else derived from the pod name,
    else (no pod) Cilium's reserved identity when it has no namespace either."""
    if ep.pod_name:
        return ep.workloads[0].name if ep.workloads else workload_of(ep.pod_name)
    return "" if ep.namespace else RESERVED.get(ep.identity, "")


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
        # (source, destination) endpoint bytes -> their namespaces, workloads and pods, or None
        # when the namespace rule skips the pair
        self._pairs: dict[tuple[bytes, bytes], Optional[tuple[str, str, str, str, str, str]]] = {}
        self._pending: dict[tuple, list[int]] = {}  # FlowKey fields -> [count, bytes]
        self._hist: dict[tuple[str, tuple[str, ...]], list] = {}
        # endpoint -> (last window seen, last window with a forwarded flow)
        self._endpoints: dict[tuple[str, str, str], tuple[int, int]] = {}
        self._window_no = 0
        self.endpoint_windows = 1  # how many recent windows make an endpoint "active"
        self._conns: dict[tuple, tuple[float, tuple[str, ...]]] = {}
        self._cum: dict[str, dict[tuple[str, ...], float]] = {n: {} for n in FAMILIES}
        self._cum_hist: dict[str, dict[tuple[str, ...], list]] = {n: {} for n in FAMILIES}
        self._published: list[MetricFamily] = []
        self._gauges: Optional[dict[str, dict[tuple[str, ...], float]]] = None  # those of _published
        self.lock = threading.Lock()  # held by whoever adds flows or closes a window
        # resume bookkeeping: highest flow time seen and the flows carrying exactly that time
        self.high_water_ns = 0
        self._at_high_water: set[bytes] = set()
        self._resuming = False

    # -- hot path ---------------------------------------------------------------------------

    def begin_resume(self) -> None:
        """A new stream starts: flows up to the high-water mark were counted already."""
        with self.lock:
            self._resuming = self.high_water_ns > 0

    def add_burst(self, pending: deque) -> None:
        """Account for (and remove) every message in ``pending``; safe beside ``publish``."""
        add, pop = self.add, pending.popleft
        with self.lock:
            while pending:
                add(pop())

    def add(self, raw: bytes) -> None:
        """Decode one GetFlowsResponse and account for it (callers other than add_burst hold ``lock``)."""
        try:
            resp = GetFlowsResponseView.FromString(raw)
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
        """For a flow no newer than the high-water mark: whether it was counted already."""
        if ts == self.high_water_ns:
            if raw in self._at_high_water:
                return self._resuming
            self._at_high_water.add(raw)
            return False
        return self._resuming

    def _endpoints_of(self, pair: tuple[bytes, bytes]) -> Optional[tuple[str, str, str, str, str, str]]:
        """(source namespace, workload, pod, destination namespace, workload, pod) of an endpoint pair,
        or None when the namespace rule skips it; derived once per pair (see flow_view)."""
        if len(self._pairs) >= MAX_ENDPOINT_PAIRS:
            self._pairs.clear()
        src, dst = Endpoint.FromString(pair[0]), Endpoint.FromString(pair[1])
        ends = None
        if self._keep_ns(src.namespace, dst.namespace):
            ends = (src.namespace, _workload(src), src.pod_name, dst.namespace, _workload(dst), dst.pod_name)
        self._pairs[pair] = ends
        return ends

    def _add_flow(self, f: Any, raw: bytes, resp_node: str) -> None:
        """Account for one flow (``f``: a FlowView, endpoints as bytes)."""
        t = f.time
        ts = t.seconds * 1_000_000_000 + t.nanos
        if ts > self.high_water_ns:  # the common case, in time order: a new high-water mark
            self.high_water_ns, self._at_high_water, self._resuming = ts, {raw}, False
        elif self._is_duplicate(ts, raw):
            self.stats.flows_duplicate += 1
            return
        pair = (f.source, f.destination)
        ends = self._pairs.get(pair, False)
        if ends is False:
            ends = self._endpoints_of(pair)
        if ends is None:
            self.stats.flows_filtered += 1
            return
        self.stats.flows_processed += 1
        src_ns, src_wl, src_pod, dst_ns, dst_wl, dst_pod = ends
        node_label = self.groups.node_label
        node = (f.node_name or resp_node) if node_label else ""
        verdict = f.verdict
        l4 = f.l4
        protocol = l4.WhichOneof("protocol") or ""
        direction = f.traffic_direction
        drop = ""
        if verdict == 2:
            drop = DROP_REASONS.get(f.drop_reason_desc) or str(f.drop_reason_desc or f.drop_reason)
        match = ""
        if f.event_type.type == POLICY_VERDICT_EVENT:
            match = POLICY_MATCH.get(f.policy_match_type) or str(f.policy_match_type)
        syn = False
        scale = self.scale
        if protocol == "TCP":
            flags = l4.TCP.flags
            if flags.SYN or flags.FIN or flags.RST:
                prefix = (node,) if node_label else ()
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
        key = (  # a RawKey (see families.py)
            node,
            src_ns,
            src_wl,
            src_pod,
            dst_ns,
            dst_wl,
            dst_pod,
            f.Type,
            verdict,
            protocol,
            l7,
            l7_type,
            a,
            b,
            c,
            direction,
            drop,
            match,
            syn,
            svc_ns,
            svc,
        )
        size = len(raw) * scale
        slot = self._pending.get(key)
        if slot is None:
            self._pending[key] = [scale, size]
        else:
            slot[0] += scale
            slot[1] += size

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
                    m = GRPC_PATH.match(http.url)
                    return "grpc", (m.group(1) if m else http.url), grpc_status, proto
            return "http", http.method, (str(http.code) if http.code else ""), proto
        if kind == "dns":
            dns = rec.dns
            return "dns", ",".join(dns.qtypes), rcode_name(dns.rcode), ""
        if kind == "kafka":
            k = rec.kafka
            return "kafka", k.api_key, str(k.error_code), k.topic
        return "", "", "", ""

    def _track_tcp(self, f: Any, flags: flow_pb2.TCPFlags, ts: int, labels: tuple[str, ...], scale: int) -> bool:
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

    def _series(self, table: dict, family: str, labels: tuple[str, ...], amount: float) -> Optional[tuple[str, ...]]:
        """The label set to book under, honouring the per-family series cap."""
        if labels in table or len(table) < self.max_series:
            return labels
        self.stats.series_overflow[family] = self.stats.series_overflow.get(family, 0) + int(amount)
        return (OVERFLOW,) * len(labels)

    def publish(self) -> None:
        """Close the window: fold its flows into the cumulative families (the reader waits only for the
        hand-over of the window's tables, not for the folding)."""
        with self.lock:
            pending, hist = self._pending, self._hist
            self._pending, self._hist = {}, {}
        node_label, groups = self.groups.node_label, self.groups
        for raw_key, (count, size) in pending.items():
            key = flow_key(raw_key)
            prefix = (key.node,) if node_label else ()
            for family, labels, which in project(groups, key):
                amount = size if which else count
                table = self._cum[family]
                labels = self._series(table, family, prefix + labels, amount)
                table[labels] = table.get(labels, 0.0) + amount
        for (family, labels), (counts, total) in hist.items():
            table = self._cum_hist[family]
            labels = self._series(table, family, labels, sum(counts))
            slot = table.setdefault(labels, [[0] * len(counts), 0.0])
            slot[0] = [x + y for x, y in zip(slot[0], counts)]
            slot[1] += total
        gauges = self._endpoint_gauges(pending)
        if pending or hist or gauges != self._gauges:  # else the families stay the same objects
            self._published, self._gauges = self._build(gauges), gauges
        self.stats.windows += 1

    def _endpoint_gauges(self, pending: dict) -> dict[str, dict[tuple[str, ...], float]]:
        """hubble_endpoint_count/_ready after the closing window's flows (``pending``); forgets the
        endpoints no longer active."""
        w = self._window_no
        eps = self._endpoints
        for node, src_ns, _, src_pod, dst_ns, _, dst_pod, _, verdict, *_ in pending:
            for ns, pod in ((src_ns, src_pod), (dst_ns, dst_pod)):
                if pod:
                    k = (node, ns, pod)
                    eps[k] = (w, w if verdict in FORWARDING else eps.get(k, (0, -1))[1])
        count: dict[tuple[str, ...], float] = {}
        ready: dict[tuple[str, ...], float] = {}
        oldest = w - self.endpoint_windows + 1
        self._endpoints = {k: v for k, v in eps.items() if v[0] >= oldest}
        node_label = self.groups.node_label
        for (node, ns, _pod), (_seen, fwd) in self._endpoints.items():
            labels = (node, ns) if node_label else (ns,)
            count[labels] = count.get(labels, 0) + 1
            ready[labels] = ready.get(labels, 0) + (fwd >= oldest)
        self._window_no += 1
        return {"hubble_endpoint_count": count, "hubble_endpoint_ready": ready}

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
            fam = MetricFamily(name, kind, help_text, node + labels, static=True)
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
        """The hubble_* families as of the last closed window: the same objects until the next one
        (``static``), so exporters may keep what they derive from them."""
        return list(self._published)
