"""Hubble's endpoint gauges at node scope, from the pods the container runtime reports on this node.

With ``kubernetes_enabled`` and ``flow_scope: node``, ``hubble_endpoint_count{namespace}`` is the
number of pods whose sandbox is ready, and ``hubble_endpoint_ready{namespace}`` those of them whose
containers are all running (at least one) — what the node runs, not what recent flows showed.
"""

from __future__ import annotations

from agent.cri.pods import PodMetadata, Snapshot
from agent.registry import Kind, MetricFamily

COUNT, READY = "hubble_endpoint_count", "hubble_endpoint_ready"


def per_namespace(snap: Snapshot) -> dict[str, tuple[int, int]]:
    """Namespace -> (pods with a ready sandbox, of those with every container running)."""
    running: dict[str, list[bool]] = {}
    for c in snap.containers.values():
        running.setdefault(c.sandbox_id, []).append(c.running)
    out: dict[str, tuple[int, int]] = {}
    for pod in snap.pods.values():
        if not pod.ready:
            continue
        states = running.get(pod.sandbox_id, [])
        count, ready = out.get(pod.namespace, (0, 0))
        out[pod.namespace] = (count + 1, ready + int(bool(states) and all(states)))
    return out


class NodeEndpoints:
    """The endpoint families from a ``PodMetadata`` (Hubble's collect() takes them in place of its own)."""

    names = (COUNT, READY)

    def __init__(self, pods: PodMetadata) -> None:
        self.pods = pods

    def families(self) -> dict[str, MetricFamily]:
        count = MetricFamily(
            COUNT, Kind.GAUGE, "Pods on this node with a ready sandbox (container runtime)", ("namespace",)
        )
        ready = MetricFamily(
            READY,
            Kind.GAUGE,
            "Pods of hubble_endpoint_count whose containers all run (container runtime)",
            ("namespace",),
        )
        for ns, (n, r) in sorted(per_namespace(self.pods.pods()).items()):
            count.add((ns,), n)
            ready.add((ns,), r)
        return {COUNT: count, READY: ready}
