"""The Hubble reader (issue 18): it aggregates what it reads, holds the relay back instead of
dropping, hands a quiet stream's last burst over promptly, and keeps the families' objects
while nothing changes (so scrapes serve their kept text)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from agent.hubble.client import read_in_bursts
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


class Stream:
    """A simulated stream: ``rate`` messages of ``size`` bytes per second, arriving in a burst every
    2 ms (as a relay writes them), the reader spending ``cost`` s on each; its clock and sleep are
    the reader's."""

    def __init__(self, rate: float, size: int = 230, cost: float = 10e-6) -> None:
        self.rate, self.size, self.cost = rate, size, cost
        self.now = 0.0
        self.naps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.now += seconds

    def messages(self, count: int) -> Iterator[bytes]:
        burst = max(1, round(self.rate * 0.002))
        for i in range(count):
            arrival = (i // burst) * burst / self.rate
            self.now = max(self.now + self.cost, arrival)  # waits for the message if it is not there yet
            yield b"x" * self.size


def naps_at(rate: float, seconds: float = 2.0) -> list[float]:
    stream = Stream(rate)
    for _ in read_in_bursts(stream.messages(int(rate * seconds)), clock=stream.clock, sleep=stream.sleep):
        pass
    return stream.naps[2:]  # after the first cycles' estimate


@pytest.mark.parametrize(("rate", "lo", "hi"), [(1000, 0.02, 0.02), (5000, 0.02, 0.02), (30_000, 0.008, 0.011)])
def test_naps_last_as_long_as_64_kib_take_to_arrive(rate: float, lo: float, hi: float) -> None:
    naps = naps_at(rate)
    assert naps and all(lo - 1e-9 <= n <= hi + 1e-9 for n in naps), naps[:10]


def test_a_fast_stream_is_read_without_naps() -> None:
    assert naps_at(80_000) == []
