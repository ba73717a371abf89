"""The one metric registry: sources register here, exporters read from here.

Data flows one way: kernel maps / Hubble flows -> source (collector) -> registry -> exporters.
A *source* is any object with ``collect() -> Iterable[MetricFamily]``; it is asked at read time
(scrape or OTLP export), so values are as fresh as the kernel maps.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, Union

log = logging.getLogger(__name__)


class Kind(Enum):
    """Metric type, as Prometheus and OTLP both understand it."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class Sample:
    """One counter or gauge series: label values (in the family's label order) and a value."""

    labels: tuple[str, ...]
    value: float


@dataclass(frozen=True)
class HistogramSample:
    """One histogram series.

    ``bounds`` are the finite upper bounds (inclusive, increasing); ``counts`` are per-bucket,
    *not* cumulative, with one extra trailing bucket for values above the last bound (+Inf).
    """

    labels: tuple[str, ...]
    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    sum: float

    @property
    def count(self) -> float:
        return sum(self.counts)


@dataclass
class MetricFamily:
    """A named metric with its series. Counter names carry no ``_total``: exporters add it.

    ``static``: the source hands out this same object, unchanged, until its values change (Hubble's
    families, once per aggregation window), so an exporter may keep what it derives from it (the
    rendered text) while it gets the same object. Families read live at every collect (eBPF maps)
    are not static.
    """

    name: str
    kind: Kind
    help: str
    label_names: tuple[str, ...] = ()
    samples: list[Union[Sample, HistogramSample]] = field(default_factory=list)
    static: bool = False

    def add(self, labels: Sequence[str], value: float) -> None:
        self.samples.append(Sample(tuple(labels), float(value)))

    def add_histogram(
        self, labels: Sequence[str], bounds: Sequence[float], counts: Sequence[float], total: float
    ) -> None:
        self.samples.append(HistogramSample(tuple(labels), tuple(bounds), tuple(counts), float(total)))


class Source(Protocol):
    """Anything that yields metric families on demand."""

    name: str

    def collect(self) -> Iterable[MetricFamily]: ...


class Registry:
    """Holds the sources; ``collect`` gathers their families, isolating failures per source."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[str, Source] = {}
        self.read_errors: dict[str, int] = {}

    def register(self, source: Source) -> None:
        with self._lock:
            self._sources[source.name] = source

    def unregister(self, name: str) -> None:
        with self._lock:
            self._sources.pop(name, None)

    def sources(self) -> list[Source]:
        with self._lock:
            return list(self._sources.values())

    def collect(self) -> list[MetricFamily]:
        families: list[MetricFamily] = []
        for source in self.sources():
            try:
                families.extend(source.collect())
            except Exception as exc:  # one broken source must not blank the whole scrape
                self.read_errors[source.name] = self.read_errors.get(source.name, 0) + 1
                log.warning("reading %s failed: %s", source.name, exc)
        return families
