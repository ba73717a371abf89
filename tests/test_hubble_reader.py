"""The Hubble reader (issue 18): it aggregates what it reads, holds the relay back instead of
dropping, hands a quiet stream's last burst over promptly, and keeps the families' objects
while nothing changes (so scrapes serve their kept text)."""

from __future__ import annotations

import time

from agent.hubble.demo import demo_flows
from tests.conftest_hubble import agent, base_config, exported, relay, self_metric, settle, wait_for


def test_a_small_window_holds_the_relay_back_and_loses_nothing() -> None:
    msgs = demo_flows(5000)
    with relay(msgs) as (_, addr), agent(base_config(addr, flow_buffer_size=16)) as h:  # a 4 KiB window
        settle(h, len(msgs))
        total = sum(v for _, v in exported(h)["hubble_flows"])
        assert self_metric(h, "buffer_overflow") == 0
    assert total == h.aggregator.stats.flows_processed == len(msgs)


def test_the_last_burst_of_a_quiet_stream_is_aggregated_before_the_window_ends() -> None:
    msgs = demo_flows(10)[:10]  # fewer than a burst: nothing makes the reader hand them over itself
    with relay(msgs) as (_, addr), agent(base_config(addr, aggregation_window=30.0)) as h:
        start = time.monotonic()
        wait_for(lambda: h.aggregator.stats.flows_processed == 10, 5, "10 flows aggregated")
        assert time.monotonic() - start < 5 and h.aggregator.stats.windows == 0 and not h.queue


def test_families_are_the_same_objects_until_flows_change_them() -> None:
    msgs = demo_flows(1000)
    with relay(msgs) as (_, addr), agent(base_config(addr)) as h:
        settle(h, len(msgs))
        before = {f.name: f for f in h.collect() if f.name.startswith("hubble_")}
        windows = h.aggregator.stats.windows
        wait_for(lambda: h.aggregator.stats.windows >= windows + 2, 10, "two idle windows")
        after = {f.name: f for f in h.collect() if f.name.startswith("hubble_")}
    assert before and before.keys() == after.keys()
    assert all(f.static and after[name] is f for name, f in before.items())
