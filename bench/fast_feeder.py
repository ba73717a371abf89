"""A packed Hubble feeder for the benchmark: GetFlows over plain HTTP/2 (h2), many messages per frame.

No Hubble server sends this way: Hubble Relay and the Cilium agent's Hubble server are grpc-go
servers, which put every message in a DATA frame of its own (bench/gofeeder is one). This feeder
packs length-prefixed gRPC messages into frames of the client's SETTINGS_MAX_FRAME_SIZE, so the
client handles far fewer frames: the benchmark keeps it as an upper bound only. It answers
``/observer.Observer/GetFlows`` with the replay relay's own selection (``ObserverService.responses``:
filters, number/first, since/until, field_mask) within the flow-control windows (h2 tracks them
and WINDOW_UPDATE), at full speed, then trailers with grpc-status 0 (with ``follow`` it holds the
stream open until the client cancels, as Hubble does). Any other method gets UNIMPLEMENTED.
Plaintext (h2c with prior knowledge, as grpcio's insecure channel speaks), loopback benchmark use
only.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Optional

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from agent.hubble.proto import GET_FLOWS, observer_pb2
from agent.hubble.replay import ObserverService

CHUNK = 256 * 1024  # messages are packed into buffers of about this size before framing
UNIMPLEMENTED = "12"


class _Stream:
    """A GetFlows response being sent: the messages still to send and the bytes already packed."""

    def __init__(self, messages: Iterator[bytes], follow: bool) -> None:
        self.messages: Optional[Iterator[bytes]] = messages
        self.follow = follow
        self.pending = memoryview(b"")

    def fill(self) -> None:
        """Pack the next messages (gRPC length prefix + message) into ``pending``, about CHUNK bytes."""
        if self.pending or self.messages is None:
            return
        parts: list[bytes] = []
        size = 0
        pack = struct.Struct(">BI").pack
        for msg in self.messages:
            parts.append(pack(0, len(msg)))
            parts.append(msg)
            size += len(msg) + 5
            if size >= CHUNK:
                break
        else:
            self.messages = None
        self.pending = memoryview(b"".join(parts))


class FastFeeder:
    """Serves ``service`` on a loopback port, one thread per connection; ``start`` returns host:port."""

    def __init__(self, service: ObserverService) -> None:
        self.service = service
        self._sock: Optional[socket.socket] = None
        self._stop = threading.Event()

    def start(self, host: str = "127.0.0.1") -> str:
        """Listen on a free port of ``host`` and accept in a background thread."""
        sock = socket.create_server((host, 0))
        self._sock = sock
        threading.Thread(target=self._accept, name="fast-feeder", daemon=True).start()
        return f"{host}:{sock.getsockname()[1]}"

    def stop(self) -> None:
        """Stop accepting and end the connections (at their next send or receive)."""
        self._stop.set()
        if self._sock is not None:
            self._sock.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name="fast-feeder-conn", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            with sock:
                self._connection(sock)
        except (OSError, h2.exceptions.H2Error):
            pass  # the client went away (cancel, channel closed): nothing to report in a benchmark

    def _connection(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        paths: dict[int, str] = {}
        bodies: dict[int, bytearray] = {}
        streams: dict[int, _Stream] = {}
        while not self._stop.is_set():
            sending = [sid for sid, st in streams.items() if _can_send(conn, sid, st)]
            readable, _, _ = select.select([sock], [], [], 0 if sending else 0.5)
            if readable:
                data = sock.recv(65536)
                if not data:
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        paths[ev.stream_id] = dict(ev.headers).get(":path", "")
                        bodies[ev.stream_id] = bytearray()
                    elif isinstance(ev, h2.events.DataReceived):
                        bodies[ev.stream_id] += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        started = self._respond(conn, ev.stream_id, paths.pop(ev.stream_id), bodies.pop(ev.stream_id))
                        if started is not None:
                            streams[ev.stream_id] = started
                    elif isinstance(ev, h2.events.StreamReset):
                        streams.pop(ev.stream_id, None)
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        return
            for sid in sending:
                st = streams.get(sid)  # None when the client reset it meanwhile
                if st is not None and _send(conn, sid, st):
                    del streams[sid]
            out = conn.data_to_send()
            if out:
                sock.sendall(out)

    def _respond(self, conn: h2.connection.H2Connection, sid: int, path: str, body: bytes) -> Optional[_Stream]:
        """Answer a complete request: GetFlows starts a stream, anything else is UNIMPLEMENTED."""
        if path != GET_FLOWS:
            conn.send_headers(
                sid, [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", UNIMPLEMENTED)], True
            )
            return None
        req = observer_pb2.GetFlowsRequest.FromString(bytes(body[5:]))  # after the gRPC message prefix
        conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        return _Stream(self.service.responses(req), req.follow)


def _can_send(conn: h2.connection.H2Connection, sid: int, st: _Stream) -> bool:
    """Whether the stream has something to send now (data within the window, or its end)."""
    st.fill()
    if not st.pending:
        return st.messages is None and not st.follow
    return conn.local_flow_control_window(sid) > 0


def _send(conn: h2.connection.H2Connection, sid: int, st: _Stream) -> bool:
    """Queue as much of the stream as the windows allow, in full frames; True when it has ended."""
    frame = conn.max_outbound_frame_size
    while True:
        st.fill()
        if not st.pending:
            if st.messages is None and not st.follow:
                conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
                return True
            return False
        n = min(len(st.pending), conn.local_flow_control_window(sid), frame)
        if n <= 0:
            return False
        conn.send_data(sid, st.pending[:n])
        st.pending = st.pending[n:]
