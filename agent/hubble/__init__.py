"""Cilium Hubble integration: flows from Hubble Relay (or a node's hubble.sock) into hubble_* metrics.

``HubbleIntegration`` is a registry source: ``start()`` launches the reader (it reads the gRPC stream
and aggregates the flows) and the window thread (it closes each ``aggregation_window``),
``collect()`` returns the hubble_* families as of the last closed window plus live
``tfo_agent_hubble_*`` self-metrics. See README.md here.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import time
from typing import Any, Optional

# gRPC's EventEngine client (the default of recent grpcio) reads sockets in its own poller threads,
# so every message of a trickling stream wakes the process however the reader batches. The older
# polling client reads in the thread that waits for the stream, where the reader's naps coalesce
# messages: at 5,000 flows/s ~21% of a core becomes ~7% (bench/RESULTS.md). grpcio 1.51 (Debian 12,
# the EL9 bundle) knows the switch too. It must be set before grpc loads and holds process-wide;
# an explicit GRPC_EXPERIMENTS (even empty) is left alone.
if "grpc" not in sys.modules and "GRPC_EXPERIMENTS" not in os.environ:
    os.environ["GRPC_EXPERIMENTS"] = "-event_engine_client"

import grpc

from agent.config import CiliumConfig, ConfigError
from agent.hubble.aggregator import Aggregator
from agent.hubble.client import WINDOW_BYTES_PER_FLOW, FlowStream
from agent.hubble.families import Groups, namespace_rule
from agent.registry import Kind, MetricFamily

log = logging.getLogger(__name__)

KEY = "integrations.ebpf.cilium"
ENDPOINT_ACTIVE_SECONDS = 300.0  # an endpoint seen in a flow this recently counts in hubble_endpoint_*
FLUSH = 0.1  # a burst the reader has not handed over yet (the stream went quiet) is aggregated this late


def resolve_node_name(cfg: CiliumConfig) -> tuple[str, str]:
    """(node name, where it came from): ``node_name`` config, else ``NODE_NAME`` env, else host name."""
    if cfg.node_name:
        return cfg.node_name, "config"
    env = os.environ.get("NODE_NAME", "").strip()
    if env:
        return env, "env"
    return socket.gethostname(), "hostname"


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        why = "missing" if not os.path.exists(path) else f"not readable ({exc.strerror})"
        raise ConfigError(f"{KEY}.{key}: expected a readable file, found {path!r} ({why})") from None


def channel_security(cfg: CiliumConfig) -> tuple[Optional[grpc.ChannelCredentials], list[tuple[str, str]]]:
    """gRPC credentials and options for ``hubble_address``; raises ConfigError on unusable TLS files.

    ``unix://`` addresses (the node's own hubble.sock) are always plaintext, as Cilium serves them.
    """
    if cfg.hubble_address.startswith("unix://") or not cfg.hubble_tls_enabled:
        return None, []
    ca = _read("hubble_tls_ca", cfg.hubble_tls_ca) if cfg.hubble_tls_ca else None
    cert = key = None
    if cfg.hubble_tls_cert or cfg.hubble_tls_key:
        cert = _read("hubble_tls_cert", cfg.hubble_tls_cert)
        key = _read("hubble_tls_key", cfg.hubble_tls_key)
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = [("grpc.ssl_target_name_override", cfg.hubble_tls_server_name)] if cfg.hubble_tls_server_name else []
    return creds, options


class HubbleIntegration:
    """Registry source for the Cilium Hubble integration."""

    name = "hubble"

    def __init__(self, cfg: CiliumConfig, endpoints: Optional[Any] = None) -> None:
        """``endpoints``: the node's endpoint gauges from the container runtime (agent.cri.endpoints)."""
        self.cfg = cfg
        self.endpoints = endpoints
        self.node_name, self.node_source = resolve_node_name(cfg)
        self.unix = cfg.hubble_address.startswith("unix://")
        credentials, options = channel_security(cfg)
        groups = Groups(
            flows=cfg.collect_flows,
            l7=cfg.collect_l7_flows,
            drops=cfg.collect_drops,
            policies=cfg.collect_policies,
            services=cfg.collect_services,
            node_label=cfg.flow_scope == "cluster",
        )
        self.aggregator = Aggregator(
            groups,
            namespace_rule(cfg.watch_namespaces, cfg.exclude_namespaces),
            scale=cfg.flow_sample_rate,
            max_series=cfg.max_series_per_metric,
        )
        self.aggregator.endpoint_windows = max(1, math.ceil(ENDPOINT_ACTIVE_SECONDS / cfg.aggregation_window))
        node_filter = self.node_name if cfg.flow_scope == "node" and not self.unix else None
        self.stream = FlowStream(
            cfg.hubble_address,
            credentials,
            options,
            node_filter,
            self.aggregator,
            min(cfg.flow_buffer_size * WINDOW_BYTES_PER_FLOW, 2**31 - 1),
            cfg.flow_sample_rate,
            cfg.max_flows_per_second,
        )
        self.queue = self.stream.pending  # flows read and not yet aggregated
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the reader and window threads; returns at once."""
        if self.cfg.kubernetes_enabled:
            log.info(
                "hubble: kubernetes_enabled: labels come from flows; endpoint gauges from %s",
                "the container runtime's pods" if self.endpoints else "flows (cluster scope)",
            )
        self._stop.clear()
        self._thread = threading.Thread(target=self._windows, name="hubble-aggregator", daemon=True)
        self._thread.start()
        self.stream.start()

    def stop(self) -> None:
        """Stop both threads (the pending window is published first)."""
        self.stream.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _windows(self) -> None:
        """Close a window every ``aggregation_window`` and a last one on stop; in between, every
        FLUSH seconds, aggregate a burst the reader left when the stream went quiet."""
        window = self.cfg.aggregation_window
        deadline = time.monotonic() + window
        agg, pending = self.aggregator, self.stream.pending
        while True:
            stopping = self._stop.wait(max(0.0, min(FLUSH, deadline - time.monotonic())))
            if pending:
                agg.add_burst(pending)
            now = time.monotonic()
            if now >= deadline or stopping:
                agg.publish()
                deadline = max(deadline + window, now)
            if stopping:
                return

    def status(self) -> tuple[bool, str]:
        """(ready, reason): ready once connected to the relay."""
        st = self.stream.stats
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return False, "the flow aggregator thread stopped"
        if st.connected:
            return True, f"streaming flows from {self.cfg.hubble_address}"
        return False, f"not connected to {self.cfg.hubble_address}: {st.last_error}"

    def collect(self) -> list[MetricFamily]:
        """hubble_* families (last closed window) and tfo_agent_hubble_* self-metrics (live)."""
        families = self.aggregator.families()
        if self.endpoints is not None:  # node scope: the runtime's pods replace the flows' guess
            node = self.endpoints.families()
            families = [node.get(f.name, f) for f in families]
        return families + self._self_metrics()

    def _self_metrics(self) -> list[MetricFamily]:
        st, agg = self.stream.stats, self.aggregator.stats
        out = []

        def one(name: str, kind: Kind, help_text: str, value: float) -> None:
            out.append(MetricFamily(f"tfo_agent_hubble_{name}", kind, help_text))
            out[-1].add((), value)

        def per(name: str, label: str, help_text: str, values: dict[str, Any]) -> None:
            fam = MetricFamily(f"tfo_agent_hubble_{name}", Kind.COUNTER, help_text, (label,))
            for k, v in sorted(values.items()):
                fam.add((k,), v)
            out.append(fam)

        c, g = Kind.COUNTER, Kind.GAUGE
        one("connected", g, "1 while a GetFlows stream to the relay is open", float(st.connected))
        one("messages_received", c, "GetFlows messages received from the relay", st.received)
        one("flows_sampled_out", c, "Flows skipped by flow_sample_rate", st.sampled_out)
        one("flows_rate_limited", c, "Flows dropped by the max_flows_per_second token bucket", st.rate_limited)
        one("buffer_overflow", c, "Flows dropped for lack of room (none: a relay the agent lags waits)", 0)
        one("buffer_used", g, "Flows read from the stream and not aggregated yet", len(self.queue))
        one("reconnects", c, "Reconnections to the relay", st.reconnects)
        one(
            "flows_processed",
            c,
            "Flows aggregated into hubble_* metrics (before sampling scale-up)",
            agg.flows_processed,
        )
        one("flows_filtered", c, "Flows skipped by watch_namespaces / exclude_namespaces", agg.flows_filtered)
        one("flows_duplicate", c, "Flows re-sent after a reconnect and skipped (already counted)", agg.flows_duplicate)
        one("decode_errors", c, "Messages that could not be decoded and were skipped", agg.decode_errors)
        one("flow_errors", c, "Decoded flows the aggregator failed on and skipped", agg.flow_errors)
        one("windows", c, "Aggregation windows published", agg.windows)
        per("lost_events", "source", "Events the relay reported lost (lost_events notices)", agg.lost_events)
        per("node_status_events", "state", "Node status notices from the relay", agg.node_status)
        per(
            "series_overflow",
            "metric",
            "Flow counts folded into the __overflow__ series by the cap",
            agg.series_overflow,
        )
        for key, value in sorted(st.server_status.items()):
            one(f"relay_{key}", g, f"Hubble ServerStatus {key} at the last connect", value)
        info = MetricFamily(
            "tfo_agent_hubble_node_info",
            g,
            "Node name this agent uses and where it came from",
            ("node", "source", "scope"),
        )
        info.add((self.node_name, self.node_source, self.cfg.flow_scope), 1)
        out.append(info)
        return out
