"""Syscall collector: count, latency histogram and errors per syscall (``bpf/syscalls.bpf.c``).

Exposed as ``ebpf_syscall_count_total{syscall}``, ``ebpf_syscall_latency_seconds{syscall}`` (the
seed's ``ebpf_syscall_latency_ns`` in Prometheus base units: log2 buckets of 2^7 .. 2^33 ns, written
in seconds) and ``ebpf_syscall_errors_total{syscall,errno}``. The count is the
histogram's count: one map, one source of truth. Syscalls are counted when they return.
The file I/O collector rides on the same hooks (``bpf/syscalls.bpf.c``, feature bits).

With container labels (``integrations.ebpf.labels`` beyond ``comm``) the count and errors carry
them too, read from ``syscall_cg`` (per cgroup, syscall and errno) and the per-CPU cache of counts
in front of it (``syscall_cg_slots``) under the label cap; the latency histogram keeps the
``syscall`` label alone (its count is the sum of the labelled counts).
"""

from __future__ import annotations

import errno
import platform
import struct
import threading
import time
from array import array
from collections.abc import Iterable
from typing import Optional

from agent.collectors import RAW_TP, TP_BTF, TRACEPOINT, BpfCollector, log2_histogram, sum_percpu_u64
from agent.collectors.comm_cap import CommCap
from agent.collectors.labels import FOLDED_CG, RETIRED_CG, Attribution, Entry, LabelledSeries, label_names, move
from agent.collectors.syscall_table import SYSCALLS
from agent.config import EbpfConfig
from agent.filters import UNIT, Filters
from agent.libbpf import BpfMap, BpfObject
from agent.registry import Kind, MetricFamily

HIST_SLOTS = 40  # TFO_HIST_SLOTS
MIN_SLOT, MAX_SLOT = 7, 33  # 128 ns .. ~8.6 s
NS = 1e-9
_CG_KEY = struct.Struct("<QII")  # struct syscall_cg_key
CG_COUNT_BITS, CG_NR_BITS = 22, 10  # syscall_cg_slots: (cgroup << 10 | nr) << 22 | count
CG_MAPS = ("syscall_cg", "syscall_cg_slots")
# tp_btf first: typed pointers read the syscall number and arguments without helper calls; the
# cast build (syscalls.cast.bpf.o, kernel 6.2+) reads files without helper calls too; the compat
# build serves kernels without task storage (before 5.11).
SYSCALL_HOOK_MODES = (
    TP_BTF._replace(variant="cast"),
    TP_BTF,
    RAW_TP,
    TRACEPOINT,
    TP_BTF.compat(),
    RAW_TP.compat(),
    TRACEPOINT.compat(),
)


class SyscallsCollector(BpfCollector):
    """raw_syscalls sys_enter/sys_exit, aggregated per CPU in the kernel."""

    name = "syscalls"
    switch = "collect_syscalls"
    pinned = ("syscall_stats", "syscall_errors")
    modes = SYSCALL_HOOK_MODES
    feature = 1  # F_SYSCALLS

    def __init__(self, cfg: EbpfConfig, filters: Filters, attribution: Optional[Attribution] = None) -> None:
        super().__init__(cfg, filters, attribution)
        self.names = SYSCALLS.get(platform.machine(), {})
        self.cap = CommCap(cfg.max_comm_series)
        self.labelled: Optional[LabelledSeries] = None
        if cfg.container_labels:
            names = label_names(cfg.labels, with_comm=False)
            self.labelled = LabelledSeries(names, self.cap, self.attribution, 2 * cfg.scrape_interval)
        self._lock = threading.Lock()  # concurrent readers (scrapes, OTLP) must not move entries twice

    @classmethod
    def pinned_maps(cls, cfg: EbpfConfig) -> tuple[str, ...]:
        return (*cls.pinned, *CG_MAPS) if cfg.container_labels else cls.pinned

    @classmethod
    def map_sizes(cls, cfg: EbpfConfig) -> dict[str, int]:
        return {} if cfg.container_labels else dict.fromkeys(CG_MAPS, 1)

    def syscall_name(self, nr: int) -> str:
        return self.names.get(nr, f"syscall_{nr}")

    def read(self) -> Iterable[MetricFamily]:
        assert self.obj is not None
        names = self.labelled.names if self.labelled else ()
        count = MetricFamily("ebpf_syscall_count", Kind.COUNTER, "Syscalls completed, by syscall.", ("syscall", *names))
        latency = MetricFamily(
            "ebpf_syscall_latency_seconds",
            Kind.HISTOGRAM,
            "Syscall latency from entry to exit (log2 buckets of ns, in seconds).",
            ("syscall",),
        )
        errors = MetricFamily(
            "ebpf_syscall_errors",
            Kind.COUNTER,
            "Syscalls that returned an error, by errno.",
            ("syscall", "errno", *names),
        )
        stats = self.obj.map("syscall_stats")
        for key, value in stats.items():
            slots_and_sum = sum_percpu_u64(value, stats.slot_size, HIST_SLOTS + 1)
            slots, weighted_sum = slots_and_sum[:HIST_SLOTS], slots_and_sum[HIST_SLOTS]
            total = sum(slots)
            if not total:
                continue
            name = self.syscall_name(struct.unpack("<I", key)[0])
            if not self.labelled:
                count.add((name,), total / UNIT)
            bounds, counts = log2_histogram(slots, MIN_SLOT, MAX_SLOT, NS)
            latency.add_histogram((name,), bounds, counts, weighted_sum / UNIT * NS)
        if self.labelled:
            with self._lock:
                series = self._read_labelled(self.obj, self.labelled)
            for (labels, (nr, code)), n in sorted(series.items()):
                if code:
                    errors.add((self.syscall_name(nr), self.errno_name(code), *labels), n / UNIT)
                else:
                    count.add((self.syscall_name(nr), *labels), n / UNIT)
            return (count, latency, errors, self.cap.folded_family(self.name))
        errs = self.obj.map("syscall_errors")
        for key, value in errs.items():
            k = struct.unpack("<I", key)[0]
            nr, code = k >> 16, k & 0xFFFF
            errors.add(
                (self.syscall_name(nr), self.errno_name(code)), sum_percpu_u64(value, errs.slot_size, 1)[0] / UNIT
            )
        return (count, latency, errors)

    @staticmethod
    def errno_name(code: int) -> str:
        return errno.errorcode.get(code, f"E{code}")

    def _read_labelled(
        self, obj: BpfObject, labelled: LabelledSeries
    ) -> dict[tuple[tuple[str, ...], tuple[int, int]], int]:
        """(label set, (syscall, errno)) -> weighted count; errno 0 is the call count. syscall_cg
        first, then the cached counts (whose entries have no key: they stay where they are)."""
        m = obj.map("syscall_cg")
        entries, own = [], {}
        for key, value in m.items():
            cg, nr, code = _CG_KEY.unpack(key)
            e = Entry(key, cg, "", (nr, code), sum_percpu_u64(value, m.slot_size, 1))
            if cg in (FOLDED_CG, RETIRED_CG):
                own[key] = e.values
            if cg != FOLDED_CG:
                entries.append(e)
        entries += cached_counts(obj.map("syscall_cg_slots"))
        plan = labelled.plan(entries, time.monotonic())
        for e in plan.drop:
            if e.key:
                m.delete(e.key)
        move(m, [e for e in plan.retire if e.key], 1, lambda e: _CG_KEY.pack(RETIRED_CG, *e.sub), own)
        own.update(move(m, [e for e in plan.fold if e.key], 1, lambda e: _CG_KEY.pack(FOLDED_CG, *e.sub), own))
        out = {(labels, sub): values[0] for (labels, sub), values in plan.series.items()}
        for key, values in own.items():
            cg, nr, code = _CG_KEY.unpack(key)
            if cg == FOLDED_CG:
                out[(labelled.other, (nr, code))] = values[0]
        for e in plan.fold:
            if not e.key:
                k = (labelled.other, e.sub)
                out[k] = out.get(k, 0) + e.values[0]
        return out  # type: ignore[return-value]


def cached_counts(slots: BpfMap) -> list[Entry]:
    """The counts in syscall_cg_slots, one entry per CPU and slot in use (``key`` empty)."""
    mask = (1 << CG_COUNT_BITS) - 1
    words = array("Q")
    words.frombytes(slots.values())
    out = []
    for v in words:
        if v & mask:
            tag = v >> CG_COUNT_BITS
            out.append(Entry(b"", tag >> CG_NR_BITS, "", (tag & ((1 << CG_NR_BITS) - 1), 0), [v & mask]))
    return out
