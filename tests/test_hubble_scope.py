"""Hubble at fleet scale (issue 9): node scope vs cluster scope, and the replay relay's request filters."""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from agent.hubble import resolve_node_name
from agent.hubble.proto import GET_FLOWS, flow_pb2, observer_pb2
from tests.conftest_hubble import (
    agent,
    base_config,
    by,
    expected,
    exported,
    fixture_lines,
    observed,
    relay,
    settle,
)

MULTI_NODE = ["basic-sample-330-dns-flows.json", "basic-sample-348-http-flows.json"]


def _node(line: dict[str, Any]) -> str:
    return line.get("node_name") or line["flow"]["node_name"]


@pytest.mark.parametrize("name", MULTI_NODE)
def test_node_scope_agents_partition_the_cluster(name: str) -> None:
    lines = fixture_lines(name)
    nodes = sorted({_node(ln) for ln in lines})
    assert len(nodes) >= 2
    totals: Counter = Counter()
    with relay(name) as (_, addr), ExitStack() as stack:
        agents = {n: stack.enter_context(agent(base_config(addr, flow_scope="node", node_name=n))) for n in nodes}
        for node, h in agents.items():
            mine = [ln for ln in lines if _node(ln) == node]
            settle(h, len(mine))
            assert h.stream.stats.received == len(mine), node  # the relay sent only this node's flows
            assert observed(h) == expected(mine), node
            x = exported(h)
            assert "node" not in dict(x["hubble_flows"][0][0])
            totals += by(x["hubble_flows"], "verdict")
    assert totals == expected(lines)["flows_verdict"]  # nothing twice, nothing missed


@pytest.mark.parametrize("name", MULTI_NODE)
def test_cluster_scope_takes_all_and_labels_node(name: str) -> None:
    lines = fixture_lines(name)
    with relay(name) as (_, addr), agent(base_config(addr, flow_scope="cluster", node_name="anything")) as h:
        settle(h, len(lines))
        assert h.stream.node_filter is None
        assert observed(h) == expected(lines)
        x = exported(h)
        assert by(x["hubble_flows"], "node") == Counter(_node(ln) for ln in lines)
        for fam in h.collect():
            if fam.name.startswith("hubble_"):
                assert fam.label_names[0] == "node", fam.name


def test_node_name_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setenv("NODE_NAME", "from-env")
    assert resolve_node_name(base_config("x:1", node_name="from-config")) == ("from-config", "config")
    assert resolve_node_name(base_config("x:1", node_name="")) == ("from-env", "env")
    monkeypatch.delenv("NODE_NAME")
    assert resolve_node_name(base_config("x:1", node_name="")) == (socket.gethostname(), "hostname")


def _fetch(addr: str, req: Any, raw_extra: bytes = b"") -> list[observer_pb2.GetFlowsResponse]:
    with grpc.insecure_channel(addr) as ch:
        call = ch.unary_stream(
            GET_FLOWS,
            request_serializer=lambda r: r.SerializeToString() + raw_extra,
            response_deserializer=observer_pb2.GetFlowsResponse.FromString,
        )
        return list(call(req, timeout=20))


def _req(**kw: Any) -> observer_pb2.GetFlowsRequest:
    return observer_pb2.GetFlowsRequest(**kw)


def _nodes(*patterns: str) -> list[flow_pb2.FlowFilter]:
    return [flow_pb2.FlowFilter(node_name=list(patterns))]


def test_relay_filters_node_name_patterns() -> None:
    name = "basic-sample-330-dns-flows.json"
    lines = fixture_lines(name)
    per_node = Counter(_node(ln) for ln in lines)
    one = sorted(per_node)[0]
    prefix = one[:-3]  # all four share a long prefix; cut into the per-node suffix
    with relay(name) as (_, addr):
        assert len(_fetch(addr, _req(whitelist=_nodes(one)))) == per_node[one]
        want = sum(v for n, v in per_node.items() if n.startswith(prefix))
        assert 0 < len(_fetch(addr, _req(whitelist=_nodes(prefix + "*")))) == want < len(lines)
        two = sorted(per_node)[:2]
        assert len(_fetch(addr, _req(whitelist=[*_nodes(two[0]), *_nodes(two[1])]))) == sum(per_node[n] for n in two)
        assert len(_fetch(addr, _req(blacklist=_nodes(one)))) == len(lines) - per_node[one]
        assert _fetch(addr, _req(whitelist=_nodes("no-such-node"))) == []
    drops = "cilium-docs-export-drops.jsonl"  # node names carry the cluster: kind-kind/kind-worker
    with relay(drops) as (_, addr):
        for pattern, count in (("kind-kind/kind-worker", 2), ("kind-kind/", 2), ("kind-worker", 2), ("kind-*", 2),
                               ("other/", 0), ("other/kind-worker", 0), ("kind-kind/kind-w*", 2)):  # fmt: skip
            assert len(_fetch(addr, _req(whitelist=_nodes(pattern)))) == count, pattern


def test_relay_filters_namespace_verdict_number_time_and_mask() -> None:
    name = "basic-sample-400-udp-flows.json"
    lines = fixture_lines(name)
    flows = [ln["flow"] for ln in lines]
    src_bookinfo = sum(1 for f in flows if f.get("source", {}).get("namespace") == "bookinfo")
    dst_coredns = sum(
        1
        for f in flows
        if f.get("destination", {}).get("namespace") == "kube-system"
        and f["destination"].get("pod_name", "").startswith("coredns")
    )
    verdicts = Counter(f["verdict"] for f in flows)
    with relay(name) as (_, addr):
        got = _fetch(addr, _req(whitelist=[flow_pb2.FlowFilter(source_pod=["bookinfo/"])]))
        assert len(got) == src_bookinfo > 0
        got = _fetch(addr, _req(whitelist=[flow_pb2.FlowFilter(destination_pod=["kube-system/coredns"])]))
        assert len(got) == dst_coredns > 0
        got = _fetch(addr, _req(whitelist=[flow_pb2.FlowFilter(verdict=[flow_pb2.REDIRECTED])]))
        assert len(got) == verdicts["REDIRECTED"] > 0
        got = _fetch(addr, _req(blacklist=[flow_pb2.FlowFilter(verdict=[flow_pb2.FORWARDED])]))
        assert len(got) == len(flows) - verdicts["FORWARDED"]
        both = flow_pb2.FlowFilter(source_pod=["bookinfo/"], verdict=[flow_pb2.REDIRECTED])
        want = sum(
            1 for f in flows if f.get("source", {}).get("namespace") == "bookinfo" and f["verdict"] == "REDIRECTED"
        )
        assert len(_fetch(addr, _req(whitelist=[both]))) == want
        # number / first
        last = _fetch(addr, _req(number=5))
        first = _fetch(addr, _req(number=5, first=True))
        times = sorted(ln["time"] for ln in lines)
        assert [m.time.ToJsonString() for m in first] == [_norm(t) for t in times[:5]]
        assert [m.time.ToJsonString() for m in last] == [_norm(t) for t in times[-5:]]
        # since / until (inclusive)
        req = _req()
        req.since.FromJsonString(times[100])
        req.until.FromJsonString(times[199])
        assert len(_fetch(addr, req)) == 100
        req = _req(follow=True)  # a followed stream bounded by until ends after the recording
        req.until.FromJsonString(times[-1])
        assert len(_fetch(addr, req)) == len(flows)
        # field_mask: only the asked fields come back, and the message shrinks
        masked = _fetch(addr, _req(field_mask=FieldMask(paths=["time", "verdict"])))
        full = _fetch(addr, _req())
        assert len(masked) == len(full)
        assert all(not m.flow.HasField("source") and m.flow.verdict for m in masked)
        assert sum(m.ByteSize() for m in masked) < sum(m.ByteSize() for m in full) / 3
        # a field this relay does not know (number 150000) is accepted and ignored
        unknown = b"\x82\x9f\x49\x03abc"  # field 150000, length-delimited, "abc"
        assert len(_fetch(addr, _req(), raw_extra=unknown)) == len(flows)


def _norm(ts: str) -> str:
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    t.FromJsonString(ts)
    return t.ToJsonString()


def test_bench_fast_feeder_serves_the_relays_selection() -> None:
    """bench/fast_feeder.py (h2, many messages per frame) sends what the replay relay sends."""
    pytest.importorskip("h2")
    from bench.fast_feeder import FastFeeder

    name = "basic-sample-400-udp-flows.json"
    req = _req(
        blacklist=[flow_pb2.FlowFilter(verdict=[flow_pb2.FORWARDED])], field_mask=FieldMask(paths=["time", "verdict"])
    )
    with relay(name) as (r, addr):
        want = _fetch(addr, req)
        feeder = FastFeeder(r.service)
        try:
            got = _fetch(feeder.start(), req)
        finally:
            feeder.stop()
    assert got == want
    assert 0 < len(want) < len(fixture_lines(name))
    assert not want[0].flow.HasField("source")
