"""The DNS and HTTP collectors' shared part (``bpf/l7.bpf.h``).

Both ride on the syscall hooks of ``bpf/syscalls.bpf.c`` (their feature bits in ``tfo_features``),
in the modes whose sys_exit program reads the syscall's arguments (tp_btf, raw_tp; not the classic
tracepoint, whose sys_exit has none). Their kernel counters and histograms live in plain hashes
keyed by ``struct l7_key``: the process name (``comm``), a ``folded`` flag, then what was seen.
``L7Stats`` reads such a hash through the comm cap: names that are not admitted are moved into an
entry with ``folded`` set and the comm zeroed (exported as ``comm="other"``), which only userspace
writes, and deleted, which keeps room in the hash.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable, Sequence
from typing import ClassVar, NamedTuple, Optional

from agent.collectors import TRACEPOINT, BpfCollector, log2_histogram
from agent.collectors.comm_cap import NS, NS_MAX_SLOT, NS_MIN_SLOT, OTHER, CommCap, decode_comm
from agent.collectors.labels import Attribution
from agent.collectors.syscalls import SYSCALL_HOOK_MODES
from agent.config import EbpfConfig
from agent.filters import UNIT, Filters
from agent.libbpf import BpfMap, LibbpfError
from agent.registry import Kind, MetricFamily

# The sys_exit programs of these modes read the syscall's arguments.
L7_MODES = tuple(m for m in SYSCALL_HOOK_MODES if m.attach_type != TRACEPOINT.attach_type)
HIST_SLOTS = 40  # TFO_HIST_SLOTS
_COMM_LEN = 16
_WHAT = struct.Struct("<BBBHH")  # struct l7_key after comm and folded: kind, a, b, code, pad
_ZERO_KEY = b"\0\0\0\0"


class What(NamedTuple):
    """What an entry counts (struct l7_key without comm and folded); meaning per protocol."""

    kind: int
    a: int
    b: int
    code: int


class L7Stats:
    """Reads one l7_key-keyed hash (u64 counters or tfo_hist values) through a comm cap."""

    def __init__(self, cap: CommCap) -> None:
        self.cap = cap
        self._lock = threading.Lock()  # concurrent readers (scrapes, OTLP) must not fold twice

    def read(self, bpf_map: BpfMap) -> dict[tuple[str, What], list[int]]:
        """(comm label, what) -> the entry's u64 values, names over the cap folded into ``other``."""
        fmt = struct.Struct(f"<{bpf_map.value_size // 8}Q")
        out: dict[tuple[str, What], list[int]] = {}
        with self._lock:
            for key, value in list(bpf_map.items()):
                what = What(*_WHAT.unpack_from(key, _COMM_LEN + 1)[:4])
                comm = OTHER if key[_COMM_LEN] else decode_comm(key[:_COMM_LEN])
                if comm != OTHER and not self.cap.admit(comm):
                    comm, value = OTHER, self._fold(bpf_map, key, fmt)
                if value:
                    prev = out.get((comm, what))
                    vals = fmt.unpack_from(value)
                    out[(comm, what)] = [x + y for x, y in zip(prev, vals)] if prev else list(vals)
        return out

    @staticmethod
    def _fold(bpf_map: BpfMap, key: bytes, fmt: struct.Struct) -> bytes:
        """Move the entry ``key`` into its folded entry; returns the values moved (b"" if none)."""
        latest = bpf_map.lookup(key)  # re-read just before deleting: the window for lost increments is tiny
        if latest is None:
            return b""
        folded_key = bytes(_COMM_LEN) + b"\1" + key[_COMM_LEN + 1 :]
        held = bpf_map.lookup(folded_key)
        total = [x + y for x, y in zip(fmt.unpack_from(held), fmt.unpack_from(latest))] if held else None
        try:
            bpf_map.update(folded_key, fmt.pack(*total) if total else latest)
        except LibbpfError:  # hash full: leave the entry where it is, still exported as other
            return latest
        bpf_map.delete(key)
        return latest


def add_hist(fam: MetricFamily, labels: Sequence[str], values: Sequence[int]) -> None:
    """Add one ``struct tfo_hist`` of nanoseconds (slots, then the sum) to ``fam``, in seconds."""
    bounds, counts = log2_histogram(values[:HIST_SLOTS], NS_MIN_SLOT, NS_MAX_SLOT, NS)
    fam.add_histogram(labels, bounds, counts, values[HIST_SLOTS] / UNIT * NS)


class L7Collector(BpfCollector):
    """A collector on the shared syscall hooks with l7_key-keyed maps and a parse-error array."""

    object_name = "syscalls"
    modes = L7_MODES
    errors_map: ClassVar[str]
    error_reasons: ClassVar[tuple[str, ...]]  # index in errors_map -> reason label

    def __init__(self, cfg: EbpfConfig, filters: Filters, attribution: Optional[Attribution] = None) -> None:
        super().__init__(cfg, filters, attribution)  # attribution: container labels, not used here yet
        self.cap = CommCap(cfg.max_comm_series)
        self.stats = L7Stats(self.cap)

    def read(self) -> Iterable[MetricFamily]:
        assert self.obj is not None
        return [*self.read_l7(), self.parse_errors(), self.cap.folded_family(self.name)]

    def read_l7(self) -> Iterable[MetricFamily]:
        """The protocol's own families (subclasses)."""
        raise NotImplementedError

    def parse_errors(self) -> MetricFamily:
        assert self.obj is not None
        fam = MetricFamily(
            f"tfo_agent_{self.name}_parse_errors",
            Kind.COUNTER,
            f"{self.name.upper()} messages the kernel could not count right, by reason.",
            ("reason",),
        )
        errors = self.obj.map(self.errors_map)
        for i, reason in enumerate(self.error_reasons):
            raw = errors.lookup(struct.pack("<I", i))
            fam.add((reason,), struct.unpack_from("<Q", raw)[0] if raw else 0)
        return fam
