"""Memory collector: page faults, allocations and OOM kills per process (``bpf/memory.bpf.c``).

Exposed as ``ebpf_page_faults_total{comm}``, ``ebpf_memory_allocations_total{comm,kind}``
(``kind`` = page: buddy-allocator calls, any order; slab: kmalloc and kmem_cache_alloc calls) and
``ebpf_oom_kills_total{comm}`` (the OOM victim's process name).
"""

from __future__ import annotations

from agent.collectors import RAW_TP, TP_BTF
from agent.collectors.comm_cap import COMM_MAPS, CommCollector, CommFamily


class MemoryCollector(CommCollector):
    """exceptions:page_fault_*, kmem:* and oom:mark_victim as BTF tracepoints, else raw tracepoints."""

    name = "memory"
    switch = "collect_memory"
    pinned = COMM_MAPS
    modes = (TP_BTF, RAW_TP, RAW_TP.compat())  # raw_tp: kernels like 6.1 whose tracepoint types differ
    comm_values = 4
    comm_families = (
        CommFamily("ebpf_page_faults", "Page faults on user-space addresses, by faulting process.", ((0, ()),)),
        CommFamily(
            "ebpf_memory_allocations",
            "Kernel memory allocations in the process's context: page (buddy allocator) and slab calls.",
            ((1, ("page",)), (2, ("slab",))),
            extra_labels=("kind",),
        ),
        CommFamily(
            "ebpf_oom_kills", "Tasks chosen as OOM victims, by the victim's process name.", ((3, ()),), zeros=True
        ),
    )
