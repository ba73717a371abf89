"""Hubble integration (issue 4): recorded flows through a real replay relay into the real client.

Every expected number is computed in the test from the JSON the relay serves.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from google.protobuf import json_format

from agent.hubble.client import FIELD_MASK
from agent.hubble.demo import demo_flows
from agent.hubble.proto import observer_pb2
from agent.registry import Kind
from tests.conftest_hubble import (
    FIXTURE_FILES,
    agent,
    base_config,
    by,
    expected,
    exported,
    fixture_lines,
    observed,
    relay,
    self_metric,
    settle,
    wait_for,
)

FAMILIES_ISSUE_4 = {
    "hubble_flows": Kind.COUNTER,
    "hubble_flow_bytes": Kind.COUNTER,
    "hubble_tcp_connections": Kind.COUNTER,
    "hubble_tcp_connection_duration_seconds": Kind.HISTOGRAM,
    "hubble_udp_flows": Kind.COUNTER,
    "hubble_http_requests": Kind.COUNTER,
    "hubble_http_request_duration_seconds": Kind.HISTOGRAM,
    "hubble_http_responses": Kind.COUNTER,
    "hubble_grpc_requests": Kind.COUNTER,
    "hubble_grpc_request_duration_seconds": Kind.HISTOGRAM,
    "hubble_dns_queries": Kind.COUNTER,
    "hubble_dns_responses": Kind.COUNTER,
    "hubble_kafka_requests": Kind.COUNTER,
    "hubble_drop": Kind.COUNTER,
    "hubble_drop_bytes": Kind.COUNTER,
    "hubble_policy_verdicts": Kind.COUNTER,
    "hubble_policy_match": Kind.COUNTER,
    "hubble_service_requests": Kind.COUNTER,
    "hubble_service_errors": Kind.COUNTER,
    "hubble_service_request_duration_seconds": Kind.HISTOGRAM,
    "hubble_endpoint_count": Kind.GAUGE,
    "hubble_endpoint_ready": Kind.GAUGE,
}


def _masked_size(line: dict) -> int:
    msg = json_format.ParseDict(line, observer_pb2.GetFlowsResponse(), ignore_unknown_fields=True)
    trimmed = type(msg.flow)()
    from google.protobuf.field_mask_pb2 import FieldMask

    FieldMask(paths=FIELD_MASK).MergeMessage(msg.flow, trimmed)
    msg.flow.CopyFrom(trimmed)
    return len(msg.SerializeToString())


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_recorded_flows_totals(name: str) -> None:
    lines = fixture_lines(name)
    want = expected(lines)
    with relay(name) as (_, addr), agent(base_config(addr)) as h:
        settle(h, len(lines))
        got = observed(h)
        assert got == want
        x = exported(h)
        flows = [line for line in lines if "flow" in line]
        assert sum(v for _, v in x["hubble_flows"]) == len(flows)
        assert sum(v for _, v in x["hubble_flow_bytes"]) == sum(_masked_size(line) for line in flows)
        drops = [line for line in flows if line["flow"].get("verdict") == "DROPPED"]
        assert sum(v for _, v in x.get("hubble_drop_bytes", [])) == sum(_masked_size(line) for line in drops)
        assert self_metric(h, "messages_received") == len(lines)
        assert self_metric(h, "decode_errors") == 0
        assert self_metric(h, "flow_errors") == 0


def test_every_family_exported_with_kind_and_no_total_suffix() -> None:
    with relay(demo_flows(3000)) as (_, addr), agent(base_config(addr)) as h:
        settle(h, 3000)
        fams = {f.name: f for f in h.collect()}
    for name, kind in FAMILIES_ISSUE_4.items():
        assert fams[name].kind is kind, name
        assert fams[name].samples, f"{name} has no series on the demo mix"
        assert "node" in fams[name].label_names  # cluster scope
    assert not [n for n in fams if n.endswith("_total")]


def test_demo_mix_totals_and_l7_latency() -> None:
    msgs = demo_flows(4000)
    lines = [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in msgs]
    want = expected(lines)
    assert want["kafka_topic"] and want["grpc_req"] and want["drop_reason"] and want["policy_action"]["audit"]
    with relay(msgs) as (_, addr), agent(base_config(addr)) as h:
        settle(h, len(msgs))
        assert observed(h) == want
        x = exported(h)
    responses = [ln["flow"]["l7"] for ln in lines if ln["flow"].get("l7", {}).get("type") == "RESPONSE"]
    http_lat = [r for r in responses if "http" in r and r["http"]["protocol"] == "HTTP/1.1"]
    assert sum(v for _, v in x["hubble_http_request_duration_seconds"]) == len(http_lat)
    grpc_err = sum(
        1
        for r in responses
        if "http" in r and any(h["key"] == "grpc-status" and h["value"] != "0" for h in r["http"].get("headers", []))
    )
    http_err = sum(1 for r in http_lat if r["http"]["code"] >= 500)
    kafka_err = sum(1 for r in responses if "kafka" in r and r["kafka"].get("error_code", 0))
    assert by(x["hubble_service_errors"], "protocol") == Counter(
        {k: v for k, v in {"grpc": grpc_err, "http": http_err, "kafka": kafka_err}.items() if v}
    )
    # every demo connection that is not dropped closes with one FIN, which ends its duration
    fins = sum(1 for ln in lines if ln["flow"].get("l4", {}).get("TCP", {}).get("flags", {}).get("FIN"))
    assert fins and sum(v for _, v in x["hubble_tcp_connection_duration_seconds"]) == fins


def test_namespace_filter_rule() -> None:
    name = "basic-sample-400-tcp-flows.json"
    lines = fixture_lines(name)

    def sides(ln: dict) -> list[str]:
        f = ln["flow"]
        return [ns for ns in (f.get("source", {}).get("namespace"), f.get("destination", {}).get("namespace")) if ns]

    keep = [ln for ln in lines if any(ns == "bookinfo" for ns in sides(ln))]
    with relay(name) as (_, addr), agent(base_config(addr, watch_namespaces=("bookinfo",))) as h:
        settle(h, len(lines))
        assert observed(h)["flows_verdict"] == expected(keep)["flows_verdict"]
        assert self_metric(h, "flows_filtered") == len(lines) - len(keep)
    # the seed's default exclude list drops flows whose every namespaced side is kube-system
    dns = "basic-sample-330-dns-flows.json"
    with relay(dns) as (_, addr), agent(base_config(addr, exclude_namespaces=("kube-system", "cilium"))) as h:
        settle(h, 330)
        assert self_metric(h, "flows_filtered") == 330
        assert "hubble_flows" in exported(h) and not exported(h)["hubble_flows"]


def test_metric_groups_switch_off() -> None:
    off = dict(collect_l7_flows=False, collect_drops=False, collect_policies=False, collect_services=False)
    with relay(demo_flows(500)) as (_, addr), agent(base_config(addr, **off)) as h:
        settle(h, 500)
        names = set(exported(h))
    assert "hubble_flows" in names
    assert not {n for n in names if n.startswith(("hubble_http", "hubble_dns", "hubble_drop", "hubble_policy"))}
    assert not {n for n in names if n.startswith("hubble_service")}


def test_relay_restart_counts_each_flow_once() -> None:
    name = "basic-sample-400-tcp-flows.json"
    lines = fixture_lines(name)
    want = expected(lines)
    with relay(name, rate=400) as (first, addr):
        port_addr = addr
        with agent(base_config(addr)) as h:
            wait_for(lambda: h.stream.stats.received >= 150, 20, "150 flows before the kill")
            first.stop(0)  # relay killed mid-stream
            wait_for(lambda: not h.stream.stats.connected, 10, "disconnect")
            received_before = h.stream.stats.received
            assert received_before < len(lines)
            with relay(name, listen=port_addr) as _:  # restarted on the same address, same recording
                settle(h, len(lines) + 1)
                assert h.stream.stats.reconnects >= 1
                assert observed(h) == want  # nothing twice, nothing missed
                assert self_metric(h, "flows_duplicate") >= 1  # the resume point itself was re-sent


def test_rate_limit_caps_and_counts_excess() -> None:
    msgs = demo_flows(10000)
    with relay(msgs, rate=5000) as (_, addr):
        start = time.monotonic()
        with agent(base_config(addr, max_flows_per_second=1000)) as h:
            wait_for(lambda: h.stream.stats.received >= len(msgs), 30, "all flows received")
            elapsed = time.monotonic() - start
            settle(h, 0)
            processed = h.aggregator.stats.flows_processed
            limited = self_metric(h, "flows_rate_limited")
            exported_flows = sum(v for _, v in exported(h)["hubble_flows"])
    assert processed <= 1000 * elapsed
    assert exported_flows == processed
    assert limited == len(msgs) - processed
    assert limited > 0


def test_sampling_scales_back_within_5_percent() -> None:
    msgs = demo_flows(40000)
    with relay(msgs) as (_, addr), agent(base_config(addr, flow_sample_rate=10)) as h:
        wait_for(lambda: h.stream.stats.received >= len(msgs), 60, "all flows received")
        settle(h, 0)
        total = sum(v for _, v in exported(h)["hubble_flows"])
        assert self_metric(h, "flows_sampled_out") + h.aggregator.stats.flows_processed == len(msgs)
    assert abs(total - len(msgs)) <= 0.05 * len(msgs)
    assert total % 10 == 0


def test_cardinality_cap_folds_new_series_and_keeps_totals() -> None:
    msgs = demo_flows(2000)
    with relay(msgs) as (_, addr), agent(base_config(addr, max_series_per_metric=5)) as h:
        settle(h, len(msgs))
        x = exported(h)
        (fam,) = [f for f in h.collect() if f.name == "tfo_agent_hubble_series_overflow"]
        overflow = {s.labels: s.value for s in fam.samples}
    assert len(x["hubble_flows"]) == 6  # five label sets, then the overflow series
    assert any(set(lbl.values()) == {"__overflow__"} for lbl, _ in x["hubble_flows"])
    assert sum(v for _, v in x["hubble_flows"]) == len(msgs)  # totals survive the cap
    assert overflow[("hubble_flows",)] == sum(v for lbl, v in x["hubble_flows"] if lbl["verdict"] == "__overflow__")
