"""HTTP/1.x collector: requests, responses and durations per process and direction (``bpf/http.bpf.h``).

Plaintext from the syscall hooks (every TCP socket), TLS from uprobes on OpenSSL's SSL_read and
SSL_write (``agent/collectors/tls.py``). Exposed as ``ebpf_http_requests_total{comm,direction,method}``,
``ebpf_http_responses_total{comm,direction,method,status}`` and
``ebpf_http_request_duration_seconds{comm,direction}`` (request to response; its count is the
responses'), with ``direction`` client (the process sent the request) or server (it received it),
and the self-metrics ``tfo_agent_http_parse_errors_total{reason}`` and ``tfo_agent_http_tls_libraries{probes}``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

from agent.collectors.l7 import L7Collector, add_hist
from agent.collectors.tls import EXPORTED, INTERNAL, TlsProbes
from agent.filters import UNIT
from agent.l7names import METHODS
from agent.registry import Kind, MetricFamily

HTTP_REQUEST, HTTP_RESPONSE = 1, 2
DIRECTIONS = ("", "client", "server")


class HttpCollector(L7Collector):
    """HTTP/1.x at the socket syscalls and at OpenSSL's read/write."""

    name = "http"
    switch = "collect_http"
    feature = 8  # F_HTTP
    pinned = ("http_counts", "http_duration", "http_errors")
    errors_map = "http_errors"
    error_reasons = ("truncated", "unmatched_response", "unanswered_request")

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.tls: Optional[TlsProbes] = None

    def start(self, pin: bool = True) -> None:
        super().start(pin)
        assert self.obj is not None
        self.tls = TlsProbes(self.obj)
        self.tls.scan(force=True)

    def stop(self) -> None:
        if self.tls:
            self.tls.close()
            self.tls = None
        super().stop()

    def read_l7(self) -> Iterable[MetricFamily]:
        assert self.obj is not None
        if self.tls:
            self.tls.scan()
        requests = MetricFamily(
            "ebpf_http_requests", Kind.COUNTER, "HTTP/1.x requests sent or received.", ("comm", "direction", "method")
        )
        responses = MetricFamily(
            "ebpf_http_responses",
            Kind.COUNTER,
            "HTTP/1.x final responses to the requests counted, by status.",
            ("comm", "direction", "method", "status"),
        )
        duration = MetricFamily(
            "ebpf_http_request_duration_seconds",
            Kind.HISTOGRAM,
            "From an HTTP request to the start of its response (log2 buckets of ns, in seconds).",
            ("comm", "direction"),
        )
        for (comm, what), (n,) in sorted(self.stats.read(self.obj.map("http_counts")).items()):
            direction, method = DIRECTIONS[what.a % 3], METHODS[what.b % len(METHODS)]
            if what.kind == HTTP_REQUEST:
                requests.add((comm, direction, method), n / UNIT)
            else:
                responses.add((comm, direction, method, str(what.code)), n / UNIT)
        for (comm, what), values in sorted(self.stats.read(self.obj.map("http_duration")).items()):
            add_hist(duration, (comm, DIRECTIONS[what.a % 3]), values)
        libraries = MetricFamily(
            "tfo_agent_http_tls_libraries",
            Kind.GAUGE,
            "OpenSSL libraries (libssl.so.3 files) with uprobes attached, by where they are probed.",
            ("probes",),
        )
        for placement, n in (self.tls.placements() if self.tls else dict.fromkeys((INTERNAL, EXPORTED), 0)).items():
            libraries.add((placement,), n)
        return (requests, responses, duration, libraries)
