"""``PodMetadata``: the node's pods and containers, from the runtime's CRI socket and the cgroup tree.

One background thread keeps two views fresh: the cgroup index (rescanned as soon as cgroups are
created or removed, checked every ``POLL_SECONDS``) and the runtime's pods and containers (asked
after each such change and every ``REFRESH_SECONDS``). From them it answers:

- ``owner(cg)``: whose cgroup a kernel cgroup id is (namespace, pod, container, or the host's),
  for the eBPF collectors' container labels, joined in at read time;
- ``namespace_cgroups(namespaces)``: every cgroup, on every hierarchy, of the pods in those
  namespaces, for ``namespace_filter`` in the kernel (listeners hear when it changes);
- ``pods()``: the pods and containers, for the Hubble endpoint gauges at node scope.

No socket (or one that is not a CRI server) is logged once and reported by ``check``; the names
are then empty and nothing else fails. A socket that goes away and comes back is used again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from agent.cri.cgroups import CgroupRef, Hierarchy, hierarchies, parse_path, scan
from agent.cri.index import HOST, CgroupIndex, Owner, Workload
from agent.registry import Kind, MetricFamily

if TYPE_CHECKING:
    from agent.cri.client import Container, CriClient, Pod

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how often the cgroup tree is checked for new or removed cgroups
REFRESH_SECONDS = 5.0  # the runtime is asked at least this often
MISS_REFRESH_SECONDS = 1.0  # a container unknown to the last answer asks again, at most this often


@dataclass(frozen=True)
class Snapshot:
    """The runtime's answer: pods by sandbox id and by UID, containers by id."""

    pods: dict[str, Pod] = field(default_factory=dict)
    by_uid: dict[str, Pod] = field(default_factory=dict)
    containers: dict[str, Container] = field(default_factory=dict)

    @classmethod
    def of(cls, pods: list[Pod], containers: list[Container]) -> Snapshot:
        return cls({p.sandbox_id: p for p in pods}, {p.uid: p for p in pods}, {c.id: c for c in containers})

    def pod_of(self, ref: CgroupRef) -> Optional[Pod]:
        c = self.containers.get(ref.container_id)
        return self.pods.get(c.sandbox_id if c else ref.container_id) or self.by_uid.get(ref.pod_uid)

    def workload(self, ref: CgroupRef) -> Optional[Workload]:
        """The names of a container's (or pod's) cgroup; None when the runtime does not know it."""
        pod = self.pod_of(ref)
        c = self.containers.get(ref.container_id)
        if pod is None or (ref.container_id and c is None and ref.container_id != pod.sandbox_id):
            return None
        return Workload(pod.namespace, pod.name, c.name if c else "")


class PodMetadata:
    """The node's pods, containers and their cgroups; ``start`` before use, ``stop`` after."""

    name = "cri"

    def __init__(self, endpoint: str, key_tree: Optional[Hierarchy], namespaces: tuple[str, ...] = ()) -> None:
        self.endpoint = endpoint
        self.index = CgroupIndex(key_tree) if key_tree else None
        self.namespaces = frozenset(namespaces)
        self.snapshot = Snapshot()
        self.socket: Optional[str] = None
        self.runtime = ""  # "containerd 1.6.20", once it answered
        self.error = ""
        self.connected = False
        self.refreshes = {"success": 0, "failure": 0}
        self._client: Optional[CriClient] = None
        self._names: dict[str, Workload] = {}  # container id or pod UID -> names, kept after removal
        self._unnamed: dict[str, float] = {}  # container id or pod UID -> when first seen without names
        self._answered_at = 0.0  # when the runtime last answered
        self._ns_cgroups: frozenset[tuple[int, int]] = frozenset()
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._ns_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._asked_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """First look at once (so that filters and labels start right), then keep fresh in a thread."""
        if self.index is not None:
            self.index.rescan()
        self._refresh(cgroups_changed=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cri-metadata", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._client is not None:
            self._client.close()
            self._client = None

    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs (in the metadata thread) whenever ``namespace_cgroups`` changes."""
        self._listeners.append(callback)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(POLL_SECONDS):
            changed = self.index.rescan_if_changed() if self.index else False
            asked = self._wake.is_set()
            if changed or asked or time.monotonic() - last >= REFRESH_SECONDS:
                self._wake.clear()
                self._refresh(cgroups_changed=changed)
                last = time.monotonic()

    # -- refresh -----------------------------------------------------------------------------------

    def _refresh(self, cgroups_changed: bool) -> None:
        """Ask the runtime; the namespaces' cgroups are looked up again (every tree) only when the
        cgroups or the runtime's answer changed."""
        before = self.snapshot
        self._ask_runtime()
        if (self.namespaces or self._ns_cgroups) and (cgroups_changed or self.snapshot != before):
            self._update_namespace_cgroups()

    def _ask_runtime(self) -> None:
        self._asked_at = time.monotonic()
        try:
            from agent.cri.client import DEFAULT_SOCKETS, CriClient, CriError, find_socket
        except ImportError as exc:  # grpcio/protobuf missing: the cgroup view still works
            self._set_state(False, f"the CRI client needs grpcio and protobuf ({exc})")
            return
        path = find_socket(self.endpoint)
        if path is None:
            self._set_state(False, "no container runtime socket found (looked for " + ", ".join(DEFAULT_SOCKETS) + ")")
            return
        if self._client is None or self._client.path != path:
            if self._client is not None:
                self._client.close()
            self._client = CriClient(path)
        try:
            if not self.connected:
                name, version = self._client.version()
                self.runtime = f"{name} {version}"
            snap = Snapshot.of(self._client.pods(), self._client.containers())
        except CriError as exc:
            self.refreshes["failure"] += 1
            self._client.close()
            self._client = None
            self._set_state(False, str(exc))
            return
        self.refreshes["success"] += 1
        self.socket = path
        with self._lock:
            self.snapshot = snap
            self._answered_at = time.monotonic()
        self._set_state(True, "")

    def _set_state(self, connected: bool, error: str) -> None:
        if connected and not self.connected:
            log.info("container runtime: %s at %s, %d pods", self.runtime, self.socket, len(self.snapshot.pods))
        elif not connected and error != self.error:
            log.warning("container runtime: %s; container, pod and namespace labels stay empty meanwhile", error)
        self.connected, self.error = connected, error

    def set_namespaces(self, namespaces: tuple[str, ...]) -> None:
        """Follow other namespaces (a reload); their cgroups are looked up at once."""
        self.namespaces = frozenset(namespaces)
        self._update_namespace_cgroups()

    def _update_namespace_cgroups(self) -> None:
        with self._ns_lock:  # the metadata thread and a reload
            found = self._cgroups_of(self.namespaces) if self.namespaces else frozenset()
            if found == self._ns_cgroups:
                return
            self._ns_cgroups = found
        for callback in self._listeners:
            try:
                callback()
            except Exception as exc:  # a listener's failure must not stop the refreshes
                log.warning("namespace_filter update failed: %s", exc)

    def _cgroups_of(self, namespaces: frozenset[str]) -> frozenset[tuple[int, int]]:
        """(hierarchy id, cgroup id) of every cgroup of the pods in ``namespaces``, on each tree the
        kernel's filter walks (v2 and the v1 controllers)."""
        snap = self.snapshot
        out = set()
        for tree in hierarchies():
            if not (tree.v2 or tree.controllers):
                continue
            for cg, path in scan(tree).items():
                pod = snap.pod_of(parse_path(path))
                if pod is not None and pod.namespace in namespaces:
                    out.add((tree.id, cg))
        return frozenset(out)

    # -- answers -----------------------------------------------------------------------------------

    def namespace_cgroups(self) -> frozenset[tuple[int, int]]:
        return self._ns_cgroups

    def pods(self) -> Snapshot:
        return self.snapshot

    def owner(self, cg: int, seen_before: float) -> Optional[Owner]:
        """Whose cgroup ``cg`` (an id on the key tree, in use at ``seen_before``) is; None while a
        container is newer than the runtime's last answer (asked again at once): its counts wait
        for the next read rather than show under names they would then leave."""
        if self.index is None:
            return Owner(HOST, "", 0.0)
        known = self.index.get(cg, seen_before)
        if known is None:
            return None
        ref = known.ref
        if not ref.in_container:
            return Owner(HOST, "", known.gone_at)
        instance = ref.container_id or ref.pod_uid
        names = self._workload(ref, instance)
        return Owner(names, instance, known.gone_at) if names is not None else None

    def _workload(self, ref: CgroupRef, instance: str) -> Optional[Workload]:
        """The names of a container (or pod) cgroup, remembered once the runtime told them, or once
        it answered after the cgroup was first seen without them (not a container it runs: empty
        names then); None until then."""
        hit = self._names.get(instance)
        if hit is not None:
            return hit
        now = time.monotonic()
        with self._lock:
            names = self.snapshot.workload(ref)
            first = self._unnamed.setdefault(instance, now)
        if names is None:
            if self.connected and self._answered_at <= first:
                if now - self._asked_at >= MISS_REFRESH_SECONDS:
                    self._wake.set()  # a container newer than the last answer: ask again
                return None
            pod = self.snapshot.pod_of(ref)
            names = Workload(pod.namespace, pod.name, "") if pod else HOST
        if len(self._names) > 65536:
            self._names.clear()
            self._unnamed.clear()
        self._names[instance] = names
        self._unnamed.pop(instance, None)
        return names

    # -- self-metrics ------------------------------------------------------------------------------

    def collect(self) -> list[MetricFamily]:
        up = MetricFamily(
            "tfo_agent_cri_up", Kind.GAUGE, "1 when the container runtime's CRI socket answered last time."
        )
        up.add((), int(self.connected))
        info = MetricFamily(
            "tfo_agent_cri_info", Kind.GAUGE, "The container runtime the agent asks.", ("runtime", "socket")
        )
        if self.runtime:
            info.add((self.runtime, self.socket or ""), 1)
        snap = self.snapshot
        pods = MetricFamily("tfo_agent_cri_pods", Kind.GAUGE, "Pod sandboxes the runtime reported last time.")
        pods.add((), len(snap.pods))
        containers = MetricFamily("tfo_agent_cri_containers", Kind.GAUGE, "Containers the runtime reported last time.")
        containers.add((), len(snap.containers))
        refreshes = MetricFamily(
            "tfo_agent_cri_refreshes", Kind.COUNTER, "Questions to the runtime, by result.", ("result",)
        )
        for result, n in self.refreshes.items():
            refreshes.add((result,), n)
        return [up, info, pods, containers, refreshes]
