"""The Prometheus text the agent writes itself: the same bytes prometheus_client writes, static
families rendered once per object, and Hubble's exposition accepted by promtool."""

from __future__ import annotations

import subprocess

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from agent.exporters.exposition import Exposition
from agent.hubble.aggregator import Aggregator
from agent.hubble.client import FIELD_MASK
from agent.hubble.demo import demo_flows
from agent.hubble.families import Groups, namespace_rule
from agent.hubble.replay import ObserverService, to_records
from agent.registry import HistogramSample, Kind, MetricFamily, Sample


def reference(families: list[MetricFamily]) -> bytes:
    """What prometheus_client's own writer makes of the families (the exporter's former path)."""

    def convert(fam: MetricFamily) -> Metric:
        if fam.kind is Kind.HISTOGRAM:
            out = HistogramMetricFamily(fam.name, fam.help, labels=fam.label_names)
            for s in fam.samples:
                assert isinstance(s, HistogramSample)
                cumulative, buckets = 0.0, []
                for bound, n in zip(s.bounds, s.counts):
                    cumulative += n
                    buckets.append((floatToGoString(bound), cumulative))
                out.add_metric(list(s.labels), [*buckets, ("+Inf", s.count)], s.sum)
            return out
        cls = CounterMetricFamily if fam.kind is Kind.COUNTER else GaugeMetricFamily
        out = cls(fam.name, fam.help, labels=fam.label_names)
        for s in fam.samples:
            assert isinstance(s, Sample)
            out.add_metric(list(s.labels), s.value)
        return out

    class Collector:
        def collect(self) -> list[Metric]:
            return [convert(f) for f in families]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    return generate_latest(registry)


def awkward_families() -> list[MetricFamily]:
    """Escapes, unlabelled and empty families, big numbers, and histogram labels on both sides of le."""
    counter = MetricFamily("t_requests", Kind.COUNTER, 'help with \\ and\nnewline and "quotes"', ("path", "code"))
    counter.add(('/a"b', "a\\b\nc"), 3)
    counter.add(("/", "200"), 12_345_678)
    gauge = MetricFamily("t_up", Kind.GAUGE, "unlabelled")
    gauge.add((), 0.25)
    hist = MetricFamily("t_latency_seconds", Kind.HISTOGRAM, "latency", ("zone", "app", "method"))
    hist.add_histogram(("z1", "shop", "GET"), (0.005, 0.5, 2.5e6), (1, 0, 4, 2), 7.75)
    hist.add_histogram(("z2", "", "POST"), (0.005, 0.5, 2.5e6), (0, 0, 0, 0), 0.0)
    bare = MetricFamily("t_bare_seconds", Kind.HISTOGRAM, "no labels")
    bare.add_histogram((), (1.0,), (2, 1), 3.5)
    empty = MetricFamily("t_nothing", Kind.COUNTER, "no samples", ("x",))
    return [counter, gauge, hist, bare, empty]


def hubble_families() -> list[MetricFamily]:
    """Every hubble_* family at cluster scope after 5,000 demo flows (one window)."""
    service = ObserverService(to_records(demo_flows(5000)))
    agg = Aggregator(Groups(node_label=True), namespace_rule((), ()))
    for raw in service.prepared(FIELD_MASK):
        agg.add(raw)
    agg.publish()
    return agg.families()


def test_text_is_what_prometheus_client_writes() -> None:
    fams = awkward_families() + hubble_families()
    assert b"".join(Exposition().render(fams)) == reference(fams)


def test_static_families_are_rendered_once_per_object() -> None:
    live, kept = (MetricFamily(name, Kind.GAUGE, "g", ("k",), static=static) for name, static in (("l", 0), ("s", 1)))
    live.add(("a",), 1)
    kept.add(("a",), 1)
    exposition = Exposition()
    first = b"".join(exposition.render([live, kept]))
    live.samples[0] = kept.samples[0] = Sample(("a",), 2)  # a source may not do this to a static family...
    second = b"".join(exposition.render([live, kept]))
    assert first.count(b"} 1.0") == 2
    assert b'l{k="a"} 2.0' in second and b's{k="a"} 1.0' in second  # ...so its old text is served
    replaced = MetricFamily("s", Kind.GAUGE, "g", ("k",), [Sample(("a",), 3)], static=True)
    assert b's{k="a"} 3.0' in b"".join(exposition.render([live, replaced]))  # a new object: rendered again


# The seed names this gauge; promtool's naming lint reserves _count for histograms and summaries.
SEED_NAME_REMARK = 'hubble_endpoint_count non-histogram and non-summary metrics should not have "_count" suffix'


def test_promtool_accepts_the_hubble_exposition() -> None:
    text = b"".join(Exposition().render(hubble_families()))
    res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert res.stdout.decode().strip() == ""
    assert res.stderr.decode().splitlines() == [SEED_NAME_REMARK]  # parses; no remark but the seed name's
