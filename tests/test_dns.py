"""DNS collector against a real resolver (unbound serving a local zone in the test's own network
namespace) and real clients: dig, glibc's getaddrinfo (A and AAAA together with sendmmsg) and a
timed UDP client. Counts are compared with what unbound itself counted and what the clients saw."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from agent.l7names import RCODES
from tests.conftest import ROOT, Agent, parse_metrics
from tests.l7servers import REFUSED_ZONE, ZONE, Resolver, named, resolver, unique

N = 5
QTYPES = ("A", "AAAA", "MX", "TXT")
UNBOUND_RCODES = {"NOERROR": 0, "SERVFAIL": 2, "NXDOMAIN": 3, "REFUSED": 5}
CLIENT = r"""
import random, socket, sys, time
from agent import host
from agent.collectors.selftest_l7 import dns_query
host.set_process_name(sys.argv[1])
mode, n = sys.argv[2], int(sys.argv[3])
if mode == "gai":
    for name in sys.argv[4:]:
        for _ in range(n):
            try:
                socket.getaddrinfo(name, 80, socket.AF_UNSPEC, socket.SOCK_STREAM)
            except socket.gaierror:
                pass
elif mode == "timed":
    total = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.1", 53))
        for i in range(n):
            q = dns_query(f"q{i}.slow14", 1, i)  # forwarded: answered after the upstream's delay
            t0 = time.perf_counter_ns()
            s.send(q)
            s.recv(512)
            total += time.perf_counter_ns() - t0
    print(total)
elif mode == "bad":
    good = dns_query("a.test14", 1, 7)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.1", 53))
        s.send(good[:8])  # shorter than a header
        s.send(good[:16])  # cut inside the question name
        s.send(random.Random(14).randbytes(40))  # garbage
        s.send(good[:12] + b"\xc0\x0c" + good[-4:])  # a compression pointer in the question
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.1", 53))
        s.send(good)  # a good query whose response is read 8 bytes short of a header
        s.recv(4)
"""


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[Resolver]:
    with resolver(tmp_path) as res:
        yield res


def dns_agent(agent_factory: Callable[..., Agent], *comms: str) -> Agent:
    return agent_factory(
        {"integrations": {"ebpf": {"collect_dns": True, "process_filter": list(comms), "max_comm_series": 10_000}}}
    )


def run_client(res: Resolver, comm: str, mode: str, n: int, *names: str) -> str:
    out = res.run(sys.executable, "-c", CLIENT, comm, mode, str(n), *names, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


class Seen:
    """The agent's DNS series of one process."""

    def __init__(self, agent: Agent, comm: str) -> None:
        series = parse_metrics(agent.scrape_text())
        self.queries: Counter[str] = Counter()
        self.responses: Counter[tuple[str, str]] = Counter()
        self.latency_count = self.latency_sum = 0.0
        self.errors = sum(v for (n, _), v in series.items() if n == "tfo_agent_dns_parse_errors_total")
        for (name, labels), v in series.items():
            d = dict(labels)
            if d.get("comm") != comm:
                continue
            if name == "ebpf_dns_queries_total":
                self.queries[d["qtype"]] += int(v)
            elif name == "ebpf_dns_responses_total":
                self.responses[(d["qtype"], d["rcode"])] += int(v)
            elif name == "ebpf_dns_latency_seconds_count":
                self.latency_count = v
            elif name == "ebpf_dns_latency_seconds_sum":
                self.latency_sum = v

    def __str__(self) -> str:
        return f"{dict(self.queries)} {dict(self.responses)}"


def server_delta(before: dict[str, int], after: dict[str, int]) -> tuple[Counter[str], Counter[str]]:
    """(queries by type, answers by Cilium rcode name) unbound counted in between."""

    def delta(prefix: str) -> Counter[str]:
        return Counter({k[len(prefix) :]: after[k] - before.get(k, 0) for k in after if k.startswith(prefix)})

    rcodes = Counter({RCODES[UNBOUND_RCODES[k]]: v for k, v in delta("num.answer.rcode.").items() if v})
    return +delta("num.query.type."), rcodes


def test_dig_counts_exactly_per_qtype_and_rcode(
    dns: Resolver, agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    comm = unique("dig14")
    dig = named("dig", comm, tmp_path)
    agent = dns_agent(agent_factory, comm)
    queries = [q for t in QTYPES for q in (f"a.{ZONE}", t)] + [f"nx.{ZONE}", "A", f"x.{REFUSED_ZONE}", "A"]
    before = dns.stats()
    out = dns.run(dig, "@127.0.0.1", "+tries=1", "+time=5", *queries * N, timeout=120)
    assert out.returncode == 0, out.stderr
    statuses = Counter(line.split("status: ")[1].split(",")[0] for line in out.stdout.splitlines() if "status:" in line)
    assert statuses == {"NOERROR": 4 * N, "NXDOMAIN": N, "REFUSED": N}, out.stdout
    server_queries, server_rcodes = server_delta(before, dns.stats())
    seen = Seen(agent, comm)
    print(f"dig: agent {seen}; unbound {dict(server_queries)} {dict(server_rcodes)}")
    assert seen.queries == server_queries == {"A": 3 * N, "AAAA": N, "MX": N, "TXT": N}
    assert seen.responses == {
        **{(t, "No Error"): N for t in ("AAAA", "MX", "TXT")},
        ("A", "No Error"): N,
        ("A", "Non-Existent Domain"): N,
        ("A", "Query Refused"): N,
    }
    by_rcode = Counter()
    for (_, rcode), v in seen.responses.items():
        by_rcode[rcode] += v
    assert by_rcode == server_rcodes
    assert seen.latency_count == sum(seen.responses.values())
    assert seen.errors == 0


def test_glibc_getaddrinfo_a_and_aaaa_with_sendmmsg(dns: Resolver, agent_factory: Callable[..., Agent]) -> None:
    comm = unique("gai14")
    agent = dns_agent(agent_factory, comm)
    before = dns.stats()
    run_client(dns, comm, "gai", N, f"a.{ZONE}", f"nx.{ZONE}", f"x.{REFUSED_ZONE}")
    server_queries, server_rcodes = server_delta(before, dns.stats())
    seen = Seen(agent, comm)
    print(f"getaddrinfo: agent {seen}; unbound {dict(server_queries)} {dict(server_rcodes)}")
    assert server_queries["A"] >= 3 * N and server_queries["AAAA"] >= 3 * N  # glibc asks both, once or more
    assert seen.queries == server_queries
    by_rcode = Counter()
    for (_, rcode), v in seen.responses.items():
        by_rcode[rcode] += v
    assert by_rcode == server_rcodes
    assert seen.responses[("A", "No Error")] == seen.responses[("AAAA", "No Error")] == N
    assert seen.latency_count == sum(seen.responses.values())
    assert seen.errors == 0


def test_latency_sum_is_what_the_client_measured(dns: Resolver, agent_factory: Callable[..., Agent]) -> None:
    """Queries unbound forwards to a slower upstream, as a resolver's misses are."""
    comm = unique("lat14")
    agent = dns_agent(agent_factory, comm)
    n = 100
    client_ns = int(run_client(dns, comm, "timed", n))
    seen = Seen(agent, comm)
    print(f"latency: client measured {client_ns / 1e6:.3f} ms over {n} queries, agent {seen.latency_sum * 1e3:.3f} ms")
    assert seen.queries == {"A": n} and seen.responses == {("A", "No Error"): n}
    assert seen.latency_count == n
    assert abs(seen.latency_sum * 1e9 - client_ns) <= 0.1 * client_ns


def test_bad_input_is_never_a_wrong_count(dns: Resolver, agent_factory: Callable[..., Agent]) -> None:
    """Four malformed queries and a response read short of its header: none counted, each reported."""
    comm = unique("bad14")
    agent = dns_agent(agent_factory, comm)
    run_client(dns, comm, "bad", 1)
    seen = Seen(agent, comm)
    print(f"bad input: queries {dict(seen.queries)}, responses {dict(seen.responses)}, parse errors {seen.errors}")
    assert seen.queries == {"A": 1}  # the one good query
    assert not seen.responses and seen.latency_count == 0
    assert seen.errors == 5


def test_names_over_the_comm_cap_fold_into_other_with_totals_kept(
    dns: Resolver, agent_factory: Callable[..., Agent]
) -> None:
    """max_comm_series 2: the first process keeps its series, the next two count as comm="other"."""
    comms = [unique(f"cap{i}14") for i in range(3)]
    agent = agent_factory(
        {"integrations": {"ebpf": {"collect_dns": True, "process_filter": comms, "max_comm_series": 2}}}
    )
    n = 10
    for comm in comms:
        run_client(dns, comm, "timed", n)
        agent.scrape_text()  # names are admitted in the order the agent reads them
    first, other = Seen(agent, comms[0]), Seen(agent, "other")
    assert first.queries == {"A": n} and first.latency_count == n
    assert other.queries == {"A": 2 * n} and other.responses == {("A", "No Error"): 2 * n}
    assert other.latency_count == 2 * n
    assert agent.value("tfo_agent_dns_comm_folded_total") == 2
    assert not any(Seen(agent, c).queries for c in comms[1:])
