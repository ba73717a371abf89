"""Network collector against known workloads and the kernel's own accounting (nstat, ss).

TCP runs on loopback or on a veth pair between two namespaces the test creates and deletes.
Workload processes carry unique names and the agent's ``process_filter`` selects them, so the
harness's own scrape connections do not count.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import replace
from typing import Any, Callable

import pytest

from agent.collectors import FORCE_ATTACH_ENV, FORCE_VARIANT_ENV, Mode
from agent.collectors.network import NetworkCollector, TcpStateCollector
from agent.collectors.tcp_events import TcpEventsCollector
from agent.config import EbpfConfig
from agent.filters import Filters
from agent.registry import HistogramSample
from tests.conftest import BPF_DIR, Agent, Series, wait_for
from tests.netload import CLIENT, SINK, UDP, netns_pair, nstat, run, spawn, unique

MiB = 1 << 20
B = 64 * MiB
C = 500  # connections for the connect-latency histogram
H = 100  # connections held open for the gauge
BYTES, PACKETS = "ebpf_network_bytes_total", "ebpf_network_packets_total"
LATENCY_COUNT = "ebpf_tcp_connect_latency_seconds_count"


def net_agent(agent_factory: Callable[..., Agent], **ebpf: Any) -> Agent:
    """An agent with only the network collector on."""
    return agent_factory({"integrations": {"ebpf": {"collect_syscalls": False, "collect_network": True, **ebpf}}})


def delta(before: Series, after: Series, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def tcp_delta(before: Series, after: Series, name: str, direction: str) -> float:
    return delta(before, after, name, direction=direction, protocol="tcp")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def test_tcp_bytes_loopback(agent_factory: Callable[..., Agent], host: str) -> None:
    """B bytes through a loopback connection: tcp sent and received payload bytes each rise by B."""
    cli, srv = unique("tfoc"), unique("tfos")
    agent = net_agent(agent_factory, process_filter=[cli, srv])
    before = agent.scrape()
    sink = spawn(srv, SINK, host=host, conns=1)
    client = spawn(cli, CLIENT, host=host, port=sink.line()["port"], conns=1, nbytes=B)
    assert client.finish()["sent"] == B
    assert sink.finish()["received"] == B
    after = agent.scrape()
    for direction in ("sent", "received"):
        got = tcp_delta(before, after, BYTES, direction)
        assert abs(got - B) <= 0.01 * B, f"{direction}: {got} bytes for {B}"
        assert tcp_delta(before, after, PACKETS, direction) > 0


def test_filtered_process_not_counted(agent_factory: Callable[..., Agent]) -> None:
    """Only the receiver passes process_filter: nothing sent is counted, everything received is."""
    cli, srv = unique("tfoc"), unique("tfos")
    agent = net_agent(agent_factory, process_filter=[srv])
    before = agent.scrape()
    sink = spawn(srv, SINK, host="127.0.0.1", conns=1)
    spawn(cli, CLIENT, host="127.0.0.1", port=sink.line()["port"], conns=1, nbytes=4 * MiB).finish()
    assert sink.finish()["received"] == 4 * MiB
    after = agent.scrape()
    assert tcp_delta(before, after, BYTES, "sent") == 0
    assert tcp_delta(before, after, BYTES, "received") == 4 * MiB


def sent_segments(netns: str) -> int:
    """Segments a namespace's TCP sent, retransmissions included (what sockets' segs_out count)."""
    counters = nstat(["TcpOutSegs", "TcpRetransSegs"], netns)
    return counters["TcpOutSegs"] + counters["TcpRetransSegs"]


def test_tcp_packets_match_nstat(agent_factory: Callable[..., Agent]) -> None:
    """Segments of a transfer between two namespaces agree with the kernel's within 1%.

    A socket's segs_out counts retransmitted segments too, TcpOutSegs leaves them out (they are in
    TcpRetransSegs: tail-loss probes happen even on a lossless veth when the host is busy), so the
    truth is TcpOutSegs + TcpRetransSegs of both ends. Received segments are compared with the
    segments sent: the link is lossless, and TcpInSegs counts a GRO/GSO aggregate once while a
    socket's segs_in counts each segment.
    """
    cli, srv = unique("tfoc"), unique("tfos")
    agent = net_agent(agent_factory, process_filter=[cli, srv])
    with netns_pair() as pair:
        n0 = sum(sent_segments(ns) for ns in (pair.a, pair.b))
        before = agent.scrape()
        sink = spawn(srv, SINK, netns=pair.b, host=pair.addr_b, conns=1)
        port = sink.line()["port"]
        spawn(cli, CLIENT, netns=pair.a, host=pair.addr_b, port=port, conns=1, nbytes=16 * MiB).finish()
        assert sink.finish()["received"] == 16 * MiB
        time.sleep(0.5)  # the last FIN/ACK exchange
        truth = sum(sent_segments(ns) for ns in (pair.a, pair.b)) - n0
        after = agent.scrape()
    assert truth > 1000
    for direction in ("sent", "received"):
        got = tcp_delta(before, after, PACKETS, direction)
        assert abs(got - truth) <= 0.01 * truth, f"{direction}: {got} segments, TcpOutSegs+TcpRetransSegs {truth}"


def test_udp_bytes_and_datagrams(agent_factory: Callable[..., Agent]) -> None:
    """N datagrams of S bytes over loopback: udp packets rise by N and bytes by N*S, both ways."""
    name, n, size = unique("tfou"), 1000, 512
    agent = net_agent(agent_factory, process_filter=[name])
    before = agent.scrape()
    report = spawn(name, UDP, count=n, size=size).finish()
    after = agent.scrape()
    assert report == {"sent": n, "received": n}
    for direction in ("sent", "received"):
        assert delta(before, after, PACKETS, direction=direction, protocol="udp") == n
        assert delta(before, after, BYTES, direction=direction, protocol="udp") == n * size


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def test_connect_latency_and_connections(agent_factory: Callable[..., Agent], host: str) -> None:
    """C connects: the latency histogram count rises by C; H held connections move the gauge by 2H.

    Both ends of a loopback connection are established sockets of this host, hence 2H. The gauge is
    host-wide, so other traffic on the machine may move it by a few: the bar is +-4.
    """
    cli, srv = unique("tfoc"), unique("tfos")
    agent = net_agent(agent_factory, process_filter=[cli])
    before = agent.scrape()
    sink = spawn(srv, SINK, host=host, conns=C)
    client = spawn(cli, CLIENT, host=host, port=sink.line()["port"], conns=C)
    assert client.finish() == {"sent": 0, "refused": 0}
    sink.finish()
    after = agent.scrape()
    count = delta(before, after, LATENCY_COUNT)
    assert abs(count - C) <= 1, f"{count} connect latencies for {C} connects"
    mean = delta(before, after, "ebpf_tcp_connect_latency_seconds_sum") / count
    assert 1e-7 < mean < 0.01, f"mean loopback connect latency {mean}s"

    gauge = "ebpf_tcp_connections"
    base = agent.value(gauge)
    sink = spawn(srv, SINK, host=host, conns=H, hold=True)
    client = spawn(cli, CLIENT, host=host, port=sink.line()["port"], conns=H, hold=True)
    try:
        assert client.line() == {"held": H}
        assert wait_for(lambda: abs(agent.value(gauge) - base - 2 * H) <= 4, timeout=10), (
            f"gauge {agent.value(gauge)} after opening {H} connections from {base}"
        )
        client.release()
        sink.release()
        client.finish()
        sink.finish()
        assert wait_for(lambda: abs(agent.value(gauge) - base) <= 4, timeout=10), (
            f"gauge {agent.value(gauge)} after closing them, was {base}"
        )
    finally:
        client.kill()
        sink.kill()


def test_retransmits_match_nstat(agent_factory: Callable[..., Agent]) -> None:
    """5% random drop (nftables numgen) on a veth pair: retransmits agree with TcpRetransSegs +-5%.

    The tracepoint sees every namespace, so the truth is the sum over both test namespaces and
    this one (where other traffic might retransmit too).
    """
    cli, srv = unique("tfoc"), unique("tfos")
    agent = net_agent(agent_factory, process_filter=[cli, srv])
    name = "ebpf_tcp_retransmits_total"
    with netns_pair() as pair:
        spaces = (pair.a, pair.b, None)
        table = f"inet {unique('tfo')}"
        run("nft", "add", "table", *table.split(), netns=pair.b)
        run("nft", "add", "chain", *table.split(), "in", "{ type filter hook input priority 0 ; }", netns=pair.b)
        run("nft", "add", "rule", *table.split(), "in", "meta l4proto tcp numgen random mod 100 < 5 drop", netns=pair.b)
        n0 = sum(nstat(["TcpRetransSegs"], ns)["TcpRetransSegs"] for ns in spaces)
        before = agent.value(name)
        sink = spawn(srv, SINK, netns=pair.b, host=pair.addr_b, conns=1)
        port = sink.line()["port"]
        spawn(cli, CLIENT, netns=pair.a, host=pair.addr_b, port=port, conns=1, nbytes=8 * MiB).finish()
        assert sink.finish()["received"] == 8 * MiB
        after = agent.value(name)
        truth = sum(nstat(["TcpRetransSegs"], ns)["TcpRetransSegs"] for ns in spaces) - n0
    got = after - before
    assert truth >= 50, f"only {truth} retransmissions: the drop rule did not bite"
    assert abs(got - truth) <= 0.05 * truth, f"{got} retransmits, TcpRetransSegs {truth}"


SS_RTT = re.compile(r"\brtt:([\d.]+)/")


def test_rtt_matches_ss(agent_factory: Callable[..., Agent]) -> None:
    """Through a tbf-limited veth the sender's smoothed RTT is milliseconds; the gauge agrees with
    the srtt ``ss -ti`` reports for the same connection within +-25% (means of paired samples)."""
    cli, srv = unique("tfoc"), unique("tfos")
    agent = net_agent(agent_factory, process_filter=[cli])
    with netns_pair() as pair:
        run("tc", "qdisc", "add", "dev", pair.dev_a, "root", "tbf", "rate", "20mbit", "burst", "32kb",
            "latency", "50ms", netns=pair.a)  # fmt: skip
        sink = spawn(srv, SINK, netns=pair.b, host=pair.addr_b, conns=1)
        port = sink.line()["port"]
        client = spawn(cli, CLIENT, netns=pair.a, host=pair.addr_b, port=port, conns=1, seconds=8)
        try:
            time.sleep(2)
            agent_ms, ss_ms = [], []
            for _ in range(10):
                agent_ms.append(agent.value("ebpf_tcp_rtt_seconds") * 1e3)
                out = run("ss", "-Hti", "state", "established", "dport", f"= :{port}", netns=pair.a)
                ss_ms += [float(m) for m in SS_RTT.findall(out)]
                time.sleep(0.3)
            client.finish()
            sink.finish()
        finally:
            client.kill()
            sink.kill()
    a, s = sum(agent_ms) / len(agent_ms), sum(ss_ms) / max(1, len(ss_ms))
    assert len(ss_ms) == 10
    assert s > 1.0, f"ss srtt {s} ms: the tbf did not make the RTT milliseconds"
    assert abs(a - s) <= 0.25 * s, f"agent {a:.3f} ms vs ss {s:.3f} ms ({agent_ms} / {ss_ms})"


def test_sampling_scales_bytes(agent_factory: Callable[..., Agent]) -> None:
    """At sample_rate 50 each sampled call weighs two: the byte estimate stays within 15% of B
    (about 1000 sends of 64 KiB: a 5-sigma bar)."""
    cli, srv = unique("tfoc"), unique("tfos")
    agent = net_agent(agent_factory, process_filter=[cli, srv], sample_rate=50)
    before = agent.scrape()
    sink = spawn(srv, SINK, host="127.0.0.1", conns=1)
    spawn(cli, CLIENT, host="127.0.0.1", port=sink.line()["port"], conns=1, nbytes=B).finish()
    assert sink.finish()["received"] == B
    after = agent.scrape()
    got = tcp_delta(before, after, BYTES, "sent")
    assert abs(got - B) <= 0.15 * B, f"{got} bytes estimated for {B}"


def test_promtool_accepts_output(agent_factory: Callable[..., Agent]) -> None:
    """The network and TCP events families pass ``promtool check metrics`` without a remark."""
    agent = agent_factory({"integrations": {"ebpf": {"collect_network": True, "collect_tcp_events": True}}})
    text = agent.scrape_text()
    assert "ebpf_tcp_connections " in text and "ebpf_tcp_opens_total" in text
    res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


@pytest.mark.parametrize(
    ("cls", "mode"),
    [(cls, mode) for cls in (NetworkCollector, TcpEventsCollector) for mode in cls.modes],
    ids=lambda v: v.label if isinstance(v, Mode) else v.name,
)
def test_every_attach_mode_counts(cls: type[TcpStateCollector], mode: Mode, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each mode's programs pass the verifier, attach, and count one connection exactly (the
    fallbacks must not rot): collectors run in this process, selecting the workload by name.
    The mode is set here, so the suite-wide forcing variables do not apply."""
    monkeypatch.delenv(FORCE_ATTACH_ENV, raising=False)
    monkeypatch.delenv(FORCE_VARIANT_ENV, raising=False)
    name = unique("tfom")
    cfg = replace(EbpfConfig(), programs_path=str(BPF_DIR), process_filter=(name,))
    collector = cls(cfg, Filters.from_config(cfg))
    collector.modes = (mode,)
    collector.start(pin=False)
    try:
        assert collector.mode == mode
        sink = spawn(name, SINK, host="127.0.0.1", conns=1)
        spawn(name, CLIENT, host="127.0.0.1", port=sink.line()["port"], conns=1, nbytes=MiB).finish()
        assert sink.finish()["received"] == MiB
        samples = [(f.name, s) for f in collector.collect() for s in f.samples]
    finally:
        collector.stop()
    got = {(n, s.labels): s.count if isinstance(s, HistogramSample) else s.value for n, s in samples}
    if cls is TcpEventsCollector:
        assert got[("ebpf_tcp_opens", ("active",))] == 1
        return
    for direction in ("sent", "received"):
        assert got[("ebpf_network_bytes", (direction, "tcp"))] == MiB
        assert got[("ebpf_network_packets", (direction, "tcp"))] > 0
    assert got[("ebpf_tcp_connect_latency_seconds", ())] == 1
