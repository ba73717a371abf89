"""Scheduler collector: CPU time and context switches per process, run-queue latency (``bpf/scheduler.bpf.c``).

Exposed as ``ebpf_process_runtime_seconds_total{comm}`` (the seed's ``ebpf_process_runtime_ns``),
``ebpf_context_switches_total{comm,type}`` (``type`` = voluntary|involuntary) and
``ebpf_runqueue_latency_seconds`` (the seed's ``ebpf_runqueue_latency_ns``). CPU time and switches
are the kernel's own per-task accounting, taken at each switch-out.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.collectors import TP_BTF
from agent.collectors.comm_cap import COMM_MAPS, CommCollector, CommFamily, add_ns_histogram
from agent.registry import Kind, MetricFamily


class SchedulerCollector(CommCollector):
    """sched_switch / sched_wakeup(_new) as BTF tracepoints (they need the tasks' pointers)."""

    name = "scheduler"
    switch = "collect_scheduler"
    pinned = (*COMM_MAPS, "runq_latency")
    modes = (TP_BTF, TP_BTF.compat())
    comm_values = 3
    comm_families = (
        CommFamily("ebpf_process_runtime_seconds", "CPU time of the process's tasks.", ((0, ()),), per_unit=10**9),
        CommFamily(
            "ebpf_context_switches",
            "Context switches away from the process's tasks.",
            ((1, ("voluntary",)), (2, ("involuntary",))),
            extra_labels=("type",),
        ),
    )

    def read_more(self) -> Iterable[MetricFamily]:
        assert self.obj is not None
        latency = MetricFamily(
            "ebpf_runqueue_latency_seconds",
            Kind.HISTOGRAM,
            "Time from becoming runnable (wakeup, new task, preemption) to running on a CPU.",
        )
        add_ns_histogram(latency, (), self.obj.map("runq_latency"), b"\0\0\0\0")
        return (latency,)
