"""A replay Hubble Relay: serves recorded (or demo) flows over Cilium's observer.Observer gRPC API.

``tfo-agent hubble replay [--file FLOWS | --demo] --listen ADDR [--loop] [--rate N] [TLS options]``

FLOWS is Hubble's JSON output, one GetFlowsResponse per line (``hubble observe -o json``). The
relay honours what real clients send: ``whitelist``/``blacklist`` (see ``filters``), ``number`` and
``first``, ``follow``, ``since``/``until`` and ``field_mask`` (a path naming no field of
``flow.Flow`` is INVALID_ARGUMENT); anything else is accepted and ignored. With ``follow`` the stream
stays open after the recording (or loops over it with ``--loop``, each pass shifted in time past the
previous one). ServerStatus, GetNodes, GetNamespaces and the gRPC health service answer what the
hubble CLI asks (see ``relay_services``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import grpc
from google.protobuf import json_format
from google.protobuf.field_mask_pb2 import FieldMask

from agent.hubble.filters import invalid_mask_path, request_selects
from agent.hubble.proto import observer_pb2
from agent.hubble.relay_services import VERSION, HealthService, Inventory

NS = 1_000_000_000


class ReplayError(Exception):
    """Bad input for the replay relay; the message is one line naming the culprit."""


@dataclass
class Record:
    """One recorded GetFlowsResponse: the message, its time (ns) and node."""

    msg: observer_pb2.GetFlowsResponse
    ts: int
    node: str


def to_records(messages: Sequence[observer_pb2.GetFlowsResponse]) -> list[Record]:
    """Wrap messages for serving, with their time and node, in time order (as Hubble Relay sends)."""
    out = []
    for m in messages:
        t = m.time if m.HasField("time") else m.flow.time
        out.append(Record(m, t.seconds * NS + t.nanos, m.node_name or m.flow.node_name))
    out.sort(key=lambda r: r.ts)
    return out


def load_flows(path: str) -> list[observer_pb2.GetFlowsResponse]:
    """Parse a Hubble JSON file (one GetFlowsResponse per line); raises ReplayError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplayError(f"{path}: cannot read flow file: {getattr(exc, 'strerror', None) or exc}") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            msg = json_format.ParseDict(obj, observer_pb2.GetFlowsResponse(), ignore_unknown_fields=True)
        except (ValueError, json_format.ParseError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ReplayError(f"{path}:{lineno}: not a Hubble flow line: {reason}") from None
        if msg.WhichOneof("response_types") is None:
            raise ReplayError(f"{path}:{lineno}: not a Hubble flow line: no flow, lost_events or node_status")
        out.append(msg)
    if not out:
        raise ReplayError(f"{path}: no flows in file")
    return out


class RateWindow:
    """Events per second over the last ``span`` seconds, from (time, running count) samples."""

    def __init__(self, span: float = 60.0) -> None:
        self.span = span
        self.samples: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])

    def note(self, count: int) -> None:
        """Record the running count (kept at most once a second)."""
        now = time.monotonic()
        if now - self.samples[-1][0] >= 1.0:
            self.samples.append((now, count))
            while len(self.samples) > 1 and self.samples[1][0] <= now - self.span:
                self.samples.popleft()

    def rate(self, count: int) -> float:
        """The rate up to now, since the newest sample at least ``span`` old (or the oldest one)."""
        self.note(count)
        t0, c0 = self.samples[0]
        elapsed = time.monotonic() - t0
        return (count - c0) / elapsed if elapsed > 0 else 0.0


class ObserverService:
    """GetFlows and ServerStatus over a fixed list of records; GetNodes/GetNamespaces by its inventory."""

    def __init__(self, records: list[Record], loop: bool = False, rate: float = 0.0) -> None:
        self.records = records
        self.loop = loop
        self.rate = rate
        self.seen = 0
        self.started = time.monotonic()
        self.flow_rate = RateWindow()
        self.inventory = Inventory(((r.msg, r.node) for r in records), self.uptime_ns)
        self.stopping = threading.Event()
        span = (records[-1].ts - records[0].ts) if records else 0
        self.period = span + NS  # each loop pass is shifted by this much
        self._masked: dict[tuple[str, ...], list[bytes]] = {}
        self._lock = threading.Lock()

    def prepared(self, mask: tuple[str, ...]) -> list[bytes]:
        """The records serialised with ``mask`` applied (computed once per mask)."""
        with self._lock:
            cached = self._masked.get(mask)
            if cached is None:
                cached = self._masked[mask] = [_serialise(r.msg, mask, 0) for r in self.records]
            return cached

    def uptime_ns(self) -> int:
        """Nanoseconds since the service started."""
        return int((time.monotonic() - self.started) * NS)

    def server_status(self, _req: observer_pb2.ServerStatusRequest, _ctx: grpc.ServicerContext) -> Any:
        resp = observer_pb2.ServerStatusResponse(
            num_flows=len(self.records),
            max_flows=len(self.records),
            seen_flows=self.seen,
            uptime_ns=self.uptime_ns(),
            version=VERSION,
            flows_rate=self.flow_rate.rate(self.seen),
        )
        resp.num_connected_nodes.value = len(self.inventory.flows)
        resp.num_unavailable_nodes.value = 0
        return resp

    def responses(self, req: observer_pb2.GetFlowsRequest) -> Iterator[bytes]:
        """The serialised GetFlowsResponses ``req`` asks for, in order, unpaced (endless with loop+follow)."""
        mask = tuple(req.field_mask.paths)
        since = req.since.seconds * NS + req.since.nanos if req.HasField("since") else None
        until = req.until.seconds * NS + req.until.nanos if req.HasField("until") else None
        wl, bl = list(req.whitelist), list(req.blacklist)
        picked = [
            i
            for i, r in enumerate(self.records)
            if (
                not (wl or bl)
                or r.msg.WhichOneof("response_types") != "flow"
                or request_selects(wl, bl, r.msg.flow, r.node)
            )
        ]
        if req.number:
            picked = picked[: req.number] if req.first else picked[-req.number :]
        passes = 0
        while True:
            offset = passes * self.period
            cached = self.prepared(mask) if offset == 0 else None
            for i in picked:
                ts = self.records[i].ts + offset
                if since is not None and ts < since:
                    continue
                if until is not None and ts > until:
                    return
                yield cached[i] if cached is not None else _serialise(self.records[i].msg, mask, offset)
            passes += 1
            if not (self.loop and req.follow):
                return

    def get_flows(self, req: observer_pb2.GetFlowsRequest, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        bad = invalid_mask_path(req.field_mask.paths)
        if bad is not None:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid fieldmask: {bad!r} names no field of flow.Flow")
        start = time.monotonic()
        for sent, data in enumerate(self.responses(req)):
            if self.stopping.is_set() or not ctx.is_active():
                return
            if self.rate:
                ahead = start + sent / self.rate - time.monotonic()
                if ahead > 0.002:
                    time.sleep(ahead)
            self.seen += 1
            if not self.seen & 63:
                self.flow_rate.note(self.seen)
            yield data
        while req.follow and not req.HasField("until") and ctx.is_active() and not self.stopping.is_set():
            time.sleep(0.05)  # follow: the stream stays open after the recording, unless it is bounded by until


def _serialise(msg: observer_pb2.GetFlowsResponse, mask: tuple[str, ...], offset: int) -> bytes:
    if not mask and not offset:
        return msg.SerializeToString()
    out = observer_pb2.GetFlowsResponse()
    out.CopyFrom(msg)
    if offset:
        for t in (out.time, out.flow.time) if out.HasField("flow") else (out.time,):
            t.FromNanoseconds(t.ToNanoseconds() + offset)
    if mask and out.HasField("flow"):
        trimmed = type(out.flow)()
        FieldMask(paths=mask).MergeMessage(out.flow, trimmed)
        out.flow.CopyFrom(trimmed)
    return out.SerializeToString()


@dataclass
class TlsFiles:
    """Server TLS: certificate and key, and the client CA when client certificates are required."""

    cert: str
    key: str
    client_ca: Optional[str] = None


class ReplayRelay:
    """A gRPC server running ObserverService; ``start`` returns the bound address."""

    def __init__(self, records: list[Record], loop: bool = False, rate: float = 0.0) -> None:
        self.service = ObserverService(records, loop=loop, rate=rate)
        self.health = HealthService(self.service.stopping)
        self._server: Optional[grpc.Server] = None

    def start(self, listen: str, tls: Optional[TlsFiles] = None) -> str:
        """Bind and serve; ``host:0`` picks a free port. Raises ReplayError on bad address/TLS."""
        handlers = {
            "GetFlows": grpc.unary_stream_rpc_method_handler(
                self.service.get_flows, request_deserializer=observer_pb2.GetFlowsRequest.FromString
            ),
            "ServerStatus": grpc.unary_unary_rpc_method_handler(
                self.service.server_status,
                request_deserializer=observer_pb2.ServerStatusRequest.FromString,
                response_serializer=observer_pb2.ServerStatusResponse.SerializeToString,
            ),
            **self.service.inventory.handlers(),
        }
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)])
        observer = grpc.method_handlers_generic_handler("observer.Observer", handlers)
        server.add_generic_rpc_handlers((observer, self.health.handler()))
        try:
            if tls:
                creds = grpc.ssl_server_credentials(
                    [(_read(tls.key), _read(tls.cert))],
                    root_certificates=_read(tls.client_ca) if tls.client_ca else None,
                    require_client_auth=bool(tls.client_ca),
                )
                port = server.add_secure_port(listen, creds)
            else:
                port = server.add_insecure_port(listen)
        except RuntimeError as exc:
            raise ReplayError(f"--listen {listen}: cannot listen: {exc}") from None
        if not listen.startswith("unix:") and port == 0:
            raise ReplayError(f"--listen {listen}: cannot listen (address in use or invalid)")
        server.start()
        self._server = server
        return listen if listen.startswith("unix:") else f"{listen.rpartition(':')[0]}:{port}"

    def stop(self, grace: Optional[float] = None) -> None:
        """Stop serving; open streams end."""
        self.service.stopping.set()
        if self._server is not None:
            self._server.stop(grace).wait()


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ReplayError(f"{path}: cannot read TLS file: {exc.strerror}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tfo-agent hubble replay", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--file", metavar="FLOWS", help="Hubble JSON flows, one per line (hubble observe -o json)")
    src.add_argument("--demo", action="store_true", help="synthesised flow mix (default without --file)")
    p.add_argument("--demo-flows", type=int, default=5000, metavar="N", help="flows per demo pass (default 5000)")
    p.add_argument("--listen", default="127.0.0.1:4245", help="host:port or unix:///path (default 127.0.0.1:4245)")
    p.add_argument("--loop", action="store_true", help="replay forever (demo mode always loops)")
    p.add_argument("--rate", type=float, default=None, metavar="N", help="flows per second (demo default 1000)")
    p.add_argument("--tls-cert", help="server certificate (PEM); enables TLS")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA for client certificates; requires them (mTLS)")
    return p


class _Exit(Exception):
    pass


def main(argv: list[str]) -> int:
    """``tfo-agent hubble replay``: exit 2 with one line on bad arguments or files."""
    parser = _parser()
    parser.exit = _exit  # type: ignore[method-assign]
    parser.error = lambda msg: _exit(2, f"tfo-agent hubble replay: {msg}\n")  # type: ignore[method-assign]
    try:
        args = parser.parse_args(argv)
        return _serve(args)
    except _Exit as e:
        return int(e.args[0])
    except ReplayError as exc:
        print(f"tfo-agent hubble replay: {exc}", file=sys.stderr)
        return 2


def _exit(status: int = 0, message: Optional[str] = None) -> None:
    if message:
        sys.stderr.write(message)
    raise _Exit(status)


def _serve(args: argparse.Namespace) -> int:
    if args.rate is not None and args.rate <= 0:
        raise ReplayError(f"--rate {args.rate:g}: expected a number of flows per second > 0")
    if args.demo_flows < 1:
        raise ReplayError(f"--demo-flows {args.demo_flows}: expected at least 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ReplayError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise ReplayError("--tls-client-ca needs --tls-cert and --tls-key")
    listen = args.listen
    if not listen.startswith("unix:") and (":" not in listen or not listen.rpartition(":")[2].isdigit()):
        raise ReplayError(f"--listen {listen}: expected host:port or unix:///path")
    if args.file:
        messages, loop, rate = load_flows(args.file), args.loop, args.rate or 0.0
    else:
        from agent.hubble.demo import demo_flows

        messages, loop, rate = demo_flows(args.demo_flows), True, args.rate or 1000.0
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    relay = ReplayRelay(to_records(messages), loop=loop, rate=rate)
    bound = relay.start(listen, tls)
    what = args.file or "demo flows"
    print(f"replaying {len(messages)} {what} on {bound}{' (TLS)' if tls else ''}; Ctrl-C stops", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with contextlib.suppress(KeyboardInterrupt):
        done.wait()
    relay.stop(0)
    return 0
