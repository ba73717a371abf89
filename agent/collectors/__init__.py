"""eBPF collectors: each pairs ``bpf/NAME.bpf.c`` with a ``BpfCollector`` subclass here.

A collector loads its object, attaching the first *mode* (a set of programs chosen by name
prefix, e.g. ``raw_`` for raw tracepoints, ``tp_`` for classic tracepoints) that the running
kernel accepts, pins its aggregation maps under ``pin_path/NAME`` so counters survive restarts,
and turns map contents into metric families at read time.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from typing import ClassVar, Optional

from agent.config import EbpfConfig
from agent.filters import UNIT, Filters
from agent.libbpf import BpfObject, LibbpfError, Link
from agent.registry import MetricFamily

log = logging.getLogger(__name__)

# (attach type, program name prefix), most preferred first.
DEFAULT_MODES: tuple[tuple[str, str], ...] = (("raw_tp", "raw_"), ("tracepoint", "tp_"))
_BSS = struct.Struct("<IIQ")  # tfo_kgen, padding, tfo_map_full
FORCE_ATTACH_ENV = "TFO_AGENT_FORCE_ATTACH"


def forced_attach_types() -> dict[str, str]:
    """``collector=attach_type,...`` from $TFO_AGENT_FORCE_ATTACH: pin a collector to one mode
    (troubleshooting a kernel, and how the tests exercise every fallback)."""
    items = (item.split("=", 1) for item in os.environ.get(FORCE_ATTACH_ENV, "").split(",") if "=" in item)
    return {name.strip(): kind.strip() for name, kind in items}


class CollectorError(RuntimeError):
    """A collector could not start; the message says why (for check, logs and self-metrics)."""


class BpfCollector:
    """Base class: load/attach with fallback, pinning, filters, reading."""

    name: ClassVar[str]
    switch: ClassVar[str]  # the collect_* config key that enables it
    pinned: ClassVar[tuple[str, ...]] = ()  # maps that keep counters across restarts
    modes: ClassVar[tuple[tuple[str, str], ...]] = DEFAULT_MODES

    def __init__(self, cfg: EbpfConfig, filters: Filters) -> None:
        self.cfg = cfg
        self.filters = filters
        self.obj: Optional[BpfObject] = None
        self.links: list[Link] = []
        self.attach_type = ""
        self.error = ""
        self.read_errors = 0

    @property
    def object_path(self) -> str:
        return os.path.join(self.cfg.programs_path, f"{self.name}.bpf.o")

    @property
    def pin_dir(self) -> str:
        return os.path.join(self.cfg.pin_path, self.name)

    @property
    def up(self) -> bool:
        return self.obj is not None

    def start(self, pin: bool = True) -> None:
        """Load and attach the first mode that works; raise CollectorError with every reason."""
        if not os.path.exists(self.object_path):
            self.error = f"BPF object {self.object_path} not found (build with 'make -C bpf' or check programs_path)"
            raise CollectorError(self.error)
        modes = self.modes
        forced = forced_attach_types().get(self.name)
        if forced:
            modes = tuple(m for m in self.modes if m[0] == forced)
            if not modes:
                known = ", ".join(m[0] for m in self.modes)
                self.error = f"{FORCE_ATTACH_ENV} asks for {forced!r}, {self.name} has: {known}"
                raise CollectorError(self.error)
        reasons = []
        for attach_type, prefix in modes:
            try:
                self._start_mode(prefix, pin)
                self.attach_type, self.error = attach_type, ""
                return
            except LibbpfError as exc:
                if pin and exc.errno == 22 and "pinned" in str(exc):
                    self._drop_incompatible_pins(exc)
                    try:
                        self._start_mode(prefix, pin)
                        self.attach_type, self.error = attach_type, ""
                        return
                    except LibbpfError as again:
                        exc = again
                reasons.append(f"{attach_type}: {exc}")
        self.error = "; ".join(reasons)
        raise CollectorError(self.error)

    def _start_mode(self, prefix: str, pin: bool) -> None:
        obj = BpfObject(self.object_path, btf_custom_path=self.cfg.btf_custom_path)
        try:
            programs = [p for p in obj.program_names if p.startswith(prefix)]
            if not programs:
                raise LibbpfError(22, f"{self.name}.bpf.o has no {prefix}* programs")
            for p in obj.program_names:
                obj.set_autoload(p, p in programs)
            if pin:
                os.makedirs(self.pin_dir, exist_ok=True)
                for m in self.pinned:
                    obj.set_pin_path(m, os.path.join(self.pin_dir, m))
            obj.load()
            self.filters.program(obj)
            links = []
            try:
                for p in programs:
                    links.append(obj.attach(p))
            except LibbpfError:
                for link in links:
                    link.destroy()
                raise
        except BaseException:
            obj.close()
            raise
        self.obj, self.links = obj, links

    def _drop_incompatible_pins(self, exc: LibbpfError) -> None:
        log.warning(
            "%s: pinned maps in %s do not match this version (%s); starting fresh counters",
            self.name,
            self.pin_dir,
            exc,
        )
        shutil.rmtree(self.pin_dir, ignore_errors=True)

    def stop(self) -> None:
        """Detach and free; pinned maps stay (counters continue on the next start)."""
        for link in self.links:
            link.destroy()
        self.links = []
        if self.obj:
            self.obj.close()
            self.obj = None

    def remove_pins(self) -> None:
        shutil.rmtree(self.pin_dir, ignore_errors=True)

    def apply_filters(self) -> None:
        if self.obj:
            self.filters.program(self.obj)

    def map_full_events(self) -> int:
        if not self.obj:
            return 0
        raw = self.obj.map(".bss").lookup(b"\0\0\0\0")
        return _BSS.unpack_from(raw)[2] if raw else 0

    def collect(self) -> list[MetricFamily]:
        if not self.obj:
            return []
        try:
            return list(self.read())
        except LibbpfError:
            self.read_errors += 1
            raise

    def read(self) -> Iterable[MetricFamily]:
        """Turn the maps into metric families (subclasses)."""
        raise NotImplementedError


def sum_percpu_u64(value: bytes, slot_size: int, count: int) -> list[int]:
    """Sum ``count`` u64 fields of a per-CPU value across CPUs."""
    fmt = struct.Struct(f"<{count}Q")
    total = [0] * count
    for off in range(0, len(value), slot_size):
        for i, v in enumerate(fmt.unpack_from(value, off)):
            total[i] += v
    return total


def log2_histogram(
    slots: Sequence[int], min_slot: int, max_slot: int, scale: float = 1.0
) -> tuple[list[float], list[float]]:
    """Bounds 2^min_slot..2^max_slot (times ``scale``) and per-bucket counts scaled back to events.

    Kernel slot s holds values v with 2^(s-1) < v <= 2^s; slots below ``min_slot`` fold into the
    first bucket and those above ``max_slot`` into the +Inf bucket, so cumulative counts are exact.
    ``scale`` converts the kernel's unit to the exposed base unit (1e-9 for ns -> seconds).
    """
    bounds = [(1 << s) * scale for s in range(min_slot, max_slot + 1)]
    counts = [sum(slots[: min_slot + 1]) / UNIT]
    counts += [slots[s] / UNIT for s in range(min_slot + 1, max_slot + 1)]
    counts.append(sum(slots[max_slot + 1 :]) / UNIT)
    return bounds, counts
