"""Container labels on per-process families: the kernel counts per cgroup, names are joined here.

With ``integrations.ebpf.labels`` listing ``container``, ``pod`` or ``namespace``, the kernel keys
per-process counters by (process name, cgroup id) and syscall counts by (cgroup id, syscall,
errno); no event reaches userspace. At each read ``LabelledSeries`` asks the ``Attribution``
(``agent.cri.pods.PodMetadata``) whose each cgroup is, and groups the kernel entries into label
sets under the cap (``CommCap``). It also keeps the kernel maps bounded and the series honest:

- *fold*: entries of label sets the cap does not admit are removed and their counts added to
  ``other`` (every label ``other``);
- *retire*: entries of host cgroups that are gone are moved into a userspace-owned entry of the
  same process name (``RETIRED_CG``), so that the host's series keep counting up;
- *drop*: entries of a container that is gone are removed once another live container took its
  labels (a pod deleted and created again under the same name: its counts do not leak into the
  new one's), or ``grace`` seconds after it went (so that its last counts are read at least once).
  Its label set then leaves the cap.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from agent.collectors import sum_percpu_u64
from agent.cri.index import HOST, Owner, Workload
from agent.libbpf import BpfMap, num_possible_cpus

LABELS = ("comm", "namespace", "pod", "container")  # in the order series carry them
CONTAINER_LABELS = LABELS[1:]
FOLDED_CG = 2**64 - 2  # userspace-owned key: counts folded into "other" (syscalls)
RETIRED_CG = 2**64 - 1  # userspace-owned key: counts of host cgroups that are gone
OTHER = "other"


class Attribution(Protocol):
    """Answers whose cgroup a kernel cgroup id is (``PodMetadata``)."""

    def owner(self, cg: int, seen_before: float) -> Optional[Owner]: ...


class HostOnly:
    """Attribution without a runtime view: every cgroup is the host's (labels stay empty)."""

    def owner(self, cg: int, seen_before: float) -> Owner:
        return Owner(HOST, "", 0.0)


def label_names(labels: Iterable[str], with_comm: bool = True) -> tuple[str, ...]:
    """The configured labels in series order (``comm`` left out when not ``with_comm``)."""
    wanted = set(labels)
    return tuple(n for n in LABELS if n in wanted and (with_comm or n != "comm"))


def has_container_labels(labels: Iterable[str]) -> bool:
    return any(n in CONTAINER_LABELS for n in labels)


@dataclass
class Entry:
    """One kernel entry: its key, cgroup, process name (for comm families), the rest of its series
    key (``sub``: (syscall, errno) for syscalls), and its counters summed over CPUs."""

    key: bytes
    cg: int
    comm: str
    sub: Hashable
    values: list[int]


@dataclass
class Plan:
    """What a read found: the series (label set, sub) -> counters, and the entries to move."""

    series: dict[tuple[tuple[str, ...], Hashable], list[int]] = field(default_factory=dict)
    fold: list[Entry] = field(default_factory=list)
    retire: list[Entry] = field(default_factory=list)
    drop: list[Entry] = field(default_factory=list)


class Cap(Protocol):
    def admit(self, key: Hashable, comm: Optional[str] = None) -> bool: ...

    def release(self, key: Hashable) -> None: ...


class LabelledSeries:
    """Groups per-cgroup kernel entries into label sets; see the module docstring."""

    def __init__(self, names: tuple[str, ...], cap: Cap, attribution: Attribution, grace: float) -> None:
        self.names = names
        self.cap = cap
        self.attribution = attribution
        self.grace = grace
        self.other = tuple(OTHER for _ in names)

    def label_set(self, comm: str, w: Workload) -> tuple[str, ...]:
        values = {"comm": comm, "namespace": w.namespace, "pod": w.pod, "container": w.container}
        return tuple(values[n] for n in self.names)

    def plan(self, entries: Iterable[Entry], seen_before: float) -> Plan:
        """Decide every entry's fate (``seen_before``: a time at which all entries existed)."""
        now = time.monotonic()
        rows: list[tuple[Entry, tuple[str, ...], Owner]] = []
        live: set[tuple[str, ...]] = set()
        owners: dict[int, Optional[Owner]] = {RETIRED_CG: Owner(HOST, "", 0.0)}
        label_sets: dict[tuple[str, Workload], tuple[str, ...]] = {}
        for e in entries:
            if e.cg in owners:
                owner = owners[e.cg]
            else:
                owner = owners[e.cg] = self.attribution.owner(e.cg, seen_before)
            if owner is None:
                continue  # a container the runtime has not named yet: at the next read
            labels = label_sets.get((e.comm, owner.workload))
            if labels is None:
                labels = label_sets[(e.comm, owner.workload)] = self.label_set(e.comm, owner.workload)
            rows.append((e, labels, owner))
            if owner.instance and not owner.gone_at:
                live.add(labels)
        plan = Plan()
        kept: set[tuple[str, ...]] = set()
        dropped: set[tuple[str, ...]] = set()
        comm_at = self.names.index("comm") if "comm" in self.names else None
        for e, labels, owner in rows:
            if owner.instance and owner.gone_at and (labels in live or now - owner.gone_at > self.grace):
                plan.drop.append(e)
                dropped.add(labels)
                continue
            if not self.cap.admit(labels, labels[comm_at] if comm_at is not None else None):
                plan.fold.append(e)
                continue
            if owner.gone_at and not owner.instance and e.cg != RETIRED_CG:
                plan.retire.append(e)
            kept.add(labels)
            key = (labels, e.sub)
            old = plan.series.get(key)
            plan.series[key] = e.values if old is None else [a + b for a, b in zip(old, e.values)]
        for labels in dropped - kept - live:
            self.cap.release(labels)
        return plan


def percpu_value(m: BpfMap, values: list[int]) -> bytes:
    """A per-CPU value holding ``values`` on the first CPU, zeros elsewhere (userspace-owned keys)."""
    first = struct.pack(f"<{len(values)}Q", *values).ljust(m.slot_size, b"\0")
    return first + b"\0" * (m.slot_size * (num_possible_cpus() - 1))


def take(m: BpfMap, entry: Entry, count: int) -> list[int]:
    """Remove an entry, returning its latest counters (re-read just before, so that the window for
    increments lost between read and delete is tiny)."""
    latest = m.lookup(entry.key)
    m.delete(entry.key)
    return sum_percpu_u64(latest, m.slot_size, count) if latest is not None else entry.values


def move(
    m: BpfMap, entries: list[Entry], count: int, target: Callable[[Entry], bytes], have: dict[bytes, list[int]]
) -> dict[bytes, list[int]]:
    """Move entries' counters into userspace-owned keys ``target(entry)`` (``have``: their counters
    as read); returns the counters written."""
    sums: dict[bytes, list[int]] = {}
    for e in entries:
        key = target(e)
        base = sums.get(key) or have.get(key) or [0] * count
        sums[key] = [a + b for a, b in zip(base, take(m, e, count))]
    for key, values in sums.items():
        m.update(key, percpu_value(m, values))
    return sums
