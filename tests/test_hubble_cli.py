"""Issue 13: the hubble CLI against `tfo-agent hubble replay`, and `tfo-agent check` doing `hubble status`.

The hubble binary is not available here; `HubbleCli` is a real gRPC client sending exactly what the
CLI 1.19 sends: the health Check for hubble.server.Observer then ServerStatus (`hubble status`),
GetFlows with the compact output's field mask (`hubble observe`), GetNodes and GetNamespaces
(`hubble list nodes|namespaces`). Expected values are computed from the fixtures' JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from agent.hubble import replay
from agent.hubble.proto import (
    GET_FLOWS,
    GET_NAMESPACES,
    GET_NODES,
    HEALTH_CHECK,
    HEALTH_WATCH,
    SERVER_STATUS,
    flow_pb2,
    health_pb2,
    observer_pb2,
    relay_pb2,
)
from agent.hubble.replay import TlsFiles
from agent.hubble.status import NO_FLOWS, REFUSED, TLS_FAILED, hubble_checks
from tests.conftest import ROOT, free_port
from tests.conftest_hubble import (
    FIXTURE_FILES,
    SERVER_NAME,
    base_config,
    fixture_lines,
    make_pki,
    relay,
    tls_config,
    wait_for,
)

# What `hubble observe` sends with its default (compact) output, and with dict/table output.
COMPACT_MASK = [
    "time", "verdict", "ethernet", "IP", "l4", "source.identity", "source.namespace", "source.pod_name",
    "destination.identity", "destination.namespace", "destination.pod_name", "Type", "node_name", "l7",
    "event_type", "source_service", "destination_service", "is_reply", "Summary", "ip_trace_id",
]  # fmt: skip

# Top-level fields of Cilium 1.19's flow.Flow with their numbers: the relay must hold them all.
CILIUM_1_19_FLOW = {
    "time": 1, "verdict": 2, "drop_reason": 3, "ethernet": 4, "IP": 5, "l4": 6, "source": 8, "destination": 9,
    "Type": 10, "node_name": 11, "source_names": 13, "destination_names": 14, "l7": 15, "reply": 16,
    "event_type": 19, "source_service": 20, "destination_service": 21, "traffic_direction": 22,
    "policy_match_type": 23, "trace_observation_point": 24, "drop_reason_desc": 25, "is_reply": 26,
    "debug_capture_point": 27, "interface": 28, "proxy_port": 29, "trace_context": 30, "sock_xlate_point": 31,
    "socket_cookie": 32, "cgroup_id": 33, "uuid": 34, "auth_type": 35, "trace_reason": 36, "node_labels": 37,
    "file": 38, "tunnel": 39, "ip_trace_id": 40, "emitter": 41, "egress_allowed_by": 21001,
    "ingress_allowed_by": 21002, "egress_denied_by": 21004, "ingress_denied_by": 21005, "policy_log": 21006,
    "aggregate": 21007, "Summary": 100000, "extensions": 150000,
}  # fmt: skip

# Synthetic (no recording with them is available): lines as Cilium 1.19 writes them, carrying the
# fields added since the fixtures were recorded, in `hubble observe -o json` form.
NEW_CILIUM_LINES: list[dict[str, Any]] = [
    {
        "flow": {
            "time": "2026-03-02T10:00:00.123456789Z",
            "uuid": "0b4f3f52-6a43-4b55-9d0c-2f8e3e6f2b11",
            "emitter": {"name": "Hubble", "version": "1.19.4"},
            "verdict": "FORWARDED",
            "auth_type": "SPIRE",
            "ethernet": {"source": "aa:bb:cc:00:00:01", "destination": "aa:bb:cc:00:00:02"},
            "IP": {"source": "10.0.1.5", "destination": "10.0.2.7", "ipVersion": "IPv4", "source_xlated": "10.9.9.9"},
            "l4": {"TCP": {"source_port": 43210, "destination_port": 8080, "flags": {"SYN": True}}},
            "tunnel": {
                "protocol": "VXLAN",
                "IP": {"source": "172.18.0.2", "destination": "172.18.0.3", "ipVersion": "IPv4"},
                "l4": {"UDP": {"source_port": 50000, "destination_port": 8472}},
            },
            "source": {
                "ID": 1234,
                "identity": 5678,
                "cluster_name": "prod",
                "namespace": "default",
                "labels": ["k8s:app=client"],
                "pod_name": "client-7d9f8-abcde",
                "workloads": [{"name": "client", "kind": "Deployment"}],
            },
            "destination": {"identity": 9012, "cluster_name": "prod", "namespace": "shop", "pod_name": "api-0"},
            "Type": "L3_L4",
            "node_name": "prod/worker-1",
            "node_labels": ["kubernetes.io/hostname=worker-1"],
            "event_type": {"type": 4, "sub_type": 3},
            "traffic_direction": "EGRESS",
            "trace_observation_point": "TO_OVERLAY",
            "trace_reason": "NEW",
            "file": {"name": "bpf_lxc.c", "line": 1234},
            "is_reply": False,
            "interface": {"index": 7, "name": "eth0"},
            "socket_cookie": "18446744073709551615",
            "ip_trace_id": {"trace_id": "1234567890123", "ip_option_type": 136},
            "egress_allowed_by": [
                {
                    "name": "allow-client",
                    "namespace": "default",
                    "labels": ["k8s:io.cilium.k8s.policy.name=allow-client"],
                    "revision": "7",
                    "kind": "CiliumNetworkPolicy",
                }
            ],
            "policy_log": ["allow-client"],
            "aggregate": {"egress_flow_count": 3},
            "Summary": "TCP Flags: SYN",
        },
        "node_name": "prod/worker-1",
        "time": "2026-03-02T10:00:00.123456789Z",
    },
    {
        "flow": {
            "time": "2026-03-02T10:00:01Z",
            "verdict": "DROPPED",
            "drop_reason": 204,
            "drop_reason_desc": "DROP_NO_EGRESS_IP",
            "IP": {"source": "fd00::5", "destination": "fd00::9", "ipVersion": "IPv6"},
            "l4": {"VRRP": {"type": 1, "vrid": 4, "priority": 100}},
            "source": {"namespace": "shop", "pod_name": "api-0"},
            "node_name": "prod/worker-2",
            "ingress_denied_by": [{"name": "deny-all", "namespace": "shop", "kind": "CiliumNetworkPolicy"}],
        },
        "node_name": "prod/worker-2",
        "time": "2026-03-02T10:00:01Z",
    },
    {
        "lost_events": {
            "source": "HUBBLE_RING_BUFFER",
            "num_events_lost": "12",
            "first": "2026-03-02T10:00:01.500Z",
            "last": "2026-03-02T10:00:01.750Z",
        },
        "node_name": "prod/worker-1",
        "time": "2026-03-02T10:00:02Z",
    },
]


class HubbleCli:
    """The calls the hubble CLI 1.19 makes, over one real gRPC channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel

    def _unary(self, method: str, req: Any, resp_type: Any) -> Any:
        call = self.channel.unary_unary(
            method, request_serializer=type(req).SerializeToString, response_deserializer=resp_type.FromString
        )
        return call(req, timeout=10)

    def health(self, service: str = "hubble.server.Observer") -> Any:
        return self._unary(HEALTH_CHECK, health_pb2.HealthCheckRequest(service=service), health_pb2.HealthCheckResponse)

    def server_status(self) -> Any:
        return self._unary(SERVER_STATUS, observer_pb2.ServerStatusRequest(), observer_pb2.ServerStatusResponse)

    def status(self) -> Any:
        """`hubble status`: the health Check must say SERVING, then ServerStatus."""
        assert self.health().status == health_pb2.HealthCheckResponse.SERVING
        return self.server_status()

    def nodes(self) -> Any:
        return self._unary(GET_NODES, observer_pb2.GetNodesRequest(), observer_pb2.GetNodesResponse).nodes

    def namespaces(self) -> Any:
        resp = self._unary(GET_NAMESPACES, observer_pb2.GetNamespacesRequest(), observer_pb2.GetNamespacesResponse)
        return resp.namespaces

    def observe_call(self, mask: Optional[list[str]] = COMPACT_MASK, **kw: Any) -> Any:
        """The GetFlows stream `hubble observe` opens (compact output: the compact mask)."""
        req = observer_pb2.GetFlowsRequest(**kw)
        if mask is not None:
            req.field_mask.CopyFrom(FieldMask(paths=mask))
        call = self.channel.unary_stream(
            GET_FLOWS,
            request_serializer=observer_pb2.GetFlowsRequest.SerializeToString,
            response_deserializer=observer_pb2.GetFlowsResponse.FromString,
        )
        return call(req, timeout=None if kw.get("follow") else 30)

    def observe(self, mask: Optional[list[str]] = COMPACT_MASK, **kw: Any) -> list[dict[str, Any]]:
        """The responses as `-o json` prints them."""
        return [_json(m) for m in self.observe_call(mask, **kw)]


@contextmanager
def hubble(messages: Any, **kw: Any) -> Iterator[tuple[HubbleCli, str]]:
    """A replay relay serving ``messages`` and a CLI-like client connected to it."""
    with relay(messages, **kw) as (_, addr), grpc.insecure_channel(addr) as ch:
        yield HubbleCli(ch), addr


def _json(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _ns(line: dict[str, Any]) -> int:
    t = Timestamp()
    t.FromJsonString(line.get("time") or line["flow"]["time"])
    return t.ToNanoseconds()


def _in_relay_order(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(lines, key=_ns)  # Hubble Relay sends in time order; the sort is stable for equal times


def _mask(obj: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """A field mask applied to protojson (an independent rendering of what the relay must do)."""
    out: dict[str, Any] = {}
    for path in paths:
        head, _, rest = path.partition(".")
        if head not in obj:
            continue
        if rest:
            out.setdefault(head, {}).update(_mask(obj[head], [rest]))
        else:
            out[head] = obj[head]
    return out


def _masked_line(line: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    return {**line, "flow": _mask(line["flow"], paths)} if "flow" in line else line


def _node(line: dict[str, Any]) -> str:
    return line.get("node_name") or line.get("flow", {}).get("node_name", "")


def _write(tmp_path: Path, lines: list[dict[str, Any]]) -> str:
    path = tmp_path / "cilium-1.19.json"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


# ---- the replay relay, as the hubble CLI uses it ----


def test_flow_proto_holds_every_field_of_cilium_1_19_flow() -> None:
    fields = {f.name: f.number for f in flow_pb2.Flow.DESCRIPTOR.fields}
    assert fields == CILIUM_1_19_FLOW


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_json_output_equals_the_file_field_for_field(name: str) -> None:
    lines = fixture_lines(name)
    with hubble(name) as (cli, _):
        assert cli.observe(mask=None) == _in_relay_order(lines)  # `hubble observe -o json` sends no mask


def test_flows_with_cilium_1_19_fields_come_back_whole(tmp_path: Path) -> None:
    with hubble(_write(tmp_path, NEW_CILIUM_LINES)) as (cli, _):
        assert cli.observe(mask=None) == NEW_CILIUM_LINES
        compact = cli.observe(number=3)
        assert compact == [_masked_line(line, COMPACT_MASK) for line in NEW_CILIUM_LINES]
        assert compact[0]["flow"]["ip_trace_id"] == {"trace_id": "1234567890123", "ip_option_type": 136}
        assert "emitter" not in compact[0]["flow"]


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_compact_observe_last_3_and_all(name: str) -> None:
    want = [_masked_line(line, COMPACT_MASK) for line in _in_relay_order(fixture_lines(name))]
    with hubble(name) as (cli, _):
        assert cli.observe(number=3) == want[-3:]  # `hubble observe --last 3`
        assert cli.observe(number=3, first=True) == want[:3]  # `hubble observe --first 3`
        assert cli.observe() == want


def test_field_mask_path_naming_no_flow_field_is_invalid_argument() -> None:
    with hubble("basic-sample-10-flows.json") as (cli, _):
        for bad in ("bogus", "source.bogus", "source.workloads.name", "l7.http.code.value", ""):
            with pytest.raises(grpc.RpcError) as err:
                cli.observe(mask=["time", bad])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            assert repr(bad) in err.value.details() and "flow.Flow" in err.value.details()
        # paths into fields newer than the recordings are fine, as are deep ones
        paths = ["time", "tunnel.l4", "ip_trace_id.trace_id", "source.workloads", "l7.http.code"]
        lines = _in_relay_order(fixture_lines("basic-sample-10-flows.json"))
        assert cli.observe(mask=paths) == [_masked_line(line, paths) for line in lines]
        assert cli.server_status().num_flows == 10  # the relay is fine after the refusals


def test_hubble_status_health_then_server_status() -> None:
    name = "basic-sample-330-dns-flows.json"
    lines = fixture_lines(name)
    with hubble(name) as (cli, _):
        st = cli.status()
        assert (st.num_flows, st.max_flows, st.seen_flows, st.flows_rate) == (len(lines), len(lines), 0, 0.0)
        assert st.num_connected_nodes.value == len({_node(ln) for ln in lines}) == 4
        assert st.HasField("num_unavailable_nodes") and st.num_unavailable_nodes.value == 0
        assert st.uptime_ns > 0 and st.version
        assert len(cli.observe(number=3)) == 3
        st = cli.status()
        assert st.seen_flows == 3 and st.flows_rate > 0
        assert cli.health("").status == health_pb2.HealthCheckResponse.SERVING  # the server as a whole
        with pytest.raises(grpc.RpcError) as err:
            cli.health("some.other.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_flows_rate_is_the_last_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(replay.time, "monotonic", lambda: now[0])
    window = replay.RateWindow(span=60.0)
    for second in range(1, 31):  # 100 flows/s for 30 s
        now[0] = 1000.0 + second
        window.note(100 * second)
    assert window.rate(3000) == pytest.approx(100.0)
    now[0] += 120  # two idle minutes
    assert window.rate(3000) == 0.0
    for second in range(1, 121):  # then 10 flows/s for two minutes: only the last minute counts
        now[0] += 1
        window.note(3000 + 10 * second)
    assert window.rate(3000 + 1200) == pytest.approx(10.0)


def test_health_watch_sends_serving_and_stays_open() -> None:
    with hubble("basic-sample-10-flows.json") as (cli, _):
        call = cli.channel.unary_stream(
            HEALTH_WATCH,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )(health_pb2.HealthCheckRequest(service="hubble.server.Observer"))
        assert next(call).status == health_pb2.HealthCheckResponse.SERVING
        time.sleep(0.3)
        assert call.is_active()
        call.cancel()
        assert call.code() == grpc.StatusCode.CANCELLED


@pytest.mark.parametrize("name", ["basic-sample-330-dns-flows.json", "cilium-docs-export-drops.jsonl"])
def test_list_nodes_and_namespaces(name: str) -> None:
    lines = fixture_lines(name)
    per_node = Counter(_node(ln) for ln in lines if "flow" in ln)
    namespaces = {
        (_node(ln).rpartition("/")[0], ep["namespace"])
        for ln in lines
        for ep in (ln["flow"].get("source", {}), ln["flow"].get("destination", {}))
        if ep.get("namespace")
    }
    with hubble(name) as (cli, _):
        nodes = cli.nodes()
        assert [n.name for n in nodes] == sorted(per_node)
        assert all(n.state == relay_pb2.NODE_CONNECTED and n.uptime_ns > 0 for n in nodes)
        assert {n.name: (n.num_flows, n.max_flows, n.seen_flows) for n in nodes} == {
            n: (c, c, c) for n, c in per_node.items()
        }
        assert [(ns.cluster, ns.namespace) for ns in cli.namespaces()] == sorted(namespaces)


def test_list_namespaces_takes_the_endpoints_cluster(tmp_path: Path) -> None:
    with hubble(_write(tmp_path, NEW_CILIUM_LINES)) as (cli, _):
        assert [(ns.cluster, ns.namespace) for ns in cli.namespaces()] == [("prod", "default"), ("prod", "shop")]
        assert [(n.name, n.num_flows) for n in cli.nodes()] == [("prod/worker-1", 1), ("prod/worker-2", 1)]


@pytest.mark.parametrize(("name", "namespace"), [("cilium-docs-export-drops.jsonl", "default"),
                                                 ("basic-sample-400-tcp-flows.json", "bookinfo")])  # fmt: skip
def test_observe_namespace_filter(name: str, namespace: str) -> None:
    lines = _in_relay_order(fixture_lines(name))
    sides = ("source", "destination")
    want = [
        _masked_line(ln, COMPACT_MASK)
        for ln in lines
        if namespace in (ln["flow"].get(s, {}).get("namespace") for s in sides)
    ]
    assert 0 < len(want) < len(lines) or namespace == "default"
    # `hubble observe -n NS`: either side in the namespace
    either = [flow_pb2.FlowFilter(source_pod=[f"{namespace}/"]), flow_pb2.FlowFilter(destination_pod=[f"{namespace}/"])]
    with hubble(name) as (cli, _):
        assert cli.observe(whitelist=either) == want


def test_observe_follow_is_held_open_until_the_client_cancels() -> None:
    name = "basic-sample-400-udp-flows.json"
    lines = fixture_lines(name)
    got: list[Any] = []
    ended: list[grpc.StatusCode] = []
    with hubble(name) as (cli, _):
        call = cli.observe_call(number=0, follow=True)  # `hubble observe --follow`

        def read() -> None:
            try:
                for msg in call:
                    got.append(msg)
            except grpc.RpcError as exc:
                ended.append(exc.code())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: len(got) == len(lines), 20, "the recording")
        time.sleep(0.5)
        assert len(got) == len(lines) and reader.is_alive() and not ended  # open, and nothing more
        call.cancel()  # Ctrl-C
        reader.join(5)
        assert ended == [grpc.StatusCode.CANCELLED]  # the CLI exits 0 on Canceled
        assert [_json(m) for m in got] == [_masked_line(ln, COMPACT_MASK) for ln in _in_relay_order(lines)]
        assert cli.server_status().seen_flows == len(lines)


# ---- `tfo-agent check` doing what `hubble status` does ----


def _by_name(checks: list[Any]) -> dict[str, Any]:
    return {c.name: c for c in checks}


@pytest.fixture()
def pki(tmp_path: Path) -> dict[str, str]:
    return make_pki(tmp_path)


def test_check_reports_reachable_tls_name_flows_and_nodes(pki: dict[str, str]) -> None:
    tls = TlsFiles(pki["server_crt"], pki["server_key"], client_ca=pki["ca"])
    with relay("basic-sample-330-dns-flows.json", tls=tls) as (_, addr):
        checks = _by_name(hubble_checks(tls_config(addr, pki)))
    assert all(c.level == "ok" for c in checks.values()), checks
    relay_line = checks["hubble relay"].found
    assert f"reachable at {addr}" in relay_line and "health service: SERVING" in relay_line
    assert f"TLS verified against {SERVER_NAME!r} (CA {pki['ca']}), client certificate presented" in relay_line
    assert "330/330 flows buffered, 4 nodes connected, 0 unavailable" in checks["hubble status"].found


def test_check_connection_refused() -> None:
    addr = f"127.0.0.1:{free_port()}"  # nothing listens there
    checks = _by_name(hubble_checks(base_config(addr)))
    bad = checks["hubble relay"]
    assert (bad.level, bad.remedy) == ("fail", REFUSED) and bad.found.startswith("Connection refused")
    assert "hubble status" not in checks


def test_check_tls_handshake_failed(pki: dict[str, str]) -> None:
    wrong_name = TlsFiles(pki["wrong_crt"], pki["wrong_key"], client_ca=pki["ca"])
    with relay("basic-sample-10-flows.json", tls=wrong_name) as (_, addr):
        bad = _by_name(hubble_checks(tls_config(addr, pki)))["hubble relay"]
    assert (bad.level, bad.remedy) == ("fail", TLS_FAILED) and bad.found.startswith("TLS handshake failed")
    assert SERVER_NAME in bad.found
    right = TlsFiles(pki["server_crt"], pki["server_key"], client_ca=pki["ca"])
    with relay("basic-sample-10-flows.json", tls=right) as (_, addr):
        plaintext = _by_name(hubble_checks(base_config(addr)))["hubble relay"]
        no_client_cert = _by_name(hubble_checks(tls_config(addr, pki, hubble_tls_cert="", hubble_tls_key="")))
    for bad in (plaintext, no_client_cert["hubble relay"]):
        assert (bad.level, bad.remedy) == ("fail", TLS_FAILED), bad


def test_check_no_flows_received() -> None:
    with relay([]) as (_, addr):  # a relay whose nodes have observed nothing
        checks = _by_name(hubble_checks(base_config(addr)))
    assert checks["hubble relay"].level == "ok"
    bad = checks["hubble status"]
    assert (bad.level, bad.remedy) == ("fail", NO_FLOWS) and bad.found.startswith("No flows received")


@contextmanager
def _relay_without_health(unavailable: list[str]) -> Iterator[str]:
    """A relay offering ServerStatus only (older servers have no health service)."""

    def server_status(_req: Any, _ctx: Any) -> Any:
        st = observer_pb2.ServerStatusResponse(num_flows=5, max_flows=10, seen_flows=50, unavailable_nodes=unavailable)
        st.num_connected_nodes.value = 2
        st.num_unavailable_nodes.value = len(unavailable)
        return st

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(
        server_status,
        request_deserializer=observer_pb2.ServerStatusRequest.FromString,
        response_serializer=observer_pb2.ServerStatusResponse.SerializeToString,
    )
    observer = grpc.method_handlers_generic_handler("observer.Observer", {"ServerStatus": handler})
    server.add_generic_rpc_handlers((observer,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


def test_check_health_unimplemented_is_not_a_failure_and_unavailable_nodes_warn() -> None:
    with _relay_without_health([]) as addr:
        checks = _by_name(hubble_checks(base_config(addr)))
    assert checks["hubble relay"].level == "ok" and "health service: not offered" in checks["hubble relay"].found
    assert checks["hubble status"].level == "ok"
    assert checks["hubble status"].found.startswith("50 flows seen, 5/10 flows buffered, 2 nodes connected")
    with _relay_without_health(["c1/node-3"]) as addr:
        status = _by_name(hubble_checks(base_config(addr)))["hubble status"]
    assert status.level == "warn" and "1 unavailable (c1/node-3)" in status.found and REFUSED in status.remedy


def _check_cli(tmp_path: Path, address: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "agent.yaml"
    cilium = {"enabled": True, "hubble_address": address, "hubble_tls_enabled": False, "flow_scope": "cluster"}
    path.write_text(json.dumps({"integrations": {"ebpf": {"enabled": False, "cilium": cilium}}}))
    cmd = [sys.executable, "-m", "agent", "check", "-c", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_tfo_agent_check_command(tmp_path: Path) -> None:
    with relay("basic-sample-10-flows.json") as (_, addr):
        out = _check_cli(tmp_path, addr)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"[OK  ] hubble relay: reachable at {addr}, plaintext, health service: SERVING" in out.stdout
    assert "[OK  ] hubble status: 0 flows seen, 10/10 flows buffered, 1 nodes connected" in out.stdout
    out = _check_cli(tmp_path, f"127.0.0.1:{free_port()}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "[FAIL] hubble relay: Connection refused" in out.stdout and f"-> {REFUSED}" in out.stdout
