"""OTLP export against real receivers on loopback: gRPC (opentelemetry-proto service + grpcio) and HTTP.

The workload is a Python process that renames itself (so ``process_filter`` selects it alone) and
makes a known number of getppid calls, then exits: from then on the agent's syscall series are
still, so an OTLP batch sent afterwards and a Prometheus scrape must agree exactly. Receiver
fixtures come before ``agent_factory`` so they outlive the agents (which send a last batch on stop).
"""

from __future__ import annotations

import gzip
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional

import grpc
import pytest
import trustme
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.metrics.v1 import metrics_pb2
from prometheus_client.utils import floatToGoString

from agent import __version__
from agent.exporters.otlp import integer_buckets, to_metrics_data
from agent.registry import Kind, MetricFamily
from tests.conftest import Agent, Series, free_port, getppid_workload, wait_for

ExportRequest = metrics_service_pb2.ExportMetricsServiceRequest
CUMULATIVE = metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
N_CALLS = 20_000
OUTAGE_SECONDS = 30
RSS_BOUND_KB = 16 * 1024  # allowed RSS growth over the 30 s outage (seen: +0.4 to +5.8 MiB; one batch at a time)


class Receiver:
    """Records what an OTLP receiver got: the latest request and when."""

    def __init__(self) -> None:
        self.port = free_port()
        self.count = 0
        self.latest: Optional[Any] = None
        self.latest_at = 0.0
        self.headers: dict[str, str] = {}
        self._cond = threading.Condition()

    def record(self, request: Any, headers: dict[str, str]) -> None:
        with self._cond:
            self.count += 1
            self.latest, self.latest_at, self.headers = request, time.monotonic(), headers
            self._cond.notify_all()

    def wait_after(self, moment: float, timeout: float = 15.0) -> Any:
        """The first request received after ``moment`` (time.monotonic())."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.latest_at > moment, timeout):
                raise TimeoutError(f"no OTLP request within {timeout}s")
            return self.latest

    def collected_after(self, moment: float, timeout: float = 15.0) -> Any:
        """A request whose metrics were read after ``moment``: the second received after it (the first
        may carry a read from before, sent late on a loaded host; CI once saw it miss the workload's
        last syscalls)."""
        self.wait_after(moment, timeout)
        return self.wait_after(self.latest_at, timeout)


class GrpcReceiver(Receiver, metrics_service_pb2_grpc.MetricsServiceServicer):
    """The OTLP/gRPC metrics service."""

    def __init__(self) -> None:
        super().__init__()
        self.server: Optional[grpc.Server] = None

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.record(request, dict(context.invocation_metadata()))
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def start(self, credentials: Optional[grpc.ServerCredentials] = None) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self.server)
        if credentials:
            self.server.add_secure_port(f"127.0.0.1:{self.port}", credentials)
        else:
            self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def stop(self) -> None:
        if self.server:
            self.server.stop(0).wait()
            self.server = None


class HttpReceiver(Receiver):
    """A minimal OTLP/HTTP receiver: POST /v1/metrics with a protobuf body (gzip or not)."""

    def start(self, ssl_context: Optional[ssl.SSLContext] = None) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/v1/metrics":
                    self.send_response(404)
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.record(ExportRequest.FromString(body), {k.lower(): v for k, v in self.headers.items()})
                out = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if ssl_context:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, trustme.LeafCert, Path]:
    """A test CA, a certificate for 127.0.0.1 and the CA's PEM file."""
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("otlp-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ca, ca.issue_cert("127.0.0.1"), ca_file


@pytest.fixture
def grpc_receiver() -> Iterator[GrpcReceiver]:
    r = GrpcReceiver()
    r.start()
    yield r
    r.stop()


@pytest.fixture
def http_receiver() -> Iterator[HttpReceiver]:
    r = HttpReceiver()
    r.start()
    yield r
    r.stop()


def otlp_agent(factory: Callable[..., Agent], otlp: dict[str, Any], name: str) -> Agent:
    return factory(
        {
            "integrations": {"ebpf": {"process_filter": [name]}},
            "exporters": {"otlp": {"enabled": True, "interval": "1s", "timeout": "2s", **otlp}},
        }
    )


def attrs(kvs: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in kvs}


def syscall_metrics(request: Any) -> dict[str, Any]:
    """The request's ebpf_syscall_* metrics by name."""
    return {
        m.name: m
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name.startswith("ebpf_syscall")
    }


def assert_same_as_scrape(request: Any, scrape: Series) -> dict[str, Any]:
    """Every ebpf_syscall_* point of the OTLP request equals the scrape; both have the same series."""
    metrics = syscall_metrics(request)
    assert metrics, "no ebpf_syscall_* metrics in the OTLP request"
    expected: Series = {}
    for name, m in metrics.items():
        kind = m.WhichOneof("data")
        if kind == "sum":
            assert m.sum.is_monotonic and m.sum.aggregation_temporality == CUMULATIVE
            for p in m.sum.data_points:
                expected[(f"{name}_total", frozenset(attrs(p.attributes).items()))] = p.as_double
        elif kind == "histogram":
            assert m.histogram.aggregation_temporality == CUMULATIVE
            for p in m.histogram.data_points:
                labels = attrs(p.attributes)
                cumulative = 0
                for bound, n in zip(p.explicit_bounds, p.bucket_counts):
                    cumulative += n
                    le = frozenset({**labels, "le": floatToGoString(bound)}.items())
                    expected[(f"{name}_bucket", le)] = cumulative
                assert len(p.bucket_counts) == len(p.explicit_bounds) + 1
                expected[(f"{name}_bucket", frozenset({**labels, "le": "+Inf"}.items()))] = p.count
                expected[(f"{name}_count", frozenset(labels.items()))] = p.count
                assert p.count == sum(p.bucket_counts)
                assert scrape[(f"{name}_sum", frozenset(labels.items()))] == pytest.approx(p.sum, rel=1e-9)
        else:
            pytest.fail(f"{name}: unexpected OTLP data {kind}")
    scraped = {k: v for k, v in scrape.items() if k[0].startswith("ebpf_syscall") and not k[0].endswith("_sum")}
    assert scraped == expected
    return metrics


def getppid_count(request: Any) -> float:
    metric = syscall_metrics(request).get("ebpf_syscall_count")
    points = metric.sum.data_points if metric else []
    return next((p.as_double for p in points if attrs(p.attributes) == {"syscall": "getppid"}), 0.0)


def test_grpc_export_agrees_with_prometheus(grpc_receiver: GrpcReceiver, agent_factory: Callable[..., Agent]) -> None:
    name = f"tfootlp{uuid.uuid4().hex[:6]}"
    agent = otlp_agent(
        agent_factory,
        {"endpoint": f"127.0.0.1:{grpc_receiver.port}", "resource_attributes": {"deployment.environment": "test"}},
        name,
    )
    getppid_workload(name, N_CALLS)
    request = grpc_receiver.collected_after(time.monotonic())
    scrape = agent.scrape()
    metrics = assert_same_as_scrape(request, scrape)
    assert getppid_count(request) == N_CALLS
    hist = next(m for m in metrics.values() if m.WhichOneof("data") == "histogram")
    assert len(hist.histogram.data_points[0].explicit_bounds) > 10  # the log2 bounds, not a default layout
    resource = attrs(request.resource_metrics[0].resource.attributes)
    assert resource["service.name"] == "tfo-agent"
    assert resource["service.version"] == __version__
    assert resource["os.type"] == "linux"
    assert resource["host.name"] and resource["host.arch"]
    assert resource["deployment.environment"] == "test"
    # the receiver holds the batch before the agent's export() call returns and counts the success
    assert wait_for(lambda: agent.value("tfo_agent_otlp_exports_total", result="success") >= 1, 10)


def test_http_export_agrees_with_prometheus(http_receiver: HttpReceiver, agent_factory: Callable[..., Agent]) -> None:
    name = f"tfootlp{uuid.uuid4().hex[:6]}"
    agent = otlp_agent(
        agent_factory,
        {
            "protocol": "http/protobuf",
            "endpoint": f"http://127.0.0.1:{http_receiver.port}",
            "compression": "gzip",
            "headers": {"x-tfo-token": "s3cret"},
        },
        name,
    )
    getppid_workload(name, N_CALLS)
    request = http_receiver.collected_after(time.monotonic())
    assert_same_as_scrape(request, agent.scrape())
    assert getppid_count(request) == N_CALLS
    assert http_receiver.headers["x-tfo-token"] == "s3cret"
    assert http_receiver.headers["content-encoding"] == "gzip"


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_receiver_outage(grpc_receiver: GrpcReceiver, agent_factory: Callable[..., Agent]) -> None:
    """Receiver down 30 s: /metrics keeps serving, memory stays bounded, nothing counted is lost."""
    name = f"tfootlp{uuid.uuid4().hex[:6]}"
    agent = otlp_agent(agent_factory, {"endpoint": f"127.0.0.1:{grpc_receiver.port}", "max_backoff": "4s"}, name)
    assert agent.proc is not None
    before = getppid_count(grpc_receiver.wait_after(time.monotonic()))
    grpc_receiver.stop()
    down = time.monotonic()
    rss_start = rss_kb(agent.proc.pid)
    rss_max, scrapes = rss_start, 0
    getppid_workload(name, N_CALLS)
    ready_during: Optional[tuple[int, bytes]] = None
    while time.monotonic() - down < OUTAGE_SECONDS:
        assert agent.value("ebpf_syscall_count_total", syscall="getppid") == before + N_CALLS
        scrapes += 1
        rss_max = max(rss_max, rss_kb(agent.proc.pid))
        ready_during = agent.get("/readyz")
        time.sleep(1)
    scrape = agent.scrape()
    failures = scrape[("tfo_agent_otlp_exports_total", frozenset({("result", "failure")}))]
    dropped = scrape[("tfo_agent_otlp_dropped_batches_total", frozenset())]
    print(f"outage: rss {rss_start} kB -> max {rss_max} kB, {failures:.0f} failed exports, {dropped:.0f} dropped")
    assert scrapes >= OUTAGE_SECONDS - 5
    assert rss_max - rss_start <= RSS_BOUND_KB
    assert failures >= 3 and dropped >= failures
    assert ready_during is not None and ready_during[0] == 503 and b'"otlp"' in ready_during[1]
    grpc_receiver.start()
    back = time.monotonic()
    request = grpc_receiver.wait_after(back, timeout=15)
    print(f"first batch {grpc_receiver.latest_at - back:.1f}s after the receiver came back")
    assert getppid_count(request) == before + N_CALLS
    assert_same_as_scrape(request, agent.scrape())
    assert wait_for(lambda: agent.get("/readyz")[0] == 200, timeout=5)


def test_conversion_keeps_bounds_and_exact_totals() -> None:
    """Sampled (fractional) bucket counts become integers without changing the cumulative total."""
    hist = MetricFamily("lat", Kind.HISTOGRAM, "h", ("op",))
    hist.add_histogram(("x",), [1.0, 2.0, 4.0], [0.34, 0.33, 0.33, 2.0], 9.5)
    counter = MetricFamily("ops", Kind.COUNTER, "c", ("op",))
    counter.add(("x",), 3.0)
    gauge = MetricFamily("temp", Kind.GAUGE, "g")
    gauge.add((), 1.5)
    empty = MetricFamily("none", Kind.COUNTER, "no series yet")
    data = to_metrics_data([hist, counter, gauge, empty], {"service.name": "tfo-agent"}, 1, 2)
    metrics = {m.name: m for m in data.resource_metrics[0].scope_metrics[0].metrics}
    assert set(metrics) == {"lat", "ops", "temp"}
    point = metrics["lat"].data.data_points[0]
    assert list(point.explicit_bounds) == [1.0, 2.0, 4.0]
    assert list(point.bucket_counts) == [0, 1, 0, 2] and point.count == 3
    assert dict(point.attributes) == {"op": "x"} and point.start_time_unix_nano == 1
    assert metrics["ops"].data.is_monotonic and metrics["ops"].data.data_points[0].value == 3.0
    assert metrics["temp"].data.data_points[0].value == 1.5
    assert integer_buckets([0.5, 0.5, 0.5, 0.5]) == [0, 1, 1, 0]


def test_grpc_over_tls_with_ca_file(
    agent_factory: Callable[..., Agent], server_cert: tuple[trustme.CA, trustme.LeafCert, Path]
) -> None:
    _, cert, ca_file = server_cert
    receiver = GrpcReceiver()
    key_chain = cert.private_key_pem.bytes(), b"".join(c.bytes() for c in cert.cert_chain_pems)
    receiver.start(grpc.ssl_server_credentials([key_chain]))
    try:
        tls = {"enabled": True, "ca_file": str(ca_file)}
        name = f"tfootlp{uuid.uuid4().hex[:6]}"
        agent = otlp_agent(agent_factory, {"endpoint": f"127.0.0.1:{receiver.port}", "tls": tls}, name)
        getppid_workload(name, 100)
        assert getppid_count(receiver.collected_after(time.monotonic())) == 100
        assert wait_for(lambda: agent.get("/readyz")[0] == 200, 10)  # once export() has returned
    finally:
        receiver.stop()


def test_http_over_tls_insecure_skip_verify(
    agent_factory: Callable[..., Agent], server_cert: tuple[trustme.CA, trustme.LeafCert, Path]
) -> None:
    _, cert, _ = server_cert
    receiver = HttpReceiver()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    receiver.start(context)
    try:
        otlp = {"protocol": "http/protobuf", "endpoint": f"127.0.0.1:{receiver.port}"}
        # Without the CA the certificate is refused; skipping verification (explicitly) delivers.
        untrusted = otlp_agent(agent_factory, {**otlp, "tls": {"enabled": True}}, "tfonobody")
        assert wait_for(lambda: untrusted.value("tfo_agent_otlp_exports_total", result="failure") >= 1, 10)
        assert receiver.count == 0
        agent = otlp_agent(agent_factory, {**otlp, "tls": {"enabled": True, "insecure_skip_verify": True}}, "tfonobody")
        receiver.wait_after(time.monotonic())
        assert wait_for(lambda: agent.value("tfo_agent_otlp_exports_total", result="success") >= 1, 10)
    finally:
        receiver.stop()
