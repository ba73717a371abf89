"""Hubble: TLS/mTLS, flows from a newer Cilium, undecodable messages, and the replay CLI's errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BoolValue

from agent.config import ConfigError, parse
from agent.hubble import HubbleIntegration
from agent.hubble.proto import flow_pb2
from agent.hubble.replay import TlsFiles, load_flows, main
from tests.conftest_hubble import (
    FIXTURES,
    agent,
    base_config,
    by,
    exported,
    make_pki,
    relay,
    self_metric,
    settle,
    tls_config,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def pki(tmp_path: Path) -> dict[str, str]:
    return make_pki(tmp_path)


def test_mtls_connects_with_right_ca_cert_key(pki: dict[str, str]) -> None:
    tls = TlsFiles(pki["server_crt"], pki["server_key"], client_ca=pki["ca"])
    with relay("basic-sample-10-flows.json", tls=tls) as (_, addr), agent(tls_config(addr, pki)) as h:
        settle(h, 10)
        assert sum(v for _, v in exported(h)["hubble_flows"]) == 10
        assert h.status()[0]


def test_mtls_refuses_server_with_wrong_name_and_server_refuses_no_client_cert(pki: dict[str, str]) -> None:
    wrong = TlsFiles(pki["wrong_crt"], pki["wrong_key"], client_ca=pki["ca"])
    with relay("basic-sample-10-flows.json", tls=wrong) as (_, addr), agent(tls_config(addr, pki)) as h:
        wait_for(lambda: h.stream.stats.reconnects >= 2, 10, "failed attempts")
        assert h.stream.stats.received == 0
        ready, reason = h.status()
        assert not ready and "UNAVAILABLE" in reason
    right = TlsFiles(pki["server_crt"], pki["server_key"], client_ca=pki["ca"])
    no_client_cert = {"hubble_tls_cert": "", "hubble_tls_key": ""}
    with (
        relay("basic-sample-10-flows.json", tls=right) as (_, addr),
        agent(tls_config(addr, pki, **no_client_cert)) as h,
    ):
        wait_for(lambda: h.stream.stats.reconnects >= 2, 10, "failed attempts")
        assert h.stream.stats.received == 0 and not h.status()[0]


def test_missing_or_unreadable_tls_file_is_config_error(pki: dict[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.key")
    with pytest.raises(ConfigError, match=r"hubble_tls_key.*nope\.key.*missing"):
        HubbleIntegration(tls_config("127.0.0.1:1", pki, hubble_tls_key=missing))
    with pytest.raises(ConfigError, match=r"hubble_tls_ca.*not readable"):
        HubbleIntegration(tls_config("127.0.0.1:1", pki, hubble_tls_ca=str(tmp_path)))
    text = f"integrations:\n  ebpf:\n    cilium:\n      enabled: true\n      hubble_tls_ca: {missing}\n"
    with pytest.raises(ConfigError, match="hubble_tls_ca"):
        parse(text, "agent.yaml")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _response(flow: flow_pb2.Flow, extra_flow: bytes = b"", extra_resp: bytes = b"") -> bytes:
    return _field(1, flow.SerializeToString() + extra_flow) + extra_resp


@contextmanager
def raw_relay(messages: list[bytes]) -> Iterator[str]:
    """A minimal observer.Observer that sends exactly these bytes (as a newer relay might)."""

    def get_flows(_req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        yield from messages
        while ctx.is_active():
            time.sleep(0.05)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_stream_rpc_method_handler(get_flows)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("observer.Observer", {"GetFlows": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


def test_newer_cilium_unknown_enums_fields_and_undecodable_messages() -> None:
    def flow(**kw: object) -> flow_pb2.Flow:
        f = flow_pb2.Flow(node_name="n1", **kw)
        f.time.FromNanoseconds(1_700_000_000_000_000_000 + len(messages))
        return f

    messages: list[bytes] = []
    tcp = flow_pb2.Layer4(TCP=flow_pb2.TCP(source_port=1, destination_port=2))
    src = flow_pb2.Endpoint(namespace="shop", pod_name="web-0")
    messages.append(_response(flow(verdict=2, drop_reason_desc=250, l4=tcp, source=src)))  # new drop reason
    messages.append(_response(flow(verdict=42, l4=tcp, source=src)))  # new verdict
    # unknown fields in the flow (a new field 300) and in the response (a new field 2000)
    messages.append(_response(flow(verdict=1, l4=tcp, source=src), _field(300, b"x" * 9), _field(2000, b"new")))
    messages.append(_response(flow(verdict=1)))  # optional parts absent: no endpoints, no l4, no l7
    messages.append(b"\x0a\x05\xff\xff")  # truncated: cannot be decoded
    messages.append(_response(flow(verdict=1, l4=tcp, source=src, is_reply=BoolValue(value=False))))
    with raw_relay(messages) as addr, agent(base_config(addr)) as h:
        settle(h, len(messages))
        x = exported(h)
        assert self_metric(h, "decode_errors") == 1
        assert self_metric(h, "flow_errors") == 0
        assert by(x["hubble_drop"], "reason") == {"250": 1}
        assert by(x["hubble_flows"], "verdict") == {"DROPPED": 1, "42": 1, "FORWARDED": 3}
        assert by(x["hubble_flows"], "protocol") == {"TCP": 4, "": 1}
        assert by(x["hubble_flows"], "source_namespace") == {"shop": 4, "": 1}
        assert h.status()[0]  # the stream survived all of it


def test_replay_reads_numeric_unknown_enum_from_json(tmp_path: Path) -> None:
    p = tmp_path / "new.json"
    p.write_text('{"flow":{"time":"2026-01-01T00:00:00Z","verdict":"DROPPED","drop_reason_desc":250,"x_new":1}}\n')
    (msg,) = load_flows(str(p))
    assert msg.flow.drop_reason_desc == 250


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err and "Traceback" not in err


def test_replay_cli_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    good = FIXTURES / "basic-sample-5-dns-flows.json"
    bad = tmp_path / "bad.json"
    bad.write_text(good.read_text().splitlines()[0] + "\n{not json\n")
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"flow": {"verdict": ["x"]}}\n')
    empty = tmp_path / "empty.json"
    empty.write_text("\n")
    _one_line_error(capsys, ["--file", str(tmp_path / "missing.json")], "missing.json")
    _one_line_error(capsys, ["--file", str(bad)], "bad.json:2")
    _one_line_error(capsys, ["--file", str(wrong)], "wrong.json:1")
    _one_line_error(capsys, ["--file", str(empty)], "no flows")
    _one_line_error(capsys, ["--file", str(good), "--rate", "0"], "--rate")
    _one_line_error(capsys, ["--file", str(good), "--rate", "abc"], "--rate")
    _one_line_error(capsys, ["--file", str(good), "--listen", "nowhere"], "--listen")
    _one_line_error(capsys, ["--file", str(good), "--tls-cert", "x.crt"], "--tls-key")
    _one_line_error(capsys, ["--file", str(good), "--tls-cert", "x.crt", "--tls-key", "y.key"], "cannot read TLS file")
    _one_line_error(capsys, ["--bogus"], "--bogus")
    _one_line_error(capsys, ["--file", str(good), "--demo"], "not allowed")


def test_replay_cli_serves_demo_on_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "hubble.sock"
    code = "import sys; from agent.hubble.replay import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--demo", "--listen", f"unix://{sock}", "--rate", "3000"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_for(sock.exists, 20, "the replay socket")
        with agent(base_config(f"unix://{sock}", hubble_tls_enabled=True, flow_scope="node")) as h:
            wait_for(lambda: h.aggregator.stats.flows_processed >= 500, 20, "demo flows over the unix socket")
            assert h.stream.node_filter is None  # node-local hubble.sock: no node filter
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert b"replaying" in out


def test_lost_events_and_node_status_notices_are_counted(tmp_path: Path) -> None:
    lines = (FIXTURES / "basic-sample-10-flows.json").read_text().splitlines()
    notices = [
        '{"lost_events":{"source":"HUBBLE_RING_BUFFER","num_events_lost":"3"},"time":"2021-06-16T16:52:13.2Z"}',
        '{"lost_events":{"source":"PERF_EVENT_RING_BUFFER","num_events_lost":"5"},"time":"2021-06-16T16:52:13.3Z"}',
        '{"node_status":{"state_change":"NODE_UNAVAILABLE","node_names":["n2"]},"time":"2021-06-16T16:52:13.4Z"}',
    ]
    path = tmp_path / "with-notices.json"
    path.write_text("\n".join(lines[:5] + notices + lines[5:]) + "\n")
    with relay(load_flows(str(path))) as (_, addr), agent(base_config(addr)) as h:
        settle(h, 10)
        wait_for(lambda: h.stream.stats.received == 13, 10, "all 13 messages")
        fams = {f.name: {s.labels: s.value for s in f.samples} for f in h.collect()}
        assert fams["tfo_agent_hubble_lost_events"] == {  # every known source, from 0
            ("HUBBLE_RING_BUFFER",): 3,
            ("PERF_EVENT_RING_BUFFER",): 5,
            ("OBSERVER_EVENTS_QUEUE",): 0,
            ("UNKNOWN_LOST_EVENT_SOURCE",): 0,
        }
        assert fams["tfo_agent_hubble_node_status_events"] == {("NODE_UNAVAILABLE",): 1}
        assert sum(fams["hubble_flows"].values()) == 10


@pytest.mark.parametrize(
    ("env", "grpc_first", "want"),
    [(None, False, "-event_engine_client"), ("", False, ""), (None, True, None)],
)
def test_grpc_polling_client_chosen_only_before_grpc_loads_and_unset(
    env: str | None, grpc_first: bool, want: str | None
) -> None:
    """agent.hubble sets GRPC_EXPERIMENTS for gRPC's polling client, but never over the operator's."""
    environ = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if env is not None:
        environ["GRPC_EXPERIMENTS"] = env
    code = "import os, agent.hubble; print(os.environ.get('GRPC_EXPERIMENTS'))"
    code = ("import grpc; " if grpc_first else "") + code
    out = subprocess.run([sys.executable, "-c", code], env=environ, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(want)
