"""The Hubble reader (issue 18): it aggregates what it reads, holds the relay back instead of
dropping, hands a quiet stream's last burst over promptly, and keeps the families' objects
while nothing changes (so scrapes serve their kept text)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from agent.hubble.client import NAP, read_in_bursts
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
    2 ms (as a relay writes them); as gRPC reads the socket a chunk at a time, reading takes
    ``read_cost`` s at every ``chunk``-th message found already there; the reader then spends
    ``cost`` s on each (``read_all``). Its clock and sleep are the reader's."""

    def __init__(self, rate: float, size: int = 230, cost: float = 10e-6, chunk: int = 0, read_cost: float = 0) -> None:
        self.rate, self.size, self.cost, self.chunk, self.read_cost = rate, size, cost, chunk, read_cost
        self.now = self.busy = 0.0
        self.naps: list[float] = []

    def clock(self) -> float:
        return self.now

    def active(self) -> float:
        return self.busy

    def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.now += seconds

    def messages(self, count: int) -> Iterator[bytes]:
        burst = max(1, round(self.rate * 0.002))
        for i in range(count):
            arrival = (i // burst) * burst / self.rate
            if arrival > self.now:
                self.now = arrival  # waits for it
            elif self.chunk and i % self.chunk == 0:
                self.now += self.read_cost  # the next chunk of what has piled up
                self.busy += self.read_cost
            yield b"x" * self.size

    def lag(self, count: int) -> float:
        """How long after the last message arrived the reader was done with it."""
        return (
            self.now - ((count - 1) // max(1, round(self.rate * 0.002))) * max(1, round(self.rate * 0.002)) / self.rate
        )


def read_all(stream: Stream, seconds: float = 2.0, window: float = float("inf")) -> list[float]:
    """Read ``seconds`` of ``stream`` through a receive window of ``window`` bytes; the naps taken."""
    messages = stream.messages(int(stream.rate * seconds))
    for _ in read_in_bursts(messages, clock=stream.clock, sleep=stream.sleep, active=stream.active, window=window):
        stream.now += stream.cost  # aggregating it
        stream.busy += stream.cost
    return stream.naps


@pytest.mark.parametrize("rate", [1000, 5000, 15_000])
def test_a_slow_stream_is_read_in_naps(rate: float) -> None:
    stream = Stream(rate)
    naps = read_all(stream)
    assert len(naps) >= 0.6 * 2.0 / NAP and set(naps) == {NAP}  # 60% of the naps 2 s could hold
    assert stream.lag(int(rate * 2.0)) <= NAP + 0.003


def test_no_nap_outgrows_half_the_window() -> None:
    """1,000 flows of 230 bytes a second pile up 11.5 KB in a nap: too much for a 16 KiB window
    (flow_buffer_size 64), where the relay would wait for the reader; fine in 32 KiB."""
    assert read_all(Stream(1000), window=16 * 1024) == []
    assert read_all(Stream(1000), window=32 * 1024)


@pytest.mark.parametrize("rate", [25_000, 80_000])
def test_a_fast_stream_is_read_without_naps(rate: float) -> None:
    assert read_all(Stream(rate)) == []


def test_the_chunks_of_a_naps_pile_are_read_whole() -> None:
    """Reading each chunk of a pile takes longer than IDLE_WAIT: were those reads taken for waits,
    every chunk would be followed by a nap, and the reader would read a chunk per nap."""
    stream = Stream(15_000, chunk=40, read_cost=0.0008)
    assert read_all(stream) and stream.lag(30_000) <= NAP + 0.005


@pytest.mark.parametrize(("rate", "cost"), [(30_000, 40e-6), (12_000, 80e-6)])
def test_a_reader_that_barely_keeps_up_does_not_nap(rate: float, cost: float) -> None:
    """At 40 µs per flow 30,000 flows/s cannot be kept up with, at 80 µs 12,000 flows/s barely
    (a slow stream by its rate): a nap would only add to the lag."""
    assert read_all(Stream(rate, cost=cost, chunk=280, read_cost=0.0008)) == []
