"""The benchmark's grpc-go feeder (bench/gofeeder): framed like Hubble Relay, serving the relay's selection.

The feeder is built from Debian's golang-go and golang-google-grpc-dev (apt-packages.txt) and read
here frame by frame with the ``h2`` library, so the framing is checked on the wire, not assumed.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from h2.settings import SettingCodes

from agent.hubble.client import FIELD_MASK
from agent.hubble.demo import demo_flows
from agent.hubble.proto import GET_FLOWS, SERVER_STATUS, flow_pb2, observer_pb2
from bench.grpc_feeder import GoFeeder
from tests.conftest_hubble import relay

INITIAL_WINDOW_SIZE = SettingCodes.INITIAL_WINDOW_SIZE
WINDOW = 2**31 - 1


@pytest.fixture(scope="module")
def service() -> Iterator:
    """The replay relay serving 3,000 demo flows (its service is what the feeder serves)."""
    with relay(demo_flows(3000)) as (r, addr):
        yield r.service, addr


def _data_frames(addr: str, req: observer_pb2.GetFlowsRequest) -> tuple[list[bytes], dict[str, str]]:
    """GetFlows over a bare HTTP/2 connection: the payload of every DATA frame, and the trailers."""
    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=20)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.local_settings = h2.settings.Settings(client=True, initial_values={INITIAL_WINDOW_SIZE: WINDOW})
    conn.initiate_connection()
    conn.increment_flow_control_window(WINDOW - 65535)  # windows never run out: no message is split
    sid = conn.get_next_available_stream_id()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", GET_FLOWS),
        (":authority", addr),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    conn.send_headers(sid, headers)
    body = req.SerializeToString()
    conn.send_data(sid, struct.pack(">BI", 0, len(body)) + body, end_stream=True)
    frames: list[bytes] = []
    trailers: dict[str, str] = {}
    with sock:
        sock.sendall(conn.data_to_send())
        while not trailers:
            data = sock.recv(1 << 20)
            assert data, "the feeder closed the connection before the trailers"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):  # h2 reports every DATA frame on its own
                    frames.append(ev.data)
                elif isinstance(ev, h2.events.TrailersReceived):
                    trailers = dict(ev.headers)
            sock.sendall(conn.data_to_send())
    return frames, trailers


def test_go_feeder_sends_one_data_frame_per_message(service: tuple) -> None:
    svc, _ = service
    feeder = GoFeeder(svc)
    req = observer_pb2.GetFlowsRequest(field_mask=FieldMask(paths=FIELD_MASK))
    try:
        frames, trailers = _data_frames(feeder.start(), req)
    finally:
        feeder.stop()
    want = list(svc.responses(req))
    assert trailers.get("grpc-status") == "0"
    assert len(frames) == len(want) >= 3000
    for frame, msg in zip(frames, want):
        flag, size = struct.unpack(">BI", frame[:5])
        assert (flag, size) == (0, len(msg))
        assert frame[5:] == msg  # exactly one whole message, nothing of the next


def test_go_feeder_serves_the_relays_selection_and_status(service: tuple) -> None:
    svc, relay_addr = service
    req = observer_pb2.GetFlowsRequest(
        blacklist=[flow_pb2.FlowFilter(verdict=[flow_pb2.FORWARDED])],
        field_mask=FieldMask(paths=["time", "verdict"]),
        number=50,
        first=True,
    )
    feeder = GoFeeder(svc)
    try:
        addr = feeder.start()
        got = {}
        for name, target in (("go", addr), ("relay", relay_addr)):
            with grpc.insecure_channel(target) as ch:
                flows = ch.unary_stream(GET_FLOWS, request_serializer=observer_pb2.GetFlowsRequest.SerializeToString)(
                    req, timeout=20
                )
                status = ch.unary_unary(
                    SERVER_STATUS,
                    request_serializer=observer_pb2.ServerStatusRequest.SerializeToString,
                    response_deserializer=observer_pb2.ServerStatusResponse.FromString,
                )(observer_pb2.ServerStatusRequest(), timeout=5)
                got[name] = (list(flows), status.num_flows, status.num_connected_nodes.value)
            if name == "go":
                with pytest.raises(grpc.RpcError) as err, grpc.insecure_channel(target) as ch:
                    ch.unary_unary("/observer.Observer/GetAgentEvents")(b"", timeout=5)
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        feeder.stop()
    assert got["go"] == got["relay"]
    flows = [observer_pb2.GetFlowsResponse.FromString(b) for b in got["go"][0]]
    assert len(flows) == 50
    assert all(f.flow.verdict != flow_pb2.FORWARDED and not f.flow.HasField("source") for f in flows)
