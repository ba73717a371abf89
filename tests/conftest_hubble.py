"""Helpers for the Hubble tests: fixtures in place, a replay relay on loopback, the real integration,
and expected metric totals computed straight from Hubble's JSON (independently of the agent)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import trustme

from agent.config import CiliumConfig
from agent.hubble import HubbleIntegration
from agent.hubble.client import Backoff
from agent.hubble.replay import ReplayRelay, TlsFiles, load_flows, to_records
from agent.registry import HistogramSample

FIXTURES = Path(__file__).resolve().parents[2] / "shared/fixtures/hubble"
SERVER_NAME = "relay.hubble-relay.cilium.io"  # the default hubble_tls_server_name
FIXTURE_FILES = sorted(p.name for p in FIXTURES.glob("*.json*"))
RCODE = {0: "No Error", 2: "Server Failure", 3: "Non-Existent Domain"}


def fixture_lines(name: str) -> list[dict[str, Any]]:
    """The JSON objects of a fixture file, one per line."""
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


def make_pki(directory: Path) -> dict[str, str]:
    """A CA and PEM files in ``directory``: ``ca``, and ``*_crt``/``*_key`` for the relay's certificate
    (``server``, issued for SERVER_NAME), one for another name (``wrong``) and a client's (``client``)."""
    ca = trustme.CA()
    files = {"ca": directory / "ca.crt"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for name, host in (("server", SERVER_NAME), ("wrong", "other.example.com"), ("client", "tfo-agent.client")):
        cert = ca.issue_cert(host)
        files[f"{name}_crt"] = directory / f"{name}.crt"
        files[f"{name}_key"] = directory / f"{name}.key"
        files[f"{name}_crt"].write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(files[f"{name}_key"]))
    return {k: str(v) for k, v in files.items()}


def tls_config(address: str, pki: dict[str, str], **kw: Any) -> CiliumConfig:
    """A test config with mTLS: the PKI's CA and client certificate, SERVER_NAME checked."""
    files = {"hubble_tls_ca": pki["ca"], "hubble_tls_cert": pki["client_crt"], "hubble_tls_key": pki["client_key"]}
    return base_config(address, hubble_tls_enabled=True, hubble_tls_server_name=SERVER_NAME, **{**files, **kw})


def base_config(address: str, **kw: Any) -> CiliumConfig:
    """A test config: plaintext, all namespaces, short window, generous limits."""
    defaults: dict[str, Any] = dict(
        enabled=True,
        hubble_address=address,
        hubble_tls_enabled=False,
        exclude_namespaces=(),
        aggregation_window=0.2,
        flow_buffer_size=1_000_000,
        max_flows_per_second=10_000_000,
        flow_scope="cluster",
    )
    defaults.update(kw)
    return CiliumConfig(**defaults)


@contextmanager
def relay(
    messages: Any, listen: str = "127.0.0.1:0", tls: Optional[TlsFiles] = None, **kw: Any
) -> Iterator[tuple[ReplayRelay, str]]:
    """A replay relay serving ``messages`` (a fixture name or GetFlowsResponse list)."""
    if isinstance(messages, str):
        messages = load_flows(str(FIXTURES / messages))
    r = ReplayRelay(to_records(messages), **kw)
    addr = r.start(listen, tls)
    try:
        yield r, addr
    finally:
        r.stop(0)


@contextmanager
def agent(cfg: CiliumConfig) -> Iterator[HubbleIntegration]:
    """The real integration, started, with fast reconnects; stopped afterwards."""
    h = HubbleIntegration(cfg)
    h.stream.backoff = Backoff(initial=0.05, maximum=0.3)
    h.start()
    try:
        yield h
    finally:
        h.stop()


def wait_for(pred: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``pred`` until true (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def settle(h: HubbleIntegration, flows: int, timeout: float = 30.0) -> None:
    """Wait until ``flows`` flow messages were handled and one more window was published."""
    agg = h.aggregator.stats

    def handled() -> int:
        return agg.flows_processed + agg.flows_filtered + agg.flows_duplicate + agg.decode_errors

    wait_for(lambda: handled() >= flows and not h.queue, timeout, f"{flows} flows handled")
    w = agg.windows
    wait_for(lambda: agg.windows >= w + 2, timeout, "a window after the flows")


def exported(h: HubbleIntegration) -> dict[str, list[tuple[dict[str, str], float]]]:
    """family -> [(labels, value)] from collect(); histograms give their count."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in h.collect():
        rows = out.setdefault(fam.name, [])
        for s in fam.samples:
            value = s.count if isinstance(s, HistogramSample) else s.value
            rows.append((dict(zip(fam.label_names, s.labels)), value))
    return out


def by(rows: list[tuple[dict[str, str], float]], *labels: str) -> Counter:
    """Sum a family's values grouped by the given labels (a single label groups by its value)."""
    c: Counter = Counter()
    for lbl, value in rows:
        key = lbl[labels[0]] if len(labels) == 1 else tuple(lbl[x] for x in labels)
        c[key] += value
    return +c


def self_metric(h: HubbleIntegration, name: str) -> float:
    """The value of an unlabelled tfo_agent_hubble_* self-metric."""
    for fam in h.collect():
        if fam.name == f"tfo_agent_hubble_{name}":
            return sum(s.value for s in fam.samples)
    raise KeyError(name)


def expected(lines: list[dict[str, Any]]) -> dict[str, Counter]:
    """Metric totals computed from Hubble JSON lines, following the rules in the README (Cilium Hubble)."""
    e: dict[str, Counter] = {
        k: Counter()
        for k in (
            "flows_verdict", "flows_protocol", "udp", "tcp_conn", "http_req_method", "http_resp_status",
            "grpc_req", "dns_q_qtypes", "dns_r_rcode", "kafka_topic", "drop_reason", "policy_action",
            "policy_match", "service_requests", "endpoints", "lost",
        )
    }  # fmt: skip
    pods = set()
    for line in lines:
        if "lost_events" in line:
            ev = line["lost_events"]
            e["lost"][ev.get("source", "UNKNOWN_LOST_EVENT_SOURCE")] += int(ev.get("num_events_lost", 0))
            continue
        f = line["flow"]
        verdict = f.get("verdict", "VERDICT_UNKNOWN")
        e["flows_verdict"][verdict] += 1
        l4 = f.get("l4", {})
        proto = next(iter(l4), "")
        e["flows_protocol"][proto] += 1
        if proto == "UDP":
            e["udp"][verdict] += 1
        flags = l4.get("TCP", {}).get("flags", {})
        reply = f.get("is_reply", f.get("reply", False))
        if flags.get("SYN") and not flags.get("ACK") and not reply:
            e["tcp_conn"][verdict] += 1
        if verdict == "DROPPED":
            e["drop_reason"][str(f.get("drop_reason_desc", "DROP_REASON_UNKNOWN"))] += 1
        policy_event = f.get("event_type", {}).get("type") == 5
        if policy_event:
            e["policy_action"][verdict.lower()] += 1
            match = f.get("policy_match_type", 0)
            layer = {1: "L3", 4: "L3", 2: "L4", 3: "L4", 5: "L4", 6: "L4"}.get(match)
            if layer:
                e["policy_match"][layer] += 1
        l7 = f.get("l7")
        if l7:
            typ = l7.get("type")
            http, dns, kafka = l7.get("http"), l7.get("dns"), l7.get("kafka")
            grpc = http and any(
                h["key"].lower() == "content-type" and h["value"].startswith("application/grpc")
                for h in http.get("headers", [])
            )
            if typ == "REQUEST":
                kind = "grpc" if grpc else "http" if http else "dns" if dns else "kafka"
                e["service_requests"][kind] += 1
                if not policy_event:
                    e["policy_action"][verdict.lower()] += 1
                    e["policy_match"]["L7"] += 1
            if grpc:
                if typ == "REQUEST":
                    e["grpc_req"][http["url"].split(":9090", 1)[-1]] += 1
            elif http:
                if typ == "REQUEST":
                    e["http_req_method"][http["method"]] += 1
                elif typ == "RESPONSE":
                    e["http_resp_status"][str(http["code"])] += 1
            elif dns:
                if typ == "REQUEST":
                    e["dns_q_qtypes"][",".join(dns.get("qtypes", []))] += 1
                elif typ == "RESPONSE":
                    e["dns_r_rcode"][RCODE[dns.get("rcode", 0)]] += 1
            elif kafka and typ == "REQUEST":
                e["kafka_topic"][kafka["topic"]] += 1
        node = f.get("node_name") or line.get("node_name", "")
        for side in ("source", "destination"):
            ep = f.get(side, {})
            if ep.get("pod_name"):
                pods.add((node, ep.get("namespace", ""), ep["pod_name"]))
    e["endpoints"] = Counter(ns for _, ns, _ in pods)
    return {k: +v for k, v in e.items()}


def observed(h: HubbleIntegration) -> dict[str, Counter]:
    """The same totals as ``expected``, read from the integration's exported families."""
    x = exported(h)
    lost = Counter()
    for fam in h.collect():
        if fam.name == "tfo_agent_hubble_lost_events":
            lost = Counter({s.labels[0]: s.value for s in fam.samples})
    out = {
        "flows_verdict": by(x["hubble_flows"], "verdict"),
        "flows_protocol": by(x["hubble_flows"], "protocol"),
        "udp": by(x["hubble_udp_flows"], "verdict"),
        "tcp_conn": by(x["hubble_tcp_connections"], "verdict"),
        "http_req_method": by(x["hubble_http_requests"], "method"),
        "http_resp_status": by(x["hubble_http_responses"], "status"),
        "grpc_req": by(x["hubble_grpc_requests"], "grpc_method"),
        "dns_q_qtypes": by(x["hubble_dns_queries"], "qtypes"),
        "dns_r_rcode": by(x["hubble_dns_responses"], "rcode"),
        "kafka_topic": by(x["hubble_kafka_requests"], "topic"),
        "drop_reason": by(x["hubble_drop"], "reason"),
        "policy_action": by(x["hubble_policy_verdicts"], "action"),
        "policy_match": by(x["hubble_policy_match"], "type"),
        "service_requests": by(x["hubble_service_requests"], "protocol"),
        "endpoints": by(x["hubble_endpoint_count"], "namespace"),
        "lost": +lost,
    }
    return out
