"""File I/O collector: bytes and opens per process on regular files, latency per op (``bpf/file_io.bpf.h``).

Its kernel part rides on the syscall hooks of ``bpf/syscalls.bpf.c`` (one sys_enter/sys_exit pair
for both collectors, each switched on by its feature bit), with maps of its own.

Exposed as ``ebpf_file_read_bytes_total{comm}``, ``ebpf_file_write_bytes_total{comm}``,
``ebpf_file_open_count_total{comm}`` and ``ebpf_file_io_latency_seconds{op}`` (the seed's
``ebpf_file_io_latency_ns`` in base units; ``op`` = read|write|open). Only syscalls on regular
files count: bytes are what read/write-family syscalls returned, opens are successful
open/openat/openat2/creat calls that returned a regular file.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from agent.collectors.comm_cap import COMM_MAPS, CommCollector, CommFamily, add_ns_histogram
from agent.collectors.syscalls import SYSCALL_HOOK_MODES
from agent.registry import Kind, MetricFamily

OPS = ("read", "write", "open")  # file_latency index = FOP_* - 1


class FileIoCollector(CommCollector):
    """read/write/open syscalls on regular files, aggregated per CPU and per process."""

    name = "file_io"
    switch = "collect_file_io"
    modes = SYSCALL_HOOK_MODES
    object_name = "syscalls"
    feature = 2  # F_FILE_IO
    pinned = (*COMM_MAPS, "file_latency")
    comm_values = 3
    comm_families = (
        CommFamily("ebpf_file_read_bytes", "Bytes read from regular files by read syscalls.", ((0, ()),)),
        CommFamily("ebpf_file_write_bytes", "Bytes written to regular files by write syscalls.", ((1, ()),)),
        CommFamily("ebpf_file_open_count", "Successful opens of regular files.", ((2, ()),)),
    )

    def read_more(self) -> Iterable[MetricFamily]:
        assert self.obj is not None
        latency = MetricFamily(
            "ebpf_file_io_latency_seconds",
            Kind.HISTOGRAM,
            "Latency of read, write and open syscalls on regular files.",
            ("op",),
        )
        hists = self.obj.map("file_latency")
        for i, op in enumerate(OPS):
            add_ns_histogram(latency, (op,), hists, struct.pack("<I", i))
        return (latency,)
