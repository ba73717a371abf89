"""The integration manager: starts, supervises, reloads and stops collectors and exporters.

Collectors (the eBPF collectors of ``agent/collectors/catalog.py`` and, when
``integrations.ebpf.cilium.enabled``, the Hubble integration) are *supervised*: one that fails to
start, or whose reads fail ``CRASH_AFTER`` times in a row, is stopped and started again with
exponential backoff, and reported in the self-metrics, the log and ``/readyz``, while the rest run.
``reload(cfg)`` applies a new, already validated config without touching what did not change.

When the config wants pod metadata (container labels, ``namespace_filter``, or the Hubble endpoint
gauges at node scope with ``kubernetes_enabled``), the manager runs one ``PodMetadata`` (the
container runtime's view, ``agent/cri``) and hands it to the collectors, the filters and Hubble.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable, Optional

from agent import __version__, host
from agent.collectors import BpfCollector
from agent.collectors.catalog import COLLECTORS
from agent.config import Config
from agent.filters import Filters

if TYPE_CHECKING:
    from agent.cri.pods import PodMetadata
from agent.registry import Kind, MetricFamily, Registry

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0
RESCAN_SECONDS = 2.0
CRASH_AFTER = 3  # consecutive failed reads that count as a crash
BACKOFF_BASE, BACKOFF_MAX = 1.0, 60.0
HUBBLE = "hubble"


def _import_error(module: str) -> str:
    """Why ``module`` cannot be imported ("" when it can)."""
    try:
        __import__(module)
    except Exception as exc:  # a half-built optional integration is reported, not fatal
        return f"{type(exc).__name__}: {exc}"
    return ""


def unavailable_features(cfg: Config) -> list[str]:
    """Config switches that are on but that this build cannot serve (reported, never ignored)."""
    ebpf = cfg.ebpf
    built = {c.switch for c in COLLECTORS}
    missing = []
    if ebpf.enabled:
        switches = [f for f in vars(ebpf) if f.startswith("collect_")]
        missing += [s for s in switches if getattr(ebpf, s) and s not in built]
    if ebpf.cilium.enabled and _import_error("agent.hubble"):
        missing.append("cilium")
    if cfg.exporters.otlp.enabled and _import_error("agent.exporters.otlp"):
        missing.append("otlp")
    return missing


def node_endpoints(cfg: Config) -> bool:
    """Do the Hubble endpoint gauges come from the container runtime (node scope, kubernetes_enabled)?"""
    cil = cfg.ebpf.cilium
    return cil.enabled and cil.kubernetes_enabled and cil.flow_scope == "node"


def wants_pods(cfg: Config) -> bool:
    """Does the config need the node's pods (container labels, namespace_filter, node endpoints)?"""
    ebpf = cfg.ebpf
    return (ebpf.enabled and (ebpf.container_labels or bool(ebpf.namespace_filter))) or node_endpoints(cfg)


def new_pods(cfg: Config) -> PodMetadata:
    """A (not yet started) ``PodMetadata`` for ``cfg``, on the tree that keys container counters."""
    from agent.cri.cgroups import hierarchies, key_hierarchy
    from agent.cri.pods import PodMetadata

    return PodMetadata(cfg.ebpf.container_runtime_endpoint, key_hierarchy(hierarchies()), cfg.ebpf.namespace_filter)


class Supervised:
    """One supervised integration: builds it, starts it, and wraps its reads to notice a crash.

    Registered in the registry in place of the integration, so a read that raises is both isolated
    by the registry and counted here.
    """

    def __init__(self, name: str, build: Callable[[], Any]) -> None:
        self.name = name
        self.build = build
        self.impl: Any = None
        self.running = False
        self.error = ""
        self.failures = 0  # consecutive failed starts or crashes: the backoff exponent
        self.read_failures = 0  # consecutive failed reads
        self.restarts = 0
        self.retry_at = 0.0

    def start(self) -> bool:
        """Build (once) and start; on failure remember why and when to try again."""
        try:
            if self.impl is None:
                self.impl = self.build()
            self.impl.start()
        except Exception as exc:
            previous = self.error
            delay = self.fail(str(exc) or type(exc).__name__)
            level = logging.DEBUG if self.error == previous else logging.ERROR  # say each reason once
            log.log(level, "%s not started: %s (retry in %.0fs)", self.name, self.error, delay)
            return False
        self.running, self.error, self.read_failures = True, "", 0
        return True

    def fail(self, error: str) -> float:
        """Record a failure; the next start waits BACKOFF_BASE doubled per consecutive failure."""
        self.error = error
        self.failures += 1
        delay = min(BACKOFF_BASE * 2 ** min(self.failures - 1, 16), BACKOFF_MAX)
        self.retry_at = time.monotonic() + delay
        return delay

    def stop(self) -> None:
        self.running = False
        if self.impl is not None:
            self.impl.stop()

    def collect(self) -> Iterable[MetricFamily]:
        if not self.running:
            return []
        try:
            families = list(self.impl.collect())
        except Exception:
            self.read_failures += 1
            raise
        self.read_failures = 0
        self.failures = 0  # it starts and reads: a later crash backs off from the start again
        return families

    def status(self) -> tuple[bool, str]:
        if not self.running:
            wait = max(0.0, self.retry_at - time.monotonic())
            return False, f"{self.error} (retry in {wait:.0f}s)"
        if hasattr(self.impl, "status"):
            return tuple(self.impl.status())  # type: ignore[return-value]
        return True, ""


class IntegrationManager:
    """Owns collectors and exporters of the running config; supervises collectors; applies reloads."""

    name = "tfo_agent"

    def __init__(self, cfg: Config, registry: Registry) -> None:
        self.cfg = cfg
        self.registry = registry
        self.filters = Filters.from_config(cfg.ebpf)
        self.pods: Optional[PodMetadata] = None
        self.units: dict[str, Supervised] = {}
        self.unavailable = unavailable_features(cfg)
        self.prometheus: Any = None
        self.otlp: Any = None
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload = 0.0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start collectors, then exporters (an unusable listen address raises OSError)."""
        self._report_unavailable()
        if self.cfg.ebpf.enabled:
            self._prepare_host()
        self._start_pods(self.cfg)
        with self._lock:
            self.filters = Filters.from_config(self.cfg.ebpf, self.pods)
            self._apply_collectors(self.cfg, restart_ebpf=False)
        self.registry.register(self)
        self._start_prometheus(self.cfg)
        self._start_otlp(self.cfg)
        self._thread = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._thread.start()

    @staticmethod
    def _prepare_host() -> None:
        """What BPF needs from the host: memlock (old kernels), bpffs and tracefs mounted."""
        host.raise_memlock()
        for target, fstype in ((host.BPFFS, "bpf"), (host.TRACEFS, "tracefs")):
            state = host.ensure_mounted(target, fstype)
            if not state.startswith("mounted"):
                log.warning("%s at %s: %s", fstype, target, state)

    def stop(self) -> None:
        """Stop exporters (OTLP sends a last batch), then detach every program; pinned maps stay."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._stop_otlp()
        if self.prometheus:
            self.prometheus.stop()
        with self._lock:
            for name in list(self.units):
                self._remove(name)
        self._stop_pods()
        self.registry.unregister(self.name)

    # -- pod metadata ----------------------------------------------------------------------------

    def _start_pods(self, cfg: Config) -> None:
        """Run the node's pod metadata when ``cfg`` wants it (outside the manager's lock: its thread
        calls back into the manager)."""
        if not wants_pods(cfg):
            return
        pods = new_pods(cfg)
        pods.start()
        pods.add_listener(self._pods_changed)
        self.registry.register(pods)
        self.pods = pods

    def _stop_pods(self) -> None:
        pods, self.pods = self.pods, None
        if pods is not None:
            self.registry.unregister(pods.name)
            pods.stop()

    def _pods_changed(self) -> None:
        """The pods of namespace_filter's namespaces changed: reprogram the running collectors."""
        with self._lock:
            if self.filters.pods_changed():
                self._apply_filters()

    # -- collectors ------------------------------------------------------------------------------

    def wanted(self, cfg: Config) -> dict[str, Callable[[], Any]]:
        """Name -> builder of every collector ``cfg`` enables and this build has."""
        ebpf = cfg.ebpf
        out: dict[str, Callable[[], Any]] = {}
        if ebpf.enabled:
            for cls in COLLECTORS:
                if getattr(ebpf, cls.switch):
                    out[cls.name] = lambda cls=cls: cls(ebpf, self.filters, self.pods)
        if ebpf.cilium.enabled and "cilium" not in self.unavailable:
            endpoints = self.pods if node_endpoints(cfg) else None

            def hubble() -> Any:
                from agent.cri.endpoints import NodeEndpoints
                from agent.hubble import HubbleIntegration

                return HubbleIntegration(ebpf.cilium, NodeEndpoints(endpoints) if endpoints else None)

            out[HUBBLE] = hubble
        return out

    def _apply_collectors(self, cfg: Config, restart_ebpf: bool, restart_hubble: bool = False) -> list[str]:
        """Bring the running collectors in line with ``cfg``; returns what changed."""
        wanted = self.wanted(cfg)
        changes = []
        for name in list(self.units):
            restart = restart_hubble if name == HUBBLE else restart_ebpf
            if name not in wanted or restart:
                self._remove(name)
                changes.append(f"stopped {name}")
        for name, build in wanted.items():
            if name in self.units:
                continue
            unit = Supervised(name, build)
            self.units[name] = unit
            self.registry.register(unit)
            if unit.start():
                log.info("%s started%s", name, self._how(unit))
            changes.append(f"started {name}")
        return changes

    @staticmethod
    def _how(unit: Supervised) -> str:
        impl = unit.impl
        return f" (attached via {impl.mode.label})" if isinstance(impl, BpfCollector) and impl.mode else ""

    def _remove(self, name: str) -> None:
        unit = self.units.pop(name)
        self.registry.unregister(name)
        try:
            unit.stop()
        except Exception as exc:
            log.warning("stopping %s failed: %s", name, exc)

    def _supervise(self) -> None:
        """Restart crashed or not-yet-started collectors with backoff; rescan container cgroups."""
        next_rescan = time.monotonic() + RESCAN_SECONDS
        while not self._stop.wait(TICK_SECONDS):
            with self._lock:
                for unit in list(self.units.values()):
                    self._check(unit)
                if self.filters.containers and time.monotonic() >= next_rescan:
                    next_rescan = time.monotonic() + RESCAN_SECONDS
                    self._rescan()

    def _check(self, unit: Supervised) -> None:
        if unit.running and unit.read_failures >= CRASH_AFTER:
            delay = unit.fail(f"crashed: {unit.read_failures} reads in a row failed")
            log.error("%s %s; restarting in %.0fs", unit.name, unit.error, delay)
            try:
                unit.stop()
            except Exception as exc:
                log.warning("stopping %s failed: %s", unit.name, exc)
        elif not unit.running and time.monotonic() >= unit.retry_at:
            unit.restarts += 1
            if unit.start():
                log.info("%s restarted (restart %d)%s", unit.name, unit.restarts, self._how(unit))

    def _rescan(self) -> None:
        try:
            if self.filters.rescan():
                self._apply_filters()
        except Exception as exc:  # keep rescanning
            log.warning("container filter rescan failed: %s", exc)

    def _apply_filters(self) -> None:
        for unit in self.units.values():
            if unit.running and isinstance(unit.impl, BpfCollector):
                unit.impl.apply_filters()

    # -- exporters -------------------------------------------------------------------------------

    def _start_prometheus(self, cfg: Config) -> None:
        from agent.exporters.prometheus import PrometheusExporter

        if cfg.exporters.prometheus.enabled:
            self.prometheus = PrometheusExporter(cfg.exporters.prometheus, self.registry, self.readiness)
            self.prometheus.start()

    def _start_otlp(self, cfg: Config) -> None:
        if not cfg.exporters.otlp.enabled or "otlp" in self.unavailable:
            return
        from agent.exporters.otlp import OtlpExporter

        self.otlp = OtlpExporter(cfg.exporters.otlp, self.registry)
        self.otlp.start()
        self.registry.register(self.otlp)

    def _stop_otlp(self) -> None:
        if self.otlp:
            self.registry.unregister(self.otlp.name)
            self.otlp.stop()
            self.otlp = None

    # -- reload ----------------------------------------------------------------------------------

    def reload(self, new: Config) -> list[str]:
        """Apply a validated config; what did not change keeps running (no detach, no counter reset)."""
        old = self.cfg
        changes: list[str] = []
        new_pods = (wants_pods(old), old.ebpf.container_runtime_endpoint, node_endpoints(old)) != (
            wants_pods(new),
            new.ebpf.container_runtime_endpoint,
            node_endpoints(new),
        )
        if new_pods:  # outside the lock: the metadata thread calls back into the manager
            self._stop_pods()
            self._start_pods(new)
            changes.append("pod metadata")
        elif self.pods is not None and old.ebpf.namespace_filter != new.ebpf.namespace_filter:
            self.pods.set_namespaces(new.ebpf.namespace_filter)
        with self._lock:
            self.unavailable = unavailable_features(new)
            self._report_unavailable()
            # labels change the kernel maps' layout; collectors and Hubble hold the pod metadata
            ebpf_keys = ("programs_path", "pin_path", "btf_path", "labels")
            restart_ebpf = new_pods or any(getattr(old.ebpf, k) != getattr(new.ebpf, k) for k in ebpf_keys)
            if new.ebpf.enabled and not old.ebpf.enabled:
                self._prepare_host()
            self.filters.pods = self.pods
            if self.filters.update(new.ebpf):
                changes.append("filters")
            restart_hubble = new_pods or old.ebpf.cilium != new.ebpf.cilium
            changes += self._apply_collectors(new, restart_ebpf, restart_hubble=restart_hubble)
            for unit in self.units.values():
                if isinstance(unit.impl, BpfCollector):
                    unit.impl.cfg = new.ebpf
            if "filters" in changes:
                self._apply_filters()
            self.cfg = new
        if old.exporters.otlp != new.exporters.otlp:
            self._stop_otlp()
            self._start_otlp(new)
            changes.append("otlp exporter")
        if old.exporters.prometheus != new.exporters.prometheus:
            self._restart_prometheus(old, new)
            changes.append("prometheus listener")
        if old.logging != new.logging:
            changes.append("logging")
        self.reloads["success"] += 1
        self.last_reload = time.time()
        return changes

    def reload_failed(self) -> None:
        """Count a rejected reload (the caller logged why)."""
        self.reloads["failure"] += 1

    def _restart_prometheus(self, old: Config, new: Config) -> None:
        if self.prometheus:
            self.prometheus.stop()
            self.prometheus = None
        try:
            self._start_prometheus(new)
        except OSError as exc:
            log.error("cannot serve on %s: %s; keeping the previous listener", new.exporters.prometheus, exc)
            self._start_prometheus(old)

    def _report_unavailable(self) -> None:
        for feature in self.unavailable:
            log.warning("%s is enabled but not available in this build of tfo-agent %s", feature, __version__)

    # -- health and self-metrics -----------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, {component: why not}) over every enabled collector and the OTLP exporter."""
        not_ready: dict[str, str] = {}
        with self._lock:
            units = list(self.units.values())
        for unit in units:
            ok, reason = unit.status()
            if not ok:
                not_ready[unit.name] = reason
        if self.otlp:
            ok, reason = self.otlp.status()
            if not ok:
                not_ready["otlp"] = reason
        return not not_ready, not_ready

    def collect(self) -> Iterable[MetricFamily]:
        """Self-metrics an operator needs to trust the others."""
        info = MetricFamily(
            "tfo_agent_build_info", Kind.GAUGE, "Build of the running agent.", ("version", "python", "arch")
        )
        info.add((__version__, platform.python_version(), platform.machine()), 1)
        up = MetricFamily("tfo_agent_collector_up", Kind.GAUGE, "1 when the collector runs.", ("collector",))
        failure = MetricFamily(
            "tfo_agent_collector_failure_info", Kind.GAUGE, "Why a collector is not running.", ("collector", "reason")
        )
        restarts = MetricFamily(
            "tfo_agent_collector_restarts", Kind.COUNTER, "Restart attempts after a failure.", ("collector",)
        )
        attached = MetricFamily(
            "tfo_agent_program_attached",
            Kind.GAUGE,
            "Attached BPF programs and how (variant: the object's build, e.g. compat, cast, or empty).",
            ("collector", "program", "attach_type", "variant"),
        )
        read_errors = MetricFamily(
            "tfo_agent_map_read_errors", Kind.COUNTER, "Failed reads of BPF maps.", ("collector",)
        )
        map_full = MetricFamily(
            "tfo_agent_map_full_events", Kind.COUNTER, "Events not recorded because a BPF map was full.", ("collector",)
        )
        with self._lock:
            units = list(self.units.values())
        for unit in units:
            up.add((unit.name,), int(unit.running))
            restarts.add((unit.name,), unit.restarts)
            if not unit.running:
                failure.add((unit.name, unit.error), 1)
            c = unit.impl
            if isinstance(c, BpfCollector):
                variant = c.mode.variant if c.mode else ""
                for link in c.links:
                    attached.add((c.name, link.program, c.attach_type, variant), 1)
                read_errors.add((c.name,), c.read_errors)
                map_full.add((c.name,), c.map_full_events())
        sample = MetricFamily("tfo_agent_sample_rate_percent", Kind.GAUGE, "Configured eBPF sample_rate.")
        sample.add((), self.filters.sample_rate)
        ns_cgroups = MetricFamily(
            "tfo_agent_namespace_filter_cgroups",
            Kind.GAUGE,
            "Cgroups (every hierarchy) of the pods namespace_filter selects, as written into the kernel.",
        )
        with self._lock:
            if self.filters.namespaces:
                ns_cgroups.add((), len(self.filters.namespace_refs))
        missing = MetricFamily(
            "tfo_agent_feature_unavailable",
            Kind.GAUGE,
            "Features the config enables that this build does not have.",
            ("feature",),
        )
        for feature in self.unavailable:
            missing.add((feature,), 1)
        ready = MetricFamily("tfo_agent_ready", Kind.GAUGE, "1 when /readyz answers ready.")
        ready.add((), int(self.readiness()[0]))
        reloads = MetricFamily("tfo_agent_config_reloads", Kind.COUNTER, "SIGHUP reloads by result.", ("result",))
        for result, n in self.reloads.items():
            reloads.add((result,), n)
        last_reload = MetricFamily(
            "tfo_agent_config_last_reload_success_timestamp_seconds",
            Kind.GAUGE,
            "Unix time of the last applied reload (0: none yet).",
        )
        last_reload.add((), self.last_reload)
        return (
            info,
            up,
            failure,
            restarts,
            attached,
            read_errors,
            map_full,
            sample,
            ns_cgroups,
            missing,
            ready,
            reloads,
            last_reload,
        )
