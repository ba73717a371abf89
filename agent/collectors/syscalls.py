"""Syscall collector: count, latency histogram and errors per syscall (``bpf/syscalls.bpf.c``).

Exposed as ``ebpf_syscall_count_total{syscall}``, ``ebpf_syscall_latency_seconds{syscall}`` (the
seed's ``ebpf_syscall_latency_ns`` in Prometheus base units: log2 buckets of 2^7 .. 2^33 ns, written
in seconds) and ``ebpf_syscall_errors_total{syscall,errno}``. The count is the
histogram's count: one map, one source of truth. Syscalls are counted when they return.
The file I/O collector rides on the same hooks (``bpf/syscalls.bpf.c``, feature bits).
"""

from __future__ import annotations

import errno
import platform
import struct
from collections.abc import Iterable

from agent.collectors import RAW_TP, TP_BTF, TRACEPOINT, BpfCollector, log2_histogram, sum_percpu_u64
from agent.collectors.syscall_table import SYSCALLS
from agent.filters import UNIT
from agent.registry import Kind, MetricFamily

HIST_SLOTS = 40  # TFO_HIST_SLOTS
MIN_SLOT, MAX_SLOT = 7, 33  # 128 ns .. ~8.6 s
NS = 1e-9
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

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.names = SYSCALLS.get(platform.machine(), {})

    def syscall_name(self, nr: int) -> str:
        return self.names.get(nr, f"syscall_{nr}")

    def read(self) -> Iterable[MetricFamily]:
        assert self.obj is not None
        count = MetricFamily("ebpf_syscall_count", Kind.COUNTER, "Syscalls completed, by syscall.", ("syscall",))
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
            ("syscall", "errno"),
        )
        stats = self.obj.map("syscall_stats")
        for key, value in stats.items():
            slots_and_sum = sum_percpu_u64(value, stats.slot_size, HIST_SLOTS + 1)
            slots, weighted_sum = slots_and_sum[:HIST_SLOTS], slots_and_sum[HIST_SLOTS]
            total = sum(slots)
            if not total:
                continue
            name = self.syscall_name(struct.unpack("<I", key)[0])
            count.add((name,), total / UNIT)
            bounds, counts = log2_histogram(slots, MIN_SLOT, MAX_SLOT, NS)
            latency.add_histogram((name,), bounds, counts, weighted_sum / UNIT * NS)
        errs = self.obj.map("syscall_errors")
        for key, value in errs.items():
            k = struct.unpack("<I", key)[0]
            nr, code = k >> 16, k & 0xFFFF
            errors.add(
                (self.syscall_name(nr), errno.errorcode.get(code, f"E{code}")),
                sum_percpu_u64(value, errs.slot_size, 1)[0] / UNIT,
            )
        return (count, latency, errors)
