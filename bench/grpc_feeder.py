"""The grpc-go Hubble feeder: bench/gofeeder (a real grpc-go server) fed by the replay relay's selection.

Hubble Relay is a grpc-go server: one HTTP/2 DATA frame per GetFlows message, frames batched into
large socket writes. ``GoFeeder`` builds bench/gofeeder/main.go with Debian's ``golang-go`` and
``golang-google-grpc-dev`` (GOPATH=/usr/share/gocode, no modules, nothing downloaded) into
build/gofeeder, starts it, and answers its calls on a unix socket from this process: GetFlows with
``ObserverService.responses`` (filters, number/first, since/until, field_mask, loop), ServerStatus
with the service's own answer, anything else UNIMPLEMENTED. A GetFlows with ``follow`` is held open
until the client cancels, as Hubble does. See the protocol in main.go.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Optional

from agent.hubble.proto import GET_FLOWS, SERVER_STATUS, observer_pb2
from agent.hubble.replay import ObserverService

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "bench" / "gofeeder" / "main.go"
BINARY = ROOT / "build" / "gofeeder"
GOPATH = "/usr/share/gocode"  # where Debian's golang-*-dev packages put their sources
CHUNK = 256 * 1024  # messages are written to the feeder in buffers of about this size
END = 0xFFFFFFFF
UNIMPLEMENTED = 12
_U32 = struct.Struct(">I")


class FeederError(Exception):
    """The Go feeder cannot be built or started; the message says what is missing."""


def build() -> Path:
    """Compile the feeder unless build/gofeeder is newer than main.go; returns the binary's path."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    if shutil.which("go") is None or not Path(GOPATH, "src/google.golang.org/grpc").is_dir():
        raise FeederError("the Go feeder needs Debian's golang-go and golang-google-grpc-dev (make apt)")
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOPATH": GOPATH, "GO111MODULE": "off", "GOFLAGS": "", "CGO_ENABLED": "0"}
    tmp = BINARY.with_name(f".gofeeder.{os.getpid()}")
    res = subprocess.run(["go", "build", "-o", str(tmp), str(SOURCE)], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise FeederError(f"go build {SOURCE}: {res.stderr.strip()}")
    tmp.replace(BINARY)  # atomic: a concurrent build or run never sees half a binary
    return BINARY


def _end(code: int = 0, message: str = "") -> bytes:
    text = message.encode()
    return _U32.pack(END) + _U32.pack(code) + _U32.pack(len(text)) + text


def _read_chunk(f: BinaryIO) -> bytes:
    head = f.read(4)
    if len(head) < 4:
        raise EOFError
    (n,) = _U32.unpack(head)
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return data


class GoFeeder:
    """Runs build/gofeeder for ``service``; ``start`` returns its host:port.

    ``rate``: GetFlows messages per second (0: as fast as the client reads); may change meanwhile.
    ``repeat``: send the selection over and over, as recorded (the replay relay's loop shifts every
    pass in time, re-encoding each message: too slow for this process to keep a paced soak going).
    """

    def __init__(self, service: ObserverService, rate: float = 0.0, repeat: bool = False) -> None:
        self.service = service
        self.rate = rate
        self.repeat = repeat
        self.sent = 0  # GetFlows messages handed to the Go server (it buffers at most ~64 KiB of them)
        self.address = ""
        self.gate = threading.Event()  # GetFlows calls wait for it before their first message
        self.gate.set()
        self.on_first_flow: Optional[Callable[[], None]] = None  # called just before a stream's first message
        self.flowing = threading.Event()  # cleared: GetFlows streams pause (after the message at hand)
        self.flowing.set()
        self._dir = tempfile.TemporaryDirectory(prefix="gofeeder-")
        self._path = os.path.join(self._dir.name, "selector.sock")
        self._listener: Optional[socket.socket] = None
        self._proc: Optional[subprocess.Popen[str]] = None

    def _chunks(self, messages: Iterator[bytes]) -> Iterator[bytes]:
        """Length-prefixed messages in buffers of about CHUNK bytes; while ``rate`` is set, paced to it
        (a buffer whenever 2 ms of messages are due, as the replay relay paces); held while paused."""
        parts: list[bytes] = []
        size, clock = 0, time.monotonic
        base_t, base_n, base_rate = clock(), 0, self.rate
        for n, msg in enumerate(messages, 1):
            parts += (_U32.pack(len(msg)), msg)
            size += len(msg) + 4
            self.sent += 1
            if not self.flowing.is_set():
                yield b"".join(parts)
                parts, size = [], 0
                self.flowing.wait()
                base_t, base_n = clock(), n
            rate = self.rate
            if rate != base_rate:  # changed meanwhile: pace from here
                base_t, base_n, base_rate = clock(), n, rate
            if rate:
                ahead = base_t + (n - base_n) / rate - clock()
                if ahead > 0.002:
                    yield b"".join(parts)
                    parts, size = [], 0
                    time.sleep(ahead)
            elif size >= CHUNK:
                yield b"".join(parts)
                parts, size = [], 0
        if parts:
            yield b"".join(parts)

    def _selection(self, req: observer_pb2.GetFlowsRequest) -> Iterator[bytes]:
        """What a GetFlows call gets: the service's answer, over and over with ``repeat``."""
        if not self.repeat:
            yield from self.service.responses(req)
            return
        once = list(self.service.responses(req))
        while once:
            yield from once

    def start(self) -> str:
        """Build if needed, listen for the feeder's calls, start it; returns the gRPC address."""
        binary = build()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self._path)
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, name="gofeeder-selector", daemon=True).start()
        cmd = [str(binary), "-listen", "127.0.0.1:0", "-selector", self._path]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise FeederError(f"gofeeder did not start: {line.strip() or 'no output'}")
        self.address = line.split()[1]
        return self.address

    def stop(self) -> None:
        """Stop the Go server and the selector."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._dir.cleanup()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._call, args=(conn,), name="gofeeder-call", daemon=True).start()

    def _call(self, conn: socket.socket) -> None:
        """One gRPC call of the feeder: read method and request, write the answer."""
        with conn, conn.makefile("rb") as f:
            try:
                method, body = _read_chunk(f).decode(), _read_chunk(f)
                if method == GET_FLOWS:
                    req = observer_pb2.GetFlowsRequest.FromString(body)
                    self.gate.wait()
                    if self.on_first_flow is not None:
                        self.on_first_flow()
                    for chunk in self._chunks(self._selection(req)):
                        conn.sendall(chunk)
                    if req.follow and not req.HasField("until"):
                        conn.recv(1)  # follow: hold the stream open until the client cancels
                        return
                    conn.sendall(_end())
                elif method == SERVER_STATUS:
                    status = self.service.server_status(observer_pb2.ServerStatusRequest.FromString(body), None)
                    conn.sendall(_U32.pack(status.ByteSize()) + status.SerializeToString() + _end())
                else:
                    conn.sendall(_end(UNIMPLEMENTED, f"{method} is not served here"))
            except (OSError, EOFError):
                pass  # the call was cancelled (the feeder closed our socket): nothing to report
