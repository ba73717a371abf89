"""OTLP metrics push: the registry as OpenTelemetry SDK ``MetricsData``, sent by the SDK's OTLP exporters.

Every ``interval`` one thread reads ``Registry.collect()`` (the same read a Prometheus scrape does),
builds ``MetricsData`` from it and hands it to the OTLP/gRPC or OTLP/HTTP exporter. Counters are
cumulative monotonic sums, gauges gauges, histograms explicit-bucket histograms with the registry's
bounds and counts, so OTLP and Prometheus show the same numbers.

Resilience: exports are cumulative, so a batch that could not be delivered is simply dropped and
the next one carries everything counted meanwhile. At most one batch exists at a time (memory does
not grow while the endpoint is down); after a failure the next attempt waits ``interval`` doubled
per consecutive failure, up to ``max_backoff``. Nothing here runs on a collector's or scrape's path.
"""

from __future__ import annotations

import logging
import platform
import socket
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import grpc
import requests
import urllib3
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from agent import __version__
from agent.config import OtlpConfig
from agent.registry import HistogramSample, Kind, MetricFamily, Registry, Sample

log = logging.getLogger(__name__)

SCOPE = "tfo-agent"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm32", "ppc64le": "ppc64", "s390x": "s390x"}


def resource_attributes(extra: dict[str, str]) -> dict[str, str]:
    """The semantic-convention resource attributes of this agent, then the configured extras."""
    machine = platform.machine()
    attrs = {
        "service.name": "tfo-agent",
        "service.version": __version__,
        "host.name": socket.gethostname(),
        "host.arch": _ARCH.get(machine, machine),
        "os.type": platform.system().lower(),
    }
    attrs.update(extra)
    return attrs


def integer_buckets(counts: Sequence[float]) -> list[int]:
    """Per-bucket counts as OTLP's integers, rounding the *cumulative* counts so totals stay exact."""
    out, cumulative, previous = [], 0.0, 0
    for n in counts:
        cumulative += n
        rounded = round(cumulative)
        out.append(rounded - previous)
        previous = rounded
    return out


def to_metrics_data(
    families: Sequence[MetricFamily], resource: dict[str, str], start_ns: int, now_ns: int
) -> MetricsData:
    """Registry families -> SDK ``MetricsData`` (one resource, one scope)."""
    cumulative = AggregationTemporality.CUMULATIVE
    metrics = []
    for fam in families:
        if not fam.samples:  # OTLP has no empty metric
            continue
        data: Any
        if fam.kind is Kind.HISTOGRAM:
            points = []
            for s in fam.samples:
                assert isinstance(s, HistogramSample)
                buckets = integer_buckets(s.counts)
                points.append(
                    HistogramDataPoint(
                        attributes=dict(zip(fam.label_names, s.labels)),
                        start_time_unix_nano=start_ns,
                        time_unix_nano=now_ns,
                        count=sum(buckets),
                        sum=s.sum,
                        bucket_counts=buckets,
                        explicit_bounds=list(s.bounds),
                        min=None,  # type: ignore[arg-type]  # unknown: the kernel keeps buckets only
                        max=None,  # type: ignore[arg-type]
                    )
                )
            data = Histogram(data_points=points, aggregation_temporality=cumulative)
        else:
            start = start_ns if fam.kind is Kind.COUNTER else 0
            numbers = [
                NumberDataPoint(
                    attributes=dict(zip(fam.label_names, s.labels)),
                    start_time_unix_nano=start,
                    time_unix_nano=now_ns,
                    value=s.value,
                )
                for s in fam.samples
                if isinstance(s, Sample)
            ]
            if fam.kind is Kind.COUNTER:
                data = Sum(data_points=numbers, aggregation_temporality=cumulative, is_monotonic=True)
            else:
                data = Gauge(data_points=numbers)
        metrics.append(Metric(name=fam.name, description=fam.help, unit="", data=data))
    scope = ScopeMetrics(scope=InstrumentationScope(SCOPE, __version__), metrics=metrics, schema_url="")
    return MetricsData(resource_metrics=[ResourceMetrics(Resource(resource), [scope], schema_url="")])


def _read(path: str) -> Optional[bytes]:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


class _NoVerifySession(requests.Session):
    """``tls.insecure_skip_verify`` over HTTP: the SDK passes ``verify`` on each request, so override it here."""

    def request(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["verify"] = False
        return super().request(*args, **kwargs)


def build_sdk_exporter(cfg: OtlpConfig) -> MetricExporter:
    """The SDK's OTLP metric exporter for ``cfg`` (gRPC or HTTP/protobuf, TLS or plaintext)."""
    tls = cfg.tls
    if cfg.protocol == "grpc":
        credentials = None
        if tls.enabled:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls.ca_file),
                private_key=_read(tls.key_file),
                certificate_chain=_read(tls.cert_file),
            )
        endpoint = cfg.endpoint.split("://", 1)[-1]
        return GrpcExporter(
            endpoint=endpoint,
            insecure=not tls.enabled,
            credentials=credentials,
            headers=dict(cfg.headers),
            timeout=cfg.timeout,
            compression=grpc.Compression.Gzip if cfg.compression == "gzip" else grpc.Compression.NoCompression,
        )
    base = cfg.endpoint if "://" in cfg.endpoint else ("https://" if tls.enabled else "http://") + cfg.endpoint
    session = requests.Session()
    if tls.enabled and tls.insecure_skip_verify:
        log.warning("OTLP endpoint %s: TLS certificate verification is off (insecure_skip_verify)", base)
        warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)  # said once, above
        session = _NoVerifySession()
    return HttpExporter(
        endpoint=base.rstrip("/") + "/v1/metrics",
        certificate_file=(tls.ca_file or None) if tls.enabled else None,
        client_certificate_file=(tls.cert_file or None) if tls.enabled else None,
        client_key_file=(tls.key_file or None) if tls.enabled else None,
        headers=dict(cfg.headers),
        timeout=cfg.timeout,
        compression=Compression.Gzip if cfg.compression == "gzip" else Compression.NoCompression,
        session=session,
    )


class OtlpExporter:
    """Pushes the registry to ``exporters.otlp`` every ``interval``; a registry source for its self-metrics."""

    name = "otlp_exporter"

    def __init__(self, cfg: OtlpConfig, registry: Registry) -> None:
        self.cfg = cfg
        self.registry = registry
        self.resource = resource_attributes(cfg.resource_attributes)
        self.start_ns = time.time_ns()
        self.successes = 0
        self.failures = 0
        self.dropped = 0
        self.consecutive_failures = 0
        self.last_success = 0.0
        self.last_error = ""
        self.last_points = 0
        self._sdk: Any = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._sdk = build_sdk_exporter(self.cfg)
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()
        log.info(
            "exporting metrics over OTLP/%s to %s every %ss", self.cfg.protocol, self.cfg.endpoint, self.cfg.interval
        )

    def stop(self) -> None:
        """Send a last batch when the endpoint was reachable, then shut the SDK exporter down."""
        self._stop.set()
        if self._thread:
            self._thread.join(self.cfg.timeout + 5)
        if self._sdk is not None:
            if self.consecutive_failures == 0 and self.successes:
                self.export_once()
            self._sdk.shutdown()
            self._sdk = None

    def status(self) -> tuple[bool, str]:
        """Ready unless the latest export failed."""
        if self.consecutive_failures:
            return False, f"{self.consecutive_failures} export(s) in a row failed: {self.last_error}"
        return True, ""

    def export_once(self) -> bool:
        """Collect, convert and send one cumulative batch; True on success (a failed batch is dropped)."""
        try:
            data = to_metrics_data(self.registry.collect(), self.resource, self.start_ns, time.time_ns())
            self.last_points = sum(
                len(m.data.data_points) for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            )
            result = self._sdk.export(data, timeout_millis=self.cfg.timeout * 1000)
            error = "" if result is MetricExportResult.SUCCESS else "endpoint unreachable or batch rejected"
        except Exception as exc:  # a conversion bug or a transport error must not end exporting
            error = f"{type(exc).__name__}: {exc}"
        if not error:
            self.successes += 1
            self.last_success = time.time()
            if self.consecutive_failures:
                log.info(
                    "OTLP export to %s works again after %d failure(s)", self.cfg.endpoint, self.consecutive_failures
                )
            self.consecutive_failures = 0
            self.last_error = ""
            return True
        self.failures += 1
        self.dropped += 1
        self.consecutive_failures += 1
        self.last_error = error
        if self.consecutive_failures == 1:
            log.warning("OTLP export to %s failed: %s (retrying with backoff)", self.cfg.endpoint, error)
        return False

    def next_delay(self) -> float:
        """``interval`` after a success; doubled per consecutive failure, capped at ``max_backoff``."""
        if not self.consecutive_failures:
            return self.cfg.interval
        cap = max(self.cfg.max_backoff, self.cfg.interval)
        return min(self.cfg.interval * 2 ** min(self.consecutive_failures - 1, 32), cap)

    def _run(self) -> None:
        previous = time.monotonic()
        while not self._stop.wait(self.next_delay()):
            now = time.monotonic()
            # Interval ticks that passed without a batch (backoff, or a slow export) count as dropped.
            self.dropped += max(0, round((now - previous) / self.cfg.interval) - 1)
            previous = now
            self.export_once()

    def collect(self) -> list[MetricFamily]:
        """Self-metrics: export results, dropped batches, last success, batch size."""
        exports = MetricFamily("tfo_agent_otlp_exports", Kind.COUNTER, "OTLP export attempts by result.", ("result",))
        exports.add(("success",), self.successes)
        exports.add(("failure",), self.failures)
        dropped = MetricFamily(
            "tfo_agent_otlp_dropped_batches",
            Kind.COUNTER,
            "Batches never delivered (failed or skipped while the endpoint was down or slow); "
            "the next cumulative batch carries their data.",
        )
        dropped.add((), self.dropped)
        last = MetricFamily(
            "tfo_agent_otlp_last_success_timestamp_seconds", Kind.GAUGE, "Unix time of the last delivered batch."
        )
        last.add((), self.last_success)
        points = MetricFamily("tfo_agent_otlp_batch_data_points", Kind.GAUGE, "Data points in the latest batch.")
        points.add((), self.last_points)
        return [exports, dropped, last, points]
