"""Prometheus text exposition (format 0.0.4) of registry families, keeping the text of static ones.

The output is what ``prometheus_client.generate_latest`` writes for the same families (counters
get ``_total``, labels in name order, values as Go formats them), written directly from the
registry's samples. A ``static`` family (one the source hands out unchanged until its values
change, such as Hubble's once per aggregation window) is rendered once and its text served for as
long as the source returns the same object; every other family is rendered at every scrape.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client.utils import floatToGoString

from agent.registry import HistogramSample, Kind, MetricFamily, Sample

CHUNK_LINES = 256  # ~60 KB of Hubble lines: below glibc's 128 KiB mmap threshold


def _escape(value: str) -> str:
    """A label value as the text format quotes it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render(fam: MetricFamily) -> list[bytes]:
    """One family in the text format (HELP, TYPE, then a line per sample), in chunks of at most
    CHUNK_LINES lines: no buffer grows to the size of a big family, so the allocator keeps reusing
    the same small blocks instead of the heap growing around multi-megabyte ones."""
    name = fam.name + "_total" if fam.kind is Kind.COUNTER else fam.name
    help_text = fam.help.replace("\\", r"\\").replace("\n", r"\n")
    out = [f"# HELP {name} {help_text}\n# TYPE {name} {fam.kind.value}\n"]
    keys = fam.label_names
    order = sorted(range(len(keys)), key=keys.__getitem__)  # prometheus_client sorts labels by name
    num = floatToGoString
    if fam.kind is Kind.HISTOGRAM:
        cut = bisect_left([keys[i] for i in order], "le")  # where le goes among the sorted labels
        for s in fam.samples:
            assert isinstance(s, HistogramSample)
            pairs = [f'{keys[i]}="{_escape(s.labels[i])}"' for i in order]
            labels = ",".join(pairs)
            head, tail = ",".join(pairs[:cut]), ",".join(pairs[cut:])
            head, tail = (head + "," if head else ""), ("," + tail if tail else "")
            bucket = f"{fam.name}_bucket{{{head}le="
            cumulative = 0.0
            for bound, n in zip(s.bounds, s.counts):
                cumulative += n
                out.append(f'{bucket}"{num(bound)}"{tail}}} {num(cumulative)}\n')
            count = num(s.count)
            out.append(f'{bucket}"+Inf"{tail}}} {count}\n')
            braces = f"{{{labels}}}" if labels else ""
            out.append(f"{fam.name}_count{braces} {count}\n{fam.name}_sum{braces} {num(s.sum)}\n")
        return _chunks(out)
    for s in fam.samples:
        assert isinstance(s, Sample)
        if keys:
            labels = ",".join([f'{keys[i]}="{_escape(s.labels[i])}"' for i in order])
            out.append(f"{name}{{{labels}}} {num(s.value)}\n")
        else:
            out.append(f"{name} {num(s.value)}\n")
    return _chunks(out)


def _chunks(lines: list[str]) -> list[bytes]:
    return ["".join(lines[i : i + CHUNK_LINES]).encode() for i in range(0, len(lines), CHUNK_LINES)]


class Exposition:
    """Renders scrapes; remembers the text of static families (by object) until they are replaced."""

    def __init__(self) -> None:
        self._static: dict[str, tuple[MetricFamily, list[bytes]]] = {}
        self._lock = threading.Lock()

    def render(self, families: Iterable[MetricFamily]) -> list[bytes]:
        """The exposition of ``families``, in their order, as chunks to write one after the other."""
        parts: list[bytes] = []
        seen = set()
        for fam in families:
            if not fam.static:
                parts += render(fam)
                continue
            seen.add(fam.name)
            with self._lock:
                kept = self._static.get(fam.name)
            if kept is None or kept[0] is not fam:
                kept = (fam, render(fam))
                with self._lock:
                    self._static[fam.name] = kept
            parts += kept[1]
        with self._lock:  # forget families no source hands out any more
            for name in self._static.keys() - seen:
                del self._static[name]
        return parts
