"""The ``comm`` label cap: per-process families keep a bounded number of series.

A ``CommCap`` admits process names (with container labels: label sets) first come, first served,
until ``limit - 1`` have their own series; every other is folded into ``comm="other"`` (every
label ``other``), so a family never has more than ``limit`` distinct label sets (``other``
included). Admitted names keep their series for the agent's lifetime, so counters stay continuous;
a container's label sets leave when the container is gone (``release``). ``folded`` counts the
distinct names folded so far (remembered in a bounded LRU of ``FOLDED_MEMORY`` entries: a name
folded again after dropping out of it counts again).

``CommStats`` reads the kernel side every collector with per-process counters shares
(``bpf/tfo_comm.bpf.h``): it folds names that are not admitted into the userspace-owned
``comm_folded`` map and deletes them from ``comm_stats``, which keeps the kernel hash from filling
up with names that will never get a series of their own. With container labels it reads
``comm_cg_stats`` instead, through ``labels.LabelledSeries``. ``CommCollector`` is the base of the
collectors built on that layout (file I/O, scheduler, memory); ``add_ns_histogram`` their shared
latency reader.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional

from agent.collectors import BpfCollector, log2_histogram, sum_percpu_u64
from agent.collectors.labels import RETIRED_CG, Attribution, Entry, LabelledSeries, label_names, move, take
from agent.config import EbpfConfig
from agent.filters import UNIT, Filters
from agent.libbpf import BpfMap, BpfObject
from agent.registry import Kind, MetricFamily

OTHER = "other"
FOLDED_MEMORY = 4096
COMM_MAPS = ("comm_stats", "comm_overflow", "comm_folded")
HIST_SLOTS = 40  # TFO_HIST_SLOTS
NS_MIN_SLOT, NS_MAX_SLOT = 7, 33  # 128 ns .. ~8.6 s
NS = 1e-9
_ZERO_KEY = b"\0\0\0\0"
_CG_KEY = struct.Struct("<16sQ")  # struct tfo_comm_cg_key
LabelSet = tuple[str, ...]


class CommCap:
    """Decides which process names get a series of their own; counts the names folded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.admitted: set[Hashable] = set()
        self.folded = 0
        self._recently_folded: OrderedDict[Hashable, None] = OrderedDict()

    def admit(self, key: Hashable, comm: Optional[str] = None) -> bool:
        """True when ``key`` (a process name, or a label set whose process name is ``comm``, None
        without one) has or now gets its own series; else it is counted as folded. An empty name
        and ``other`` never get one."""
        if key in self.admitted:
            return True
        name = key if isinstance(key, str) else comm
        if name != "" and name != OTHER and len(self.admitted) < self.limit - 1:
            self.admitted.add(key)
            return True
        if key in self._recently_folded:
            self._recently_folded.move_to_end(key)
        else:
            self.folded += 1
            self._recently_folded[key] = None
            if len(self._recently_folded) > FOLDED_MEMORY:
                self._recently_folded.popitem(last=False)
        return False

    def release(self, key: Hashable) -> None:
        """A label set whose container is gone leaves the cap (its room goes to new ones)."""
        self.admitted.discard(key)

    def label(self, comm: str) -> str:
        """The ``comm`` label value to use for this process name."""
        return comm if self.admit(comm) else OTHER

    def folded_family(self, collector: str) -> MetricFamily:
        """The self-metric of this cap (one family per collector that owns a cap)."""
        fam = MetricFamily(
            f"tfo_agent_{collector}_comm_folded",
            Kind.COUNTER,
            f'Distinct process names (label sets) the {collector} collector folded into comm="other" (label cap).',
        )
        fam.add((), self.folded)
        return fam


def decode_comm(raw: bytes) -> str:
    """A kernel ``comm`` (NUL-padded) as a label value; undecodable bytes stay distinct."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


class CommStats:
    """Reads ``comm_stats``/``comm_overflow``/``comm_folded`` of one object through a ``CommCap``
    (``comm_cg_stats`` instead of ``comm_stats`` when ``labelled``)."""

    def __init__(self, cap: CommCap, nvalues: int, labelled: Optional[LabelledSeries] = None) -> None:
        self.cap = cap
        self.nvalues = nvalues
        self.labelled = labelled
        self.names = labelled.names if labelled else ("comm",)
        self._fmt = struct.Struct(f"<{nvalues}Q")
        self._lock = threading.Lock()  # concurrent readers (scrapes, OTLP) must not fold twice

    def read(self, obj: BpfObject) -> dict[LabelSet, list[int]]:
        """Label set (``names``; or all ``other``) -> its weighted counters, folding those not admitted."""
        with self._lock:
            out, fold = self._read_labelled(obj) if self.labelled else self._read(obj)
            return self._add_other(obj, out, fold)

    def _read(self, obj: BpfObject) -> tuple[dict[LabelSet, list[int]], list[int]]:
        stats = obj.map("comm_stats")
        out: dict[LabelSet, list[int]] = {}
        fold = [0] * self.nvalues
        for key, value in stats.items():
            comm = decode_comm(key)
            if self.cap.admit(comm):
                out[(comm,)] = sum_percpu_u64(value, stats.slot_size, self.nvalues)
                continue
            # Re-read just before deleting so that the window for lost increments is tiny.
            latest = stats.lookup(key)
            stats.delete(key)
            if latest is not None:
                fold = _add(fold, sum_percpu_u64(latest, stats.slot_size, self.nvalues))
        return out, fold

    def _read_labelled(self, obj: BpfObject) -> tuple[dict[LabelSet, list[int]], list[int]]:
        assert self.labelled is not None
        stats = obj.map("comm_cg_stats")
        entries = []
        for key, value in stats.items():
            comm, cg = _CG_KEY.unpack(key)
            entries.append(Entry(key, cg, decode_comm(comm), (), sum_percpu_u64(value, stats.slot_size, self.nvalues)))
        plan = self.labelled.plan(entries, time.monotonic())
        fold = [0] * self.nvalues
        for e in plan.fold:
            fold = _add(fold, take(stats, e, self.nvalues))
        for e in plan.drop:
            stats.delete(e.key)
        retired = {e.key: e.values for e in entries if e.cg == RETIRED_CG}
        move(stats, plan.retire, self.nvalues, lambda e: _CG_KEY.pack(e.key[:16], RETIRED_CG), retired)
        return {labels: values for (labels, _), values in plan.series.items()}, fold

    def _add_other(self, obj: BpfObject, out: dict[LabelSet, list[int]], fold: list[int]) -> dict[LabelSet, list[int]]:
        folded_map = obj.map("comm_folded")
        raw = folded_map.lookup(_ZERO_KEY)
        folded = list(self._fmt.unpack_from(raw)) if raw else [0] * self.nvalues
        if any(fold):
            folded = _add(folded, fold)
            folded_map.update(_ZERO_KEY, self._fmt.pack(*folded))
        overflow = obj.map("comm_overflow")
        raw = overflow.lookup(_ZERO_KEY)
        other = _add(folded, sum_percpu_u64(raw, overflow.slot_size, self.nvalues) if raw else [0] * self.nvalues)
        if any(other):
            out[tuple(OTHER for _ in self.names)] = other
        return out


def _add(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b)]


@dataclass(frozen=True)
class CommFamily:
    """A per-process counter family: which kernel counters feed which series.

    ``series`` pairs a counter index with the values of ``extra_labels`` (after ``comm``);
    ``per_unit`` is how many kernel units make one exposed base unit (10**9 for ns -> seconds).
    """

    name: str
    help: str
    series: tuple[tuple[int, tuple[str, ...]], ...]
    extra_labels: tuple[str, ...] = ()
    per_unit: int = 1
    # Export 0 for every process too, not only once it happened: a rare event (an OOM kill) must
    # be an increase on an existing series, or increase() and the alerts on it miss the first one.
    zeros: bool = False

    def build(self, counters: dict[LabelSet, list[int]], names: LabelSet = ("comm",)) -> MetricFamily:
        """The family from label set (``names``) -> counters."""
        fam = MetricFamily(self.name, Kind.COUNTER, self.help, (*names, *self.extra_labels))
        for labels, values in sorted(counters.items()):
            for index, extra in self.series:
                if values[index] or self.zeros:
                    fam.add((*labels, *extra), values[index] / (UNIT * self.per_unit))
        return fam


class CommCollector(BpfCollector):
    """A collector whose object includes ``tfo_comm.bpf.h``: per-process families under the cap."""

    comm_families: ClassVar[tuple[CommFamily, ...]]
    comm_values: ClassVar[int]  # TFO_COMM_VALUES of the object

    def __init__(self, cfg: EbpfConfig, filters: Filters, attribution: Optional[Attribution] = None) -> None:
        super().__init__(cfg, filters, attribution)
        self.cap = CommCap(cfg.max_comm_series)
        labelled = None
        if cfg.container_labels:
            grace = 2 * cfg.scrape_interval
            labelled = LabelledSeries(label_names(cfg.labels), self.cap, self.attribution, grace)
        self.comm_stats = CommStats(self.cap, self.comm_values, labelled)

    @classmethod
    def pinned_maps(cls, cfg: EbpfConfig) -> tuple[str, ...]:
        if not cfg.container_labels:
            return cls.pinned
        return tuple("comm_cg_stats" if m == "comm_stats" else m for m in cls.pinned)

    @classmethod
    def map_sizes(cls, cfg: EbpfConfig) -> dict[str, int]:
        return {"comm_stats" if cfg.container_labels else "comm_cg_stats": 1}

    def read(self) -> Iterable[MetricFamily]:
        assert self.obj is not None
        counters = self.comm_stats.read(self.obj)
        names = self.comm_stats.names
        return [
            *(spec.build(counters, names) for spec in self.comm_families),
            *self.read_more(),
            self.cap.folded_family(self.name),
        ]

    def read_more(self) -> Iterable[MetricFamily]:
        """Families that are not per process (histograms); none by default."""
        return ()


def add_ns_histogram(fam: MetricFamily, labels: Sequence[str], hists: BpfMap, key: bytes) -> None:
    """Add one per-CPU ``struct tfo_hist`` of nanoseconds to ``fam``, in seconds."""
    raw = hists.lookup(key)
    if raw is None:
        return
    slots_and_sum = sum_percpu_u64(raw, hists.slot_size, HIST_SLOTS + 1)
    bounds, counts = log2_histogram(slots_and_sum[:HIST_SLOTS], NS_MIN_SLOT, NS_MAX_SLOT, NS)
    fam.add_histogram(labels, bounds, counts, slots_and_sum[HIST_SLOTS] / UNIT * NS)
