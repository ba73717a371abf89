"""The integration manager: starts, supervises and stops collectors; reports their state as self-metrics."""

from __future__ import annotations

import logging
import platform
import threading
from collections.abc import Iterable
from typing import Optional

from agent import __version__, host
from agent.collectors import BpfCollector, CollectorError
from agent.collectors.catalog import COLLECTORS
from agent.config import Config
from agent.filters import Filters
from agent.registry import Kind, MetricFamily, Registry

log = logging.getLogger(__name__)

RESCAN_SECONDS = 2.0


def unavailable_features(cfg: Config) -> list[str]:
    """Config switches that are on but that this build cannot serve (reported, never ignored)."""
    ebpf = cfg.ebpf
    built = {c.switch for c in COLLECTORS}
    missing = []
    if ebpf.enabled:
        switches = [f for f in vars(ebpf) if f.startswith("collect_")]
        missing += [s for s in switches if getattr(ebpf, s) and s not in built]
        if ebpf.namespace_filter:
            missing.append("namespace_filter")
    return missing


class IntegrationManager:
    """Owns the collectors of one config; a collector that cannot start is reported, the rest run."""

    name = "tfo_agent"

    def __init__(self, cfg: Config, registry: Registry) -> None:
        self.cfg = cfg
        self.registry = registry
        self.filters = Filters.from_config(cfg.ebpf)
        self.collectors: list[BpfCollector] = []
        self.unavailable = unavailable_features(cfg)
        self._stop = threading.Event()
        self._rescan: Optional[threading.Thread] = None

    def start(self) -> None:
        ebpf = self.cfg.ebpf
        for feature in self.unavailable:
            log.warning("%s is enabled but not available in this build of tfo-agent %s", feature, __version__)
        if ebpf.enabled:
            host.raise_memlock()
            for target, fstype in ((host.BPFFS, "bpf"), (host.TRACEFS, "tracefs")):
                state = host.ensure_mounted(target, fstype)
                if not state.startswith("mounted"):
                    log.warning("%s at %s: %s", fstype, target, state)
            for cls in COLLECTORS:
                if getattr(ebpf, cls.switch):
                    self._start_collector(cls(ebpf, self.filters))
        self.registry.register(self)
        if self.filters.containers:
            self._rescan = threading.Thread(target=self._rescan_loop, name="cgroup-rescan", daemon=True)
            self._rescan.start()

    def _start_collector(self, collector: BpfCollector) -> None:
        self.collectors.append(collector)
        try:
            collector.start()
            log.info("collector %s attached (%s)", collector.name, collector.attach_type)
        except CollectorError as exc:
            log.error("collector %s not attached: %s", collector.name, exc)
            return
        self.registry.register(collector)

    def _rescan_loop(self) -> None:
        while not self._stop.wait(RESCAN_SECONDS):
            try:
                if self.filters.rescan():
                    for c in self.collectors:
                        c.apply_filters()
            except Exception as exc:  # keep rescanning; report once per failure
                log.warning("container filter rescan failed: %s", exc)

    def stop(self) -> None:
        """Detach every program; pinned maps stay so counters continue after a restart."""
        self._stop.set()
        for c in self.collectors:
            self.registry.unregister(c.name)
            c.stop()
        self.registry.unregister(self.name)

    def collect(self) -> Iterable[MetricFamily]:
        """Self-metrics an operator needs to trust the others."""
        info = MetricFamily(
            "tfo_agent_build_info", Kind.GAUGE, "Build of the running agent.", ("version", "python", "arch")
        )
        info.add((__version__, platform.python_version(), platform.machine()), 1)
        up = MetricFamily("tfo_agent_collector_up", Kind.GAUGE, "1 when the collector is attached.", ("collector",))
        failure = MetricFamily(
            "tfo_agent_collector_failure_info", Kind.GAUGE, "Why a collector is not attached.", ("collector", "reason")
        )
        attached = MetricFamily(
            "tfo_agent_program_attached",
            Kind.GAUGE,
            "Attached BPF programs and how.",
            ("collector", "program", "attach_type"),
        )
        read_errors = MetricFamily(
            "tfo_agent_map_read_errors", Kind.COUNTER, "Failed reads of BPF maps.", ("collector",)
        )
        map_full = MetricFamily(
            "tfo_agent_map_full_events", Kind.COUNTER, "Events not recorded because a BPF map was full.", ("collector",)
        )
        for c in self.collectors:
            up.add((c.name,), int(c.up))
            if c.error:
                failure.add((c.name, c.error), 1)
            for link in c.links:
                attached.add((c.name, link.program, c.attach_type), 1)
            read_errors.add((c.name,), c.read_errors)
            map_full.add((c.name,), c.map_full_events())
        sample = MetricFamily("tfo_agent_sample_rate_percent", Kind.GAUGE, "Configured eBPF sample_rate.")
        sample.add((), self.filters.sample_rate)
        missing = MetricFamily(
            "tfo_agent_feature_unavailable",
            Kind.GAUGE,
            "Features the config enables that this build does not have.",
            ("feature",),
        )
        for feature in self.unavailable:
            missing.add((feature,), 1)
        return (info, up, failure, attached, read_errors, map_full, sample, missing)
