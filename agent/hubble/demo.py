"""Synthesised Hubble flows for the replay relay's demo mode (no cluster needed).

A small shop application on three nodes: L3/L4 TCP connections (SYN/ACK/FIN), UDP and ICMP,
drops with Cilium reasons, policy verdicts (forwarded, dropped, audit; L3/L4/L7 matches), DNS
queries and responses (NOERROR/NXDOMAIN), HTTP and gRPC requests with latencies, Kafka requests.
Deterministic for a given seed.
"""

from __future__ import annotations

import random
from typing import Callable

from google.protobuf.wrappers_pb2 import BoolValue

from agent.hubble.proto import flow_pb2, observer_pb2

F = flow_pb2
NODES = ("demo-cluster/node-a", "demo-cluster/node-b", "demo-cluster/node-c")
PODS = {
    "frontend": ("shop", "frontend-7d9f8b6c5d-x2k4p"),
    "cart": ("shop", "cart-5c8d7f9b4-q7w2e"),
    "checkout": ("shop", "checkout-6b7c8d9f5-m3n4b"),
    "payments": ("payments", "payments-api-84f6c7d9b-z9y8x"),
    "redis": ("shop", "redis-0"),
    "kafka": ("data", "kafka-broker-1"),
    "coredns": ("kube-system", "coredns-558bd4d5db-w2m67"),
}
DROP_REASONS = (F.POLICY_DENIED, F.INVALID_SOURCE_IP, F.CT_UNKNOWN_L4_PROTOCOL, F.STALE_OR_UNROUTABLE_IP)


def _ep(name: str, ip_last: int) -> tuple[flow_pb2.Endpoint, str]:
    ns, pod = PODS[name]
    labels = [f"k8s:app={name}", f"k8s:io.kubernetes.pod.namespace={ns}"]
    return F.Endpoint(ID=100 + ip_last, identity=20000 + ip_last, namespace=ns, pod_name=pod, labels=labels), (
        f"10.0.{ip_last % 3}.{ip_last}"
    )


class _Gen:
    def __init__(self, seed: int, start_ns: int) -> None:
        self.rnd = random.Random(seed)
        self.ts = start_ns
        self.port = 40000
        self.out: list[observer_pb2.GetFlowsResponse] = []

    def flow(self, src: str, dst: str, node: str, **fields: object) -> flow_pb2.Flow:
        self.ts += self.rnd.randint(20_000, 400_000)
        s, sip = _ep(src, list(PODS).index(src) + 10)
        d, dip = _ep(dst, list(PODS).index(dst) + 10)
        ip = F.IP(source=sip, destination=dip, ipVersion=F.IPv4)
        f = F.Flow(source=s, destination=d, node_name=node, IP=ip, **fields)
        f.time.FromNanoseconds(self.ts)
        self.out.append(observer_pb2.GetFlowsResponse(flow=f, node_name=node, time=f.time))
        return f

    def tcp(self, src: str, dst: str, node: str, dport: int, verdict: int = F.FORWARDED) -> None:
        self.port += 1
        common = {"Type": F.L3_L4, "event_type": F.CiliumEventType(type=4), "traffic_direction": F.EGRESS}

        def l4(reply: bool, **flags: bool) -> flow_pb2.Layer4:
            sp, dp = (dport, self.port) if reply else (self.port, dport)
            return F.Layer4(TCP=F.TCP(source_port=sp, destination_port=dp, flags=F.TCPFlags(**flags)))

        if verdict == F.DROPPED:
            reason = self.rnd.choice(DROP_REASONS)
            self.flow(src, dst, node, verdict=verdict, drop_reason_desc=reason, l4=l4(False, SYN=True), **common)
            return
        self.flow(src, dst, node, verdict=verdict, l4=l4(False, SYN=True), is_reply=_b(False), **common)
        self.flow(dst, src, node, verdict=verdict, l4=l4(True, SYN=True, ACK=True), is_reply=_b(True), **common)
        for _ in range(self.rnd.randint(1, 4)):
            self.flow(src, dst, node, verdict=verdict, l4=l4(False, ACK=True, PSH=True), is_reply=_b(False), **common)
        self.flow(src, dst, node, verdict=verdict, l4=l4(False, ACK=True, FIN=True), is_reply=_b(False), **common)

    def l7(self, src: str, dst: str, node: str, record: dict, latency_ms: float, dport: int = 80) -> None:
        l4 = F.Layer4(TCP=F.TCP(source_port=self.port, destination_port=dport))
        common = {"Type": F.L7, "event_type": F.CiliumEventType(type=129), "verdict": F.FORWARDED, "l4": l4}
        req, resp = record["request"], record["response"]
        self.flow(src, dst, node, l7=F.Layer7(type=F.REQUEST, **req), traffic_direction=F.EGRESS, **common)
        latency = int(latency_ms * 1e6)
        self.flow(dst, src, node, l7=F.Layer7(type=F.RESPONSE, latency_ns=latency, **resp), **common)

    def policy(self, src: str, dst: str, node: str) -> None:
        verdict = self.rnd.choice((F.FORWARDED, F.FORWARDED, F.DROPPED, F.AUDIT))
        extra = {"drop_reason_desc": F.POLICY_DENIED} if verdict == F.DROPPED else {}
        self.flow(
            src, dst, node, verdict=verdict, Type=F.L3_L4, event_type=F.CiliumEventType(type=5),
            policy_match_type=self.rnd.choice((1, 2, 3)), traffic_direction=F.INGRESS,
            l4=F.Layer4(TCP=F.TCP(source_port=self.port, destination_port=8080, flags=F.TCPFlags(SYN=True))),
            **extra,
        )  # fmt: skip


def _b(value: bool) -> BoolValue:
    return BoolValue(value=value)


def _http(g: _Gen) -> dict:
    method = g.rnd.choice(("GET", "GET", "GET", "POST"))
    code = g.rnd.choice((200, 200, 200, 200, 201, 404, 503))
    url = g.rnd.choice(("/", "/cart", "/api/items", "/checkout"))
    return {
        "request": {"http": F.HTTP(method=method, url=f"http://cart:8080{url}", protocol="HTTP/1.1")},
        "response": {"http": F.HTTP(method=method, code=code, url=f"http://cart:8080{url}", protocol="HTTP/1.1")},
    }


def _grpc(g: _Gen) -> dict:
    method = g.rnd.choice(("/payments.v1.Payments/Charge", "/payments.v1.Payments/Refund"))
    status = g.rnd.choice(("0", "0", "0", "0", "14", "5"))
    ct = F.HTTPHeader(key="content-type", value="application/grpc")
    return {
        "request": {
            "http": F.HTTP(method="POST", url=f"http://payments:9090{method}", protocol="HTTP/2", headers=[ct])
        },
        "response": {
            "http": F.HTTP(
                method="POST", code=200, url=f"http://payments:9090{method}", protocol="HTTP/2",
                headers=[ct, F.HTTPHeader(key="grpc-status", value=status)],
            )
        },
    }  # fmt: skip


def _dns(g: _Gen) -> dict:
    name = g.rnd.choice(("cart.shop.svc.cluster.local.", "payments.payments.svc.cluster.local.", "nope.example."))
    qtype = g.rnd.choice(("A", "A", "AAAA"))
    rcode = 3 if name.startswith("nope") else 0
    return {
        "request": {"dns": F.DNS(query=name, qtypes=[qtype], observation_source="proxy")},
        "response": {"dns": F.DNS(query=name, qtypes=[qtype], rcode=rcode, observation_source="proxy")},
    }


def _kafka(g: _Gen) -> dict:
    topic = g.rnd.choice(("orders", "payments"))
    api = g.rnd.choice(("produce", "fetch"))
    err = g.rnd.choice((0, 0, 0, 0, 6))
    return {
        "request": {"kafka": F.Kafka(api_key=api, api_version=7, topic=topic, correlation_id=1)},
        "response": {"kafka": F.Kafka(api_key=api, api_version=7, topic=topic, error_code=err, correlation_id=1)},
    }


def demo_flows(
    count: int, seed: int = 1, start_ns: int = 1_700_000_000_000_000_000
) -> list[observer_pb2.GetFlowsResponse]:
    """At least ``count`` synthesised GetFlowsResponse messages, in time order."""
    g = _Gen(seed, start_ns)
    scenarios: list[tuple[int, Callable[[str], None]]] = [
        (30, lambda n: g.tcp("frontend", "cart", n, 8080)),
        (10, lambda n: g.tcp("checkout", "redis", n, 6379)),
        (6, lambda n: g.tcp("frontend", "payments", n, 9090, verdict=F.DROPPED)),
        (8, lambda n: g.policy("frontend", "checkout", n)),
        (15, lambda n: g.l7("frontend", "cart", n, _http(g), g.rnd.uniform(1, 400), 8080)),
        (10, lambda n: g.l7("checkout", "payments", n, _grpc(g), g.rnd.uniform(2, 120), 9090)),
        (12, lambda n: g.l7("cart", "coredns", n, _dns(g), g.rnd.uniform(0.2, 8), 53)),
        (6, lambda n: g.l7("checkout", "kafka", n, _kafka(g), g.rnd.uniform(1, 50), 9092)),
        (3, lambda n: _udp(g, n)),
    ]
    weights = [w for w, _ in scenarios]
    while len(g.out) < count:
        _, make = g.rnd.choices(scenarios, weights)[0]
        make(g.rnd.choice(NODES))
    return g.out


def _udp(g: _Gen, node: str) -> None:
    l4 = F.Layer4(UDP=F.UDP(source_port=g.port, destination_port=53))
    g.flow("cart", "coredns", node, verdict=F.FORWARDED, Type=F.L3_L4, l4=l4, event_type=F.CiliumEventType(type=4))
    icmp = F.Layer4(ICMPv4=F.ICMPv4(type=8))
    g.flow("frontend", "cart", node, verdict=F.FORWARDED, Type=F.L3_L4, l4=icmp, event_type=F.CiliumEventType(type=4))
