"""TCP events collector: opens, closes, resets and the established gauge against known workloads.

Active opens happen in the connecting process, so ``process_filter`` makes them exact; passive
opens, closes and resets happen in softirq context and count host-wide, so other traffic on the
machine adds to them, starting with the harness's scrapes (each one is a loopback connection: a
passive open and two closes): those bars allow +6.
"""

from __future__ import annotations

from typing import Any, Callable

from tests.conftest import Agent, wait_for
from tests.netload import CLIENT, SINK, NetnsPair, netns_pair, run, spawn, unique
from tests.test_network import delta

NOISE = 6


def events_agent(agent_factory: Callable[..., Agent], **ebpf: Any) -> Agent:
    """An agent with only the TCP events collector on."""
    return agent_factory({"integrations": {"ebpf": {"collect_syscalls": False, "collect_tcp_events": True, **ebpf}}})


def within(got: float, want: int) -> bool:
    return want <= got <= want + NOISE


def settled(pair: NetnsPair) -> bool:
    """No socket of either namespace is still closing (TIME-WAIT ones are already CLOSE)."""
    return not any(
        run("ss", "-Htan", "state", "connected", "exclude", "time-wait", netns=ns) for ns in (pair.a, pair.b)
    )


def test_opens_and_closes(agent_factory: Callable[..., Agent]) -> None:
    """C connections between two namespaces: +C active, +C passive, +2C closes (both ends)."""
    cli, srv, c = unique("tfoc"), unique("tfos"), 200
    agent = events_agent(agent_factory, process_filter=[cli])
    with netns_pair() as pair:
        before = agent.scrape()
        sink = spawn(srv, SINK, netns=pair.b, host=pair.addr_b, conns=c)
        port = sink.line()["port"]
        assert spawn(cli, CLIENT, netns=pair.a, host=pair.addr_b, port=port, conns=c, nbytes=100).finish() == {
            "sent": 100 * c,
            "refused": 0,
        }
        assert sink.finish()["received"] == 100 * c
        assert wait_for(lambda: settled(pair), timeout=10)
        after = agent.scrape()
    assert delta(before, after, "ebpf_tcp_opens_total", type="active") == c
    assert within(delta(before, after, "ebpf_tcp_opens_total", type="passive"), c)
    assert within(delta(before, after, "ebpf_tcp_closes_total"), 2 * c)


def test_resets(agent_factory: Callable[..., Agent]) -> None:
    """K aborted connections (SO_LINGER 0) and J connects to a closed port: +K+J RSTs each way.

    An abort sends one RST, which the peer receives; a SYN to a closed port is answered by one RST,
    which the connecting socket receives. The aborted connections also count as 2K closes; the
    refused connects count as active opens but never as closes (they were never established).
    """
    cli, srv, k, j = unique("tfoc"), unique("tfos"), 50, 20
    agent = events_agent(agent_factory, process_filter=[cli])
    with netns_pair() as pair:
        before = agent.scrape()
        sink = spawn(srv, SINK, netns=pair.b, host=pair.addr_b, conns=k)
        port = sink.line()["port"]
        report = spawn(cli, CLIENT, netns=pair.a, host=pair.addr_b, port=port, conns=k, reset=True).finish()
        assert report == {"sent": 0, "refused": 0}
        sink.finish()
        closed = spawn(cli, CLIENT, netns=pair.a, host=pair.addr_b, port=port, conns=j).finish()
        assert closed == {"sent": 0, "refused": j}
        assert wait_for(lambda: settled(pair), timeout=10)
        after = agent.scrape()
    assert delta(before, after, "ebpf_tcp_opens_total", type="active") == k + j
    for direction in ("sent", "received"):
        got = delta(before, after, "ebpf_tcp_resets_total", direction=direction)
        assert within(got, k + j), f"{got} resets {direction}, expected {k + j}"
    assert within(delta(before, after, "ebpf_tcp_closes_total"), 2 * k)


def test_connections_gauge_without_network_collector(agent_factory: Callable[..., Agent]) -> None:
    """With collect_network off, tcp_events alone exports ebpf_tcp_connections, and it moves."""
    cli, srv, h = unique("tfoc"), unique("tfos"), 20
    agent = events_agent(agent_factory)
    gauge = "ebpf_tcp_connections"
    base = agent.value(gauge)
    sink = spawn(srv, SINK, host="127.0.0.1", conns=h, hold=True)
    client = spawn(cli, CLIENT, host="127.0.0.1", port=sink.line()["port"], conns=h, hold=True)
    try:
        assert client.line() == {"held": h}
        assert wait_for(lambda: abs(agent.value(gauge) - base - 2 * h) <= 4, timeout=10)
        client.release()
        sink.release()
        client.finish()
        sink.finish()
        assert wait_for(lambda: abs(agent.value(gauge) - base) <= 4, timeout=10)
    finally:
        client.kill()
        sink.kill()
