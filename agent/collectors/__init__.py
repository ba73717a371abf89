"""eBPF collectors: each pairs ``bpf/NAME.bpf.c`` with a ``BpfCollector`` subclass here.

A collector loads its object, attaching the first *mode* (a set of programs chosen by name
prefix, e.g. ``raw_`` for raw tracepoints, ``tp_`` for classic tracepoints) that the running
kernel accepts, pins its aggregation maps under ``pin_path/NAME`` so counters survive restarts,
and turns map contents into metric families at read time.

Collectors on the same hooks share one object (``object_name``): the first to start loads and
attaches it, each switches its own part on through a bit of the object's ``tfo_features``
(``feature``), and the last to stop frees it. So the syscall-wide hooks run once per syscall
whether one or both of the syscall and file I/O collectors are on.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Optional

from agent.config import EbpfConfig
from agent.filters import UNIT, Filters
from agent.libbpf import BpfObject, LibbpfError, Link
from agent.registry import MetricFamily

if TYPE_CHECKING:
    from agent.collectors.labels import Attribution

log = logging.getLogger(__name__)


class Mode(NamedTuple):
    """Programs named ``prefix*`` attached as ``attach_type``, from the collector's object or, with
    ``variant``, from ``NAME.VARIANT.bpf.o``: a build of the same source for other kernels (``cast``
    for newer ones, ``compat`` for those without task storage). ``name`` tells apart two modes of
    one attach type (e.g. ``raw_tp/syscalls``)."""

    attach_type: str
    prefix: str
    variant: str = ""
    name: str = ""

    @property
    def label(self) -> str:
        """How the mode is shown (check, logs, self-metrics) and named in $TFO_AGENT_FORCE_ATTACH."""
        base = self.name or self.attach_type
        return f"{base} ({self.variant})" if self.variant else base

    def compat(self) -> Mode:
        return self._replace(variant=COMPAT)


COMPAT = "compat"
TP_BTF = Mode("tp_btf", "tpbtf_")  # typed pointers: kernel fields are plain loads
RAW_TP = Mode("raw_tp", "raw_")
TRACEPOINT = Mode("tracepoint", "tp_")
# Most preferred first.
DEFAULT_MODES: tuple[Mode, ...] = (RAW_TP, TRACEPOINT)
_BSS = struct.Struct("<IIQ")  # tfo_kgen, padding, tfo_map_full
_U32 = struct.Struct("<I")
# Programs named up_* (uprobes) are loaded in every mode and attached by their collector, not by the mode.
UPROBE_PREFIX = "up_"
FORCE_ATTACH_ENV = "TFO_AGENT_FORCE_ATTACH"
FORCE_VARIANT_ENV = "TFO_AGENT_FORCE_VARIANT"


def forced_attach_types() -> dict[str, str]:
    """``collector=mode,...`` from $TFO_AGENT_FORCE_ATTACH: pin a collector to the modes of one attach
    type or label (troubleshooting a kernel, and how the tests exercise every fallback)."""
    items = (item.split("=", 1) for item in os.environ.get(FORCE_ATTACH_ENV, "").split(",") if "=" in item)
    return {name.strip(): kind.strip() for name, kind in items}


def forced_variant() -> str:
    """$TFO_AGENT_FORCE_VARIANT: load only that build (``compat``: the fallback for kernels before
    5.11, forced on any kernel to test it there)."""
    return os.environ.get(FORCE_VARIANT_ENV, "").strip()


class CollectorError(RuntimeError):
    """A collector could not start; the message says why (for check, logs and self-metrics)."""


@dataclass
class Loaded:
    """One loaded, attached object and the collectors using it (first user first)."""

    obj: BpfObject
    links: list[Link]
    mode: Mode
    users: list[str] = field(default_factory=list)
    features: int = 0

    def set_feature(self, bit: int, on: bool) -> None:
        self.features = self.features | bit if on else self.features & ~bit
        self.obj.map(".data.features").update(b"\0\0\0\0", _U32.pack(self.features))

    def close(self) -> None:
        for link in self.links:
            link.destroy()
        self.obj.close()


_LOADED: dict[tuple[str, bool], Loaded] = {}  # (object path, pinned) -> the loaded object
_LOADED_LOCK = threading.Lock()


class BpfCollector:
    """Base class: load/attach with fallback, pinning, filters, reading."""

    name: ClassVar[str]
    switch: ClassVar[str]  # the collect_* config key that enables it
    pinned: ClassVar[tuple[str, ...]] = ()  # maps that keep counters across restarts
    modes: ClassVar[tuple[Mode, ...]] = DEFAULT_MODES
    object_name: ClassVar[str] = ""  # the object's name when it is not the collector's
    feature: ClassVar[int] = 0  # this collector's bit in a shared object's tfo_features

    def __init__(self, cfg: EbpfConfig, filters: Filters, attribution: Optional[Attribution] = None) -> None:
        """``attribution`` says whose cgroups are whose, for container labels (none: all the host's)."""
        from agent.collectors.labels import HostOnly  # labels builds on this module

        self.cfg = cfg
        self.filters = filters
        self.attribution: Attribution = attribution or HostOnly()
        self.error = ""
        self.read_errors = 0
        self._loaded: Optional[tuple[tuple[str, bool], Loaded]] = None  # (_LOADED key, object) once started

    @property
    def obj(self) -> Optional[BpfObject]:
        return self._loaded[1].obj if self._loaded else None

    @property
    def links(self) -> list[Link]:
        return self._loaded[1].links if self._loaded else []

    @property
    def attach_type(self) -> str:
        return self._loaded[1].mode.attach_type if self._loaded else ""

    @property
    def mode(self) -> Optional[Mode]:
        """The mode the running object was attached in (None when not started)."""
        return self._loaded[1].mode if self._loaded else None

    @classmethod
    def object_stem(cls) -> str:
        return cls.object_name or cls.name

    @property
    def object_path(self) -> str:
        return self.variant_path("")

    def variant_path(self, variant: str) -> str:
        name = f"{self.object_stem()}.{variant}" if variant else self.object_stem()
        return os.path.join(self.cfg.programs_path, f"{name}.bpf.o")

    @classmethod
    def pinned_maps(cls, cfg: EbpfConfig) -> tuple[str, ...]:
        """The maps pinned with ``cfg`` (those holding counters in use)."""
        return cls.pinned

    @classmethod
    def map_sizes(cls, cfg: EbpfConfig) -> dict[str, int]:
        """Map name -> max_entries to set before load (maps ``cfg`` leaves unused shrink to 1)."""
        return {}

    def sharers(self) -> list[type[BpfCollector]]:
        """Every collector class of this build on this collector's object (itself included)."""
        from agent.collectors.catalog import COLLECTORS

        return [c for c in COLLECTORS if c.object_stem() == self.object_stem()] or [type(self)]

    @property
    def pin_dir(self) -> str:
        return self.pin_dir_of(self.name)

    def pin_dir_of(self, collector: str) -> str:
        return os.path.join(self.cfg.pin_path, collector)

    @property
    def up(self) -> bool:
        return self.obj is not None

    def start(self, pin: bool = True) -> None:
        """Load and attach the first mode that works (or join the collector that did); raise
        CollectorError with every reason."""
        key = (self.object_path, pin)
        with _LOADED_LOCK:
            loaded = _LOADED.get(key)
            if loaded is None:
                loaded = _LOADED[key] = self._load(pin)
            elif loaded.mode not in self.modes:
                self.error = f"{self.name} cannot run on the shared hooks attached as {loaded.mode.label}"
                raise CollectorError(self.error)
            else:
                self.filters.program(loaded.obj)
            loaded.users.append(self.name)
            if self.feature:
                loaded.set_feature(self.feature, True)
        self._loaded, self.error = (key, loaded), ""

    def _load(self, pin: bool) -> Loaded:
        if not os.path.exists(self.object_path):
            self.error = f"BPF object {self.object_path} not found (build with 'make -C bpf' or check programs_path)"
            raise CollectorError(self.error)
        modes = self.modes
        forced = forced_attach_types().get(self.name)
        if forced:
            modes = tuple(m for m in modes if forced in (m.attach_type, m.label, m.name))
            if not modes:
                known = ", ".join(dict.fromkeys(m.label for m in self.modes))
                self.error = f"{FORCE_ATTACH_ENV} asks for {forced!r}, {self.name} has: {known}"
                raise CollectorError(self.error)
        variant = forced_variant()
        if variant:
            modes = tuple(m for m in modes if m.variant == variant)
            if not modes:
                self.error = f"{FORCE_VARIANT_ENV} asks for {variant!r}, which no mode of {self.name} is built as"
                raise CollectorError(self.error)
        reasons = []
        for mode in modes:
            label = mode.label
            try:
                return self._start_mode(mode, pin)
            except LibbpfError as exc:
                if pin and exc.errno == 22 and "pinned" in str(exc):
                    self._drop_incompatible_pins(exc)
                    try:
                        return self._start_mode(mode, pin)
                    except LibbpfError as again:
                        exc = again
                reasons.append(f"{label}: {exc}")
        self.error = "; ".join(reasons)
        raise CollectorError(self.error)

    def _start_mode(self, mode: Mode, pin: bool) -> Loaded:
        path = self.variant_path(mode.variant)
        if mode.variant and not os.path.exists(path):
            raise LibbpfError(2, f"{path} not found")
        obj = BpfObject(path, btf_custom_path=self.cfg.btf_custom_path)
        try:
            programs = [p for p in obj.program_names if p.startswith(mode.prefix)]
            if not programs:
                raise LibbpfError(22, f"{os.path.basename(path)} has no {mode.prefix}* programs")
            for p in obj.program_names:
                obj.set_autoload(p, p in programs or p.startswith(UPROBE_PREFIX))
            for cls in self.sharers():
                for m, entries in cls.map_sizes(self.cfg).items():
                    obj.set_max_entries(m, entries)
                if pin:
                    pin_dir = self.pin_dir_of(cls.name)
                    os.makedirs(pin_dir, exist_ok=True)
                    for m in cls.pinned_maps(self.cfg):
                        obj.set_pin_path(m, os.path.join(pin_dir, m))
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
        return Loaded(obj, links, mode)

    def _drop_incompatible_pins(self, exc: LibbpfError) -> None:
        log.warning(
            "%s: pinned maps in %s do not match this version (%s); starting fresh counters",
            self.name,
            self.pin_dir,
            exc,
        )
        for cls in self.sharers():
            shutil.rmtree(self.pin_dir_of(cls.name), ignore_errors=True)

    def stop(self) -> None:
        """Leave the object; the last user detaches and frees it. Pinned maps stay (counters
        continue on the next start)."""
        if self._loaded is None:
            return
        key, loaded = self._loaded
        with _LOADED_LOCK:
            loaded.users.remove(self.name)
            if not loaded.users:
                del _LOADED[key]
                loaded.close()
            elif self.feature:
                loaded.set_feature(self.feature, False)
        self._loaded = None

    def remove_pins(self) -> None:
        shutil.rmtree(self.pin_dir, ignore_errors=True)

    def apply_filters(self) -> None:
        if self.obj:
            self.filters.program(self.obj)

    def map_full_events(self) -> int:
        """Events an object's full maps lost (reported by its first user only, when shared)."""
        if self._loaded is None or self._loaded[1].users[0] != self.name:
            return 0
        raw = self._loaded[1].obj.map(".bss").lookup(b"\0\0\0\0")
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
    """Sum ``count`` u64 fields of a per-CPU value (one ``slot_size`` slot, 8-byte aligned, per CPU)
    across CPUs, in native byte order as the kernel keeps them."""
    words = memoryview(value).cast("Q")
    stride = slot_size // 8
    return [sum(words[i::stride]) for i in range(count)]


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
