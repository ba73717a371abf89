"""Prometheus exposition of the registry behind an HTTP server; the text comes from exposition.py."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Union

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent.config import ListenerTlsConfig, PrometheusConfig, listen_pair
from agent.exporters.exposition import Exposition
from agent.registry import Kind, MetricFamily, Registry

log = logging.getLogger(__name__)


Readiness = Callable[[], "tuple[bool, dict[str, str]]"]
HANDLER_TIMEOUT = 10.0  # seconds a client may take to send its request (and finish the TLS handshake)


class _Server(ThreadingHTTPServer):
    """Threaded HTTP server; with an SSL context each connection is TLS, handshaken in its own thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, ssl_context: Optional[ssl.SSLContext]) -> None:
        self.ssl_context = ssl_context
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.ssl_context:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("http: connection from %s failed: %s", client_address, sys.exc_info()[1])


def server_ssl_context(cfg: ListenerTlsConfig) -> ssl.SSLContext:
    """TLS 1.2+ server context from the listener's certificate and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    return ctx


class PrometheusExporter:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``exporters.prometheus.listen_address``.

    ``/healthz`` answers 200 while the process serves; ``/readyz`` answers 200 or 503 with a JSON
    body naming every component that is not ready. With ``basic_auth`` every path but ``/healthz``
    needs the credentials; with ``tls`` the listener speaks HTTPS only.
    """

    def __init__(self, cfg: PrometheusConfig, registry: Registry, readiness: Readiness) -> None:
        self.cfg = cfg
        self.readiness = readiness
        self.registry = registry
        self.exposition = Exposition()
        self.last_duration = 0.0
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        auth = cfg.basic_auth
        self._credentials = (
            "Basic " + base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode() if auth.enabled else ""
        )

    def render(self) -> list[bytes]:
        """The /metrics body, in chunks: every source read now (Hubble's families as of their last window)."""
        start = time.monotonic()
        scrape = MetricFamily(
            "tfo_agent_scrape_duration_seconds", Kind.GAUGE, "Time the previous scrape took to read every source."
        )
        scrape.add((), self.last_duration)
        body = self.exposition.render([*self.registry.collect(), scrape])
        self.last_duration = time.monotonic() - start
        return body

    def authorized(self, header: Optional[str]) -> bool:
        """True when no basic auth is configured or ``header`` carries the configured credentials."""
        if not self._credentials:
            return True
        return hmac.compare_digest((header or "").encode(), self._credentials.encode())

    def ready_body(self) -> tuple[int, bytes]:
        ready, not_ready = self.readiness()
        body = {"status": "ready" if ready else "not ready", "not_ready": not_ready}
        return (200 if ready else 503), (json.dumps(body, indent=2) + "\n").encode()

    def start(self) -> None:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            timeout = HANDLER_TIMEOUT

            def setup(self) -> None:
                super().setup()
                if isinstance(self.request, ssl.SSLSocket):
                    self.request.do_handshake()

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/healthz":
                    self._send(200, "text/plain", b"ok\n")
                elif not exporter.authorized(self.headers.get("Authorization")):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="tfo-agent"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, exporter.render())
                elif path == "/readyz":
                    code, body = exporter.ready_body()
                    self._send(code, "application/json", body)
                elif path == "/":
                    body = b'<html><body><a href="/metrics">Metrics</a> <a href="/readyz">Ready</a></body></html>'
                    self._send(200, "text/html", body)
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, code: int, ctype: str, body: Union[bytes, list[bytes]]) -> None:
                chunks = [body] if isinstance(body, bytes) else body
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(sum(map(len, chunks))))
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(chunk)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("http: " + format, *args)

        host, port = listen_pair(self.cfg.listen_address)
        context = server_ssl_context(self.cfg.tls) if self.cfg.tls.enabled else None
        self._server = _Server((host, port), Handler, context)
        self._thread = threading.Thread(target=self._server.serve_forever, name="prometheus", daemon=True)
        self._thread.start()
        scheme = "https" if context else "http"
        log.info(
            "serving metrics on %s://%s/metrics%s",
            scheme,
            self.cfg.listen_address,
            " (basic auth)" if self._credentials else "",
        )

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
