"""Prometheus exposition of the registry: a prometheus_client custom collector behind an HTTP server."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from agent.config import PrometheusConfig, listen_pair
from agent.registry import HistogramSample, Kind, MetricFamily, Registry

log = logging.getLogger(__name__)


def to_prometheus(fam: MetricFamily) -> Metric:
    """One registry family as a prometheus_client family (counters get ``_total``)."""
    labels = list(fam.label_names)
    if fam.kind is Kind.HISTOGRAM:
        hist = HistogramMetricFamily(fam.name, fam.help, labels=labels)
        for s in fam.samples:
            assert isinstance(s, HistogramSample)
            cumulative, buckets = 0.0, []
            for bound, n in zip(s.bounds, s.counts):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            buckets.append(("+Inf", s.count))
            hist.add_metric(list(s.labels), buckets, s.sum)
        return hist
    cls = CounterMetricFamily if fam.kind is Kind.COUNTER else GaugeMetricFamily
    out = cls(fam.name, fam.help, labels=labels)
    for s in fam.samples:
        out.add_metric(list(s.labels), s.value)  # type: ignore[union-attr]
    return out


class RegistryBridge:
    """prometheus_client collector that reads the registry at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.last_duration = 0.0

    def collect(self) -> Iterator[Metric]:
        start = time.monotonic()
        families = self.registry.collect()
        for fam in families:
            yield to_prometheus(fam)
        scrape = GaugeMetricFamily(
            "tfo_agent_scrape_duration_seconds", "Time the previous scrape took to read every source."
        )
        scrape.add_metric([], self.last_duration)
        yield scrape
        self.last_duration = time.monotonic() - start


class PrometheusExporter:
    """Serves ``/metrics`` on ``exporters.prometheus.listen_address``."""

    def __init__(self, cfg: PrometheusConfig, registry: Registry) -> None:
        self.cfg = cfg
        self.prom = CollectorRegistry(auto_describe=False)
        self.prom.register(RegistryBridge(registry))  # type: ignore[arg-type]
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def render(self) -> bytes:
        return generate_latest(self.prom)

    def start(self) -> None:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, exporter.render())
                elif self.path == "/":
                    self._send(200, "text/html", b'<html><body><a href="/metrics">Metrics</a></body></html>')
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("http: " + format, *args)

        host, port = listen_pair(self.cfg.listen_address)
        ThreadingHTTPServer.daemon_threads = True
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="prometheus", daemon=True)
        self._thread.start()
        log.info("serving metrics on http://%s/metrics", self.cfg.listen_address)

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
