"""The Hubble benchmark's whole-agent runs: ``tfo-agent run`` fed by the grpc-go feeder, CPU from /proc.

``AgentProcess`` starts ``tfo-agent run`` with Hubble only (cluster scope, all metric groups, no
eBPF collectors, Prometheus on a free loopback port) against a feeder. ``flow_run`` measures its
CPU from the first flow to the last, ``scrape_cost`` what a /metrics scrape costs it, ``soak`` its
CPU and RSS at a fixed rate with periodic scrapes. ``varied_flows`` gives the demo flows more label
variety (a namespace suffix per tenant), so the agent exports thousands of series as a busy
cluster's does.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.hubble.demo import demo_flows
from agent.hubble.proto import observer_pb2
from bench.grpc_feeder import GoFeeder

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
IDLE = 0.3  # seconds with neither CPU time nor run-queue wait moving: the agent has handled every flow


def varied_flows(count: int, tenants: int, seed: int = 7) -> list[observer_pb2.GetFlowsResponse]:
    """``count`` demo flows whose namespaces get one of ``tenants`` suffixes per flow (kube-system kept)."""
    msgs = demo_flows(count)[:count]
    rnd = random.Random(seed)
    for m in msgs:
        if tenants > 1 and m.HasField("flow"):
            t = rnd.randrange(tenants)
            for ep in (m.flow.source, m.flow.destination):
                if ep.namespace and ep.namespace != "kube-system":
                    ep.namespace = f"{ep.namespace}-{t}"
    return msgs


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process in seconds, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process."""
    return sum(cpu_times(pid))


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_queue_wait(pid: int) -> float:
    """Seconds the threads of ``pid`` have spent runnable but waiting for a CPU (/proc/.../schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProcess:
    """``tfo-agent run`` with Hubble only, reading from ``address``; a context manager.

    ``cilium`` overrides the integration's settings (``max_flows_per_second`` etc.); everything
    else is the default configuration.
    """

    def __init__(self, address: str, **cilium: Any) -> None:
        self.port = free_port()
        settings = {
            "enabled": True,
            "hubble_address": address,
            "hubble_tls_enabled": False,
            "flow_scope": "cluster",
            "exclude_namespaces": [],
            "kubernetes_enabled": False,
            **cilium,
        }
        config = {
            "integrations": {"ebpf": {"enabled": False, "cilium": settings}},
            "exporters": {"prometheus": {"listen_address": f"127.0.0.1:{self.port}"}},
            "logging": {"level": "warning"},
        }
        self._dir = tempfile.TemporaryDirectory(prefix="hubble-bench-")
        self.config = Path(self._dir.name, "agent.yaml")
        self.config.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> AgentProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(self.config)], cwd=ROOT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.scrape()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("tfo-agent run did not start") from None
                time.sleep(0.1)

    def __exit__(self, *_: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self._dir.cleanup()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def scrape(self) -> bytes:
        """One GET /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as resp:
            return resp.read()

    def metric(self, name: str) -> float:
        """An unlabelled sample's value from a scrape (0 when absent)."""
        for line in self.scrape().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def wait_idle(self) -> tuple[float, tuple[float, float]]:
        """Until neither CPU time nor run-queue wait has moved for IDLE seconds: (time CPU last moved,
        (utime, stime) then). A starved agent (waiting for a CPU) is not mistaken for an idle one."""
        cpu, wait = cpu_times(self.pid), run_queue_wait(self.pid)
        moved = still = time.monotonic()
        while time.monotonic() - still < IDLE:
            time.sleep(0.01)
            now_cpu, now_wait = cpu_times(self.pid), run_queue_wait(self.pid)
            if now_cpu != cpu:
                moved = still = time.monotonic()
            elif now_wait != wait:
                still = time.monotonic()
            cpu, wait = now_cpu, now_wait
        return moved, cpu


@dataclass
class FlowRun:
    """One whole-agent run: CPU from the first flow to the last, and how fast the flows drained."""

    cpu_us: float  # per flow
    sys_us: float  # per flow, of it system time
    rate: float  # flows/s from the first flow to the last
    processed: float  # tfo_agent_hubble_flows_processed_total at the end
    waiting: float  # share of the run the agent's threads were runnable but had no CPU (load)


def flow_run(feeder: GoFeeder, flows: int, **cilium: Any) -> FlowRun:
    """Start an agent, scrape it once, let ``feeder`` send its ``flows`` flows, measure until idle."""
    marks: dict[str, Any] = {}
    feeder.gate.clear()
    sent = feeder.sent
    with AgentProcess(feeder.address, **cilium) as agent:
        agent.scrape()  # the start scrape, before the first flow
        feeder.on_first_flow = lambda: marks.update(
            t0=time.monotonic(), cpu0=cpu_times(agent.pid), wait0=run_queue_wait(agent.pid)
        )
        feeder.gate.set()
        deadline = time.monotonic() + 600
        while feeder.sent - sent < flows or "t0" not in marks:
            if time.monotonic() > deadline:
                raise SystemExit("the feeder did not get its flows out")
            time.sleep(0.01)
        t1, (u1, s1) = agent.wait_idle()
        waited = run_queue_wait(agent.pid) - marks["wait0"]
        processed = agent.metric("tfo_agent_hubble_flows_processed_total")  # the end scrape
    feeder.on_first_flow = None
    (u0, s0), wall = marks["cpu0"], t1 - marks["t0"]
    return FlowRun((u1 - u0 + s1 - s0) / flows * 1e6, (s1 - s0) / flows * 1e6, flows / wall, processed, waited / wall)


@dataclass
class ScrapeCost:
    """What scraping an agent costs it: CPU per scrape (ms) and GET latency (ms)."""

    lines: int
    size: int
    fresh_cpu_ms: float  # a scrape after a window with new flows: the Hubble text is rendered
    fresh_latency_ms: list[float]
    kept_cpu_ms: float  # a scrape in the same window: the kept text is served
    kept_latency_ms: list[float]


def scrape_cost(feeder: GoFeeder, flows: int, rounds: int, kept: int, window: float = 1.0) -> ScrapeCost:
    """An agent (``aggregation_window`` = ``window``) gets ``flows`` flows at full speed, then per round
    a trickle of new ones (a window's worth), a pause (the window is published, the next ones are
    idle), a scrape (renders) and ``kept`` more (served the kept text). CPU in clock ticks, summed."""
    feeder.rate, fresh_cpu, kept_cpu = 0.0, 0.0, 0.0
    fresh_latency: list[float] = []
    kept_latency: list[float] = []
    body = b""

    def one() -> tuple[float, float]:
        nonlocal body
        c0, t0 = cpu_seconds(agent.pid), time.monotonic()
        body = agent.scrape()
        t1 = time.monotonic()
        time.sleep(0.05)  # the handler thread finishes after the client has the body
        return cpu_seconds(agent.pid) - c0, (t1 - t0) * 1e3

    with AgentProcess(feeder.address, aggregation_window=f"{window * 1000:.0f}ms") as agent:
        while feeder.sent < flows:
            time.sleep(0.01)
        feeder.rate = 2000.0
        while agent.metric("tfo_agent_hubble_flows_processed_total") < flows:
            time.sleep(0.5)
        for _ in range(rounds):
            feeder.flowing.set()
            time.sleep(window * 1.5)
            feeder.flowing.clear()
            time.sleep(window * 2.5)
            cpu, latency = one()
            fresh_cpu += cpu
            fresh_latency.append(latency)
            for _ in range(kept):
                cpu, latency = one()
                kept_cpu += cpu
                kept_latency.append(latency)
    feeder.flowing.set()
    return ScrapeCost(
        body.count(b"\n"), len(body), fresh_cpu * 1e3 / rounds, fresh_latency, kept_cpu * 1e3 / (rounds * kept),
        kept_latency,
    )  # fmt: skip


def soak(
    feeder: GoFeeder, seconds: float, rate: float, scrape_every: float, report_every: float
) -> tuple[list[tuple[float, float, float, float, float]], list[float]]:
    """An agent at defaults (cluster scope) fed ``rate`` flows/s for ``seconds``, scraped every
    ``scrape_every`` s: (elapsed s, CPU share of one core, flows/s sent, RSS MiB, share of the time
    its threads waited for a CPU) per ``report_every`` s, and the scrapes' latencies (ms)."""
    stop = threading.Event()
    latencies: list[float] = []
    feeder.rate = rate
    samples = []
    with AgentProcess(feeder.address) as agent:

        def scraper() -> None:
            while not stop.wait(scrape_every):
                t0 = time.monotonic()
                agent.scrape()
                latencies.append((time.monotonic() - t0) * 1e3)

        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
        start = last_t = time.monotonic()
        last_cpu, last_sent, last_wait = cpu_seconds(agent.pid), feeder.sent, run_queue_wait(agent.pid)
        while len(samples) * report_every < seconds - 1e-6:
            time.sleep(max(0.0, start + (len(samples) + 1) * report_every - time.monotonic()))
            now, cpu, n, wait = time.monotonic(), cpu_seconds(agent.pid), feeder.sent, run_queue_wait(agent.pid)
            dt = now - last_t
            share, rate_out, runq = (cpu - last_cpu) / dt, (n - last_sent) / dt, (wait - last_wait) / dt
            samples.append((now - start, share, rate_out, rss_mib(agent.pid), runq))
            last_t, last_cpu, last_sent, last_wait = now, cpu, n, wait
        stop.set()
        thread.join()
    return samples, latencies


def median(values: list[float]) -> float:
    """The median (0 for no values)."""
    return statistics.median(values) if values else 0.0
