"""The Hubble Relay client: one GetFlows stream, reconnects, sampling, rate limit, burst reading.

One thread reads the stream and aggregates what it reads: flow messages pass ``flow_sample_rate``
and the ``max_flows_per_second`` token bucket on their raw bytes (no decode), go to ``pending``,
and are handed to the sink (the aggregator) a burst at a time: when BATCH have gathered, and
whenever the stream had to be waited for. No second thread takes flows over, so no flow waits
for the GIL between threads. Nothing is dropped for lack of room: when the agent falls behind,
HTTP/2 flow control holds the relay back (the window is ``window_bytes``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import grpc
import grpc.experimental
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from agent.hubble.proto import GET_FLOWS, SERVER_STATUS, flow_pb2, observer_pb2

log = logging.getLogger(__name__)

# Flow fields the metrics read; sent as GetFlowsRequest.field_mask so the relay trims the rest.
FIELD_MASK = (
    "time",
    "verdict",
    "drop_reason",
    "drop_reason_desc",
    "IP",
    "l4",
    "source.namespace",
    "source.pod_name",
    "source.identity",
    "source.workloads",
    "destination.namespace",
    "destination.pod_name",
    "destination.identity",
    "destination.workloads",
    "Type",
    "node_name",
    "l7.type",
    "l7.latency_ns",
    "l7.dns.rcode",
    "l7.dns.qtypes",
    "l7.http.code",
    "l7.http.method",
    "l7.http.url",
    "l7.http.protocol",
    "l7.http.headers",
    "l7.kafka",
    "reply",
    "is_reply",
    "event_type",
    "source_service",
    "destination_service",
    "traffic_direction",
    "policy_match_type",
)
# A trickling stream costs a wake-up per message; after a wait the reader naps NAP so that
# messages queue up and are read in a burst (adds at most NAP of latency, nothing is lost: what
# arrives meanwhile waits in the socket's receive buffer and the HTTP/2 window, both window_bytes,
# see stream_options). Naps are only for slow streams, below NAP_RATE, and only while a nap's pile
# fills at most half the window (else the window, not the relay, would set the pace); the rate is
# measured while reading without naps, PROBE seconds out of every PROBE_EVERY, from the probe's
# first wait on (a nap's pile would inflate it). Only a reader that was idle (neither running nor
# waiting for a CPU) for IDLE_SHARE of a probe naps at all: one that was busy, or starved on a
# loaded host, is about as fast as its stream whatever the rate, and a nap would only put it behind.
# At 5,000 flows/s naps of 50 ms cost the agent 4 to 8% less CPU than naps of 20 ms (bench/RESULTS.md).
#
# It cannot be measured while napping, nor can a wait be told from a read by its duration alone:
# gRPC reads the socket a chunk at a time, and reading a chunk of what piled up can take
# milliseconds on a busy host. A reader that took such reads for waits and napped after each would
# read one chunk per nap (~64 KB per nap) whatever the stream's rate: the slow mode.
# So after a nap, a slow read counts as a wait only once the reader has read what the nap should
# have gathered at the measured rate; if the stream got faster meanwhile, the next probe (within
# PROBE_EVERY) reads what piled up and stops the naps. Naps also stop (but for one a
# second) when they gather no burst of MIN_BURST messages: on a slow host, where every read takes
# longer than IDLE_WAIT, the reader is not slowed further.
IDLE_WAIT = 0.0002
NAP = 0.05
NAP_RATE = 4e6  # bytes/s, ~18k flows/s; a nap then gathers ~200 KB, a fifth of the default window
IDLE_SHARE = 0.5
PROBE, PROBE_EVERY = 0.2, 1.0
MIN_BURST = 8
BATCH = 256  # flows handed to the aggregator at once (fewer when the stream pauses first)
# The stream's receive window and socket buffer, per flow_buffer_size message (4096 -> 1 MiB): how
# far the relay may run ahead of the agent (while it naps or aggregates) before it has to wait.
WINDOW_BYTES_PER_FLOW = 256
_FLOW_TAG = b"\n"  # field 1 (flow), length-delimited: how a flow GetFlowsResponse starts on the wire


def thread_active() -> float:
    """Seconds the calling thread has been running or waiting for a CPU (its schedstat)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            run, wait = f.read().split()[:2]
        return (int(run) + int(wait)) / 1e9
    except (OSError, ValueError):
        return time.thread_time()


def read_in_bursts(
    messages: Iterable[bytes],
    waited: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    active: Callable[[], float] = thread_active,
    window: float = float("inf"),
) -> Iterator[bytes]:
    """Yield ``messages``; after having to wait for one, call ``waited`` and nap (see NAP) so that the
    next ones pile up (in a receive window of ``window`` bytes)."""
    ready = last_nap = probed = clock()  # probed: when the current (or last) probe began measuring
    rate = 0.0  # bytes/s, as the last probe measured
    napping = False  # whether the last probe found a stream to nap for
    probing, measuring, probe_bytes, probe_active = True, True, 0, active()
    quick = read = 0  # messages that were there when asked for, since the last nap / bytes read since
    for raw in messages:
        t = clock()
        if measuring and t - probed >= PROBE:
            idle = active() - probe_active <= (1 - IDLE_SHARE) * (t - probed)
            rate, probing, measuring = (probe_bytes / (t - probed) if idle else NAP_RATE), False, False
            napping = rate < NAP_RATE and rate * NAP <= window / 2
        elif not probing and t - probed >= PROBE_EVERY:
            probing = True  # it measures from its first wait on: a nap's pile would inflate the rate
        if t - ready <= IDLE_WAIT:
            quick += 1
        elif probing or read >= rate * NAP:  # a wait, not the next chunk of a nap's pile
            waited()
            if probing and not measuring:
                measuring, probe_bytes, probe_active, probed = True, 0, active(), t
            elif not probing and napping and (quick >= MIN_BURST or t - last_nap > 1.0):
                sleep(NAP)
                quick = read = 0
                last_nap = t
        size = len(raw)
        read += size
        if measuring:
            probe_bytes += size
        yield raw
        ready = clock()


def stream_options(window_bytes: int) -> list[tuple[str, Any]]:
    """Channel options for reading GetFlows: the stream's HTTP/2 window and the socket's receive buffer
    both ``window_bytes``, so that much may arrive while the reader naps or aggregates."""
    return [
        (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
        ("grpc.http2.lookahead_bytes", window_bytes),
        ("grpc.http2.bdp_probe", 0),  # else gRPC resizes that window from its bandwidth estimate
        ("grpc.tcp_receive_buffer_size", window_bytes),  # else the kernel's 128 KiB until autotuning grows it
    ]


class FlowSink(Protocol):
    """What the stream hands flows to (the aggregator)."""

    high_water_ns: int

    def begin_resume(self) -> None: ...

    def add_burst(self, pending: deque) -> None: ...


@dataclass
class Backoff:
    """Exponential reconnect backoff with full jitter."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnect attempt ``attempt`` (0-based)."""
        cap = min(self.maximum, self.initial * self.factor**attempt)
        return random.uniform(cap / 2, cap)


@dataclass
class StreamStats:
    """Reader-side counters (self-metrics)."""

    received: int = 0
    sampled_out: int = 0
    rate_limited: int = 0
    reconnects: int = 0
    connected: bool = False
    last_error: str = "not connected yet"
    server_status: dict[str, float] = field(default_factory=dict)


class TokenBucket:
    """``rate`` tokens per second, at most a tenth of a second's worth banked; starts empty."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate / 10)
        self.tokens = 0.0
        self.last = time.monotonic()

    def take(self) -> bool:
        """One token if available (the clock is read only when the tokens in hand are used up)."""
        if self.tokens < 1.0:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens < 1.0:
                return False
        self.tokens -= 1.0
        return True


class FlowStream:
    """Owns the channel and the reader thread, which reads flows and hands them to ``sink`` in bursts."""

    def __init__(
        self,
        target: str,
        credentials: Optional[grpc.ChannelCredentials],
        options: list[tuple[str, Any]],
        node_filter: Optional[str],
        sink: FlowSink,
        window_bytes: int,
        sample_rate: int,
        max_per_second: int,
    ) -> None:
        self.target = target
        self.credentials = credentials
        self.options = [*options, *stream_options(window_bytes)]
        self.window_bytes = window_bytes
        self.node_filter = node_filter
        self.sink = sink
        self.pending: deque = deque()  # flows read and not yet aggregated (at most BATCH)
        self.sample_rate = sample_rate
        self.bucket = TokenBucket(max_per_second)
        self.backoff = Backoff()
        self.stats = StreamStats()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._channel: Optional[grpc.Channel] = None
        self._call: Any = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the reader thread (returns at once)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="hubble-reader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancel the stream and join the reader."""
        self._stop.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
            if self._channel is not None:
                self._channel.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def request(self) -> observer_pb2.GetFlowsRequest:
        """The GetFlows request for the next stream: follow, node filter, resume point, field mask."""
        req = observer_pb2.GetFlowsRequest(follow=True, field_mask=FieldMask(paths=FIELD_MASK))
        if self.node_filter:
            req.whitelist.append(flow_pb2.FlowFilter(node_name=[self.node_filter]))
        since = self.sink.high_water_ns
        if since:
            req.since.CopyFrom(Timestamp(seconds=since // 1_000_000_000, nanos=since % 1_000_000_000))
        return req

    def _open(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.target, options=self.options)
        return grpc.secure_channel(self.target, self.credentials, options=self.options)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            channel = self._open()
            with self._lock:
                self._channel = channel
            try:
                self._server_status(channel)
                got = self._stream(channel)
                attempt = 0 if got else attempt + 1
                self.stats.last_error = "stream ended by the relay"
            except grpc.RpcError as exc:
                attempt += 1
                code = exc.code() if hasattr(exc, "code") else None
                self.stats.last_error = f"{code.name if code else 'error'}: {exc.details() if code else exc}"
            except Exception as exc:  # anything else: report it and keep reconnecting, never die quietly
                attempt += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("hubble: reader error: %s", self.stats.last_error)
            finally:
                self.stats.connected = False
                self.sink.add_burst(self.pending)  # what this stream delivered is counted before the next
                channel.close()
            if self._stop.is_set():
                break
            self.stats.reconnects += 1
            delay = self.backoff.delay(attempt)
            log.info("hubble: %s; reconnecting in %.2fs", self.stats.last_error, delay)
            self._stop.wait(delay)

    def _server_status(self, channel: grpc.Channel) -> None:
        call = channel.unary_unary(
            SERVER_STATUS,
            request_serializer=observer_pb2.ServerStatusRequest.SerializeToString,
            response_deserializer=observer_pb2.ServerStatusResponse.FromString,
        )
        try:
            st = call(observer_pb2.ServerStatusRequest(), timeout=5)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:  # reachability and TLS fail here
                raise
            return
        status = {"num_flows": st.num_flows, "max_flows": st.max_flows, "seen_flows": st.seen_flows}
        if st.HasField("num_connected_nodes"):
            status["connected_nodes"] = st.num_connected_nodes.value
        if st.HasField("num_unavailable_nodes"):
            status["unavailable_nodes"] = st.num_unavailable_nodes.value
        self.stats.server_status = status

    def _stream(self, channel: grpc.Channel) -> bool:
        """Read one GetFlows stream to its end; True when it delivered anything."""
        call = channel.unary_stream(
            GET_FLOWS, request_serializer=observer_pb2.GetFlowsRequest.SerializeToString, response_deserializer=None
        )(self.request())
        with self._lock:
            self._call = call
        if self._stop.is_set():
            call.cancel()
        sink, pending, st = self.sink, self.pending, self.stats
        sink.begin_resume()
        st.connected = True
        st.last_error = ""
        sample = self.sample_rate
        p = 1.0 / sample
        rnd = random.random
        take = self.bucket.take
        add_burst = sink.add_burst
        got = False
        for raw in read_in_bursts(call, lambda: add_burst(pending), window=self.window_bytes):
            got = True
            st.received += 1
            if raw[:1] == _FLOW_TAG:
                if sample > 1 and rnd() >= p:
                    st.sampled_out += 1
                    continue
                if not take():
                    st.rate_limited += 1
                    continue
            pending.append(raw)
            if len(pending) >= BATCH:
                add_burst(pending)
        return got
