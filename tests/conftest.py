"""Shared test harness: run the real agent as a subprocess, scrape it, build C workloads.

Everything here is real: the agent loads its BPF objects into this kernel, and tests compare
what it exports with what they made happen.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
BPF_DIR = ROOT / "bpf"
SHARED = ROOT.parent / "shared"
BPFFS = Path("/sys/fs/bpf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Series:
    """Exposition text -> {(sample name, labels): value}."""
    out: Series = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


class Agent:
    """A running ``tfo-agent run`` with its own config, port and pin path."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.port = free_port()
        self.pin_path = str(BPFFS / f"tfo-test-{uuid.uuid4().hex[:12]}")
        base = {
            "integrations": {
                "ebpf": {
                    "programs_path": str(BPF_DIR),
                    "pin_path": self.pin_path,
                    "collect_network": False,
                    "collect_file_io": False,
                    "collect_tcp_events": False,
                }
            },
            "exporters": {"prometheus": {"listen_address": f"127.0.0.1:{self.port}"}},
        }
        self.config = deep_merge(base, config)
        self.pin_path = self.config["integrations"]["ebpf"]["pin_path"]
        self.config_path = workdir / f"agent-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / f"agent-{self.port}.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.ssl_context: Optional[ssl.SSLContext] = None  # set before start() for a TLS listener
        self.auth: Optional[tuple[str, str]] = None  # basic auth credentials sent by scrape/get

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}/metrics"

    def get(self, path: str, auth: Optional[tuple[str, str]] = None) -> tuple[int, bytes]:
        """GET a path of the listener -> (status, body); error statuses are returned, not raised."""
        req = urllib.request.Request(self.url.rsplit("/", 1)[0] + path)
        user, password = auth or self.auth or ("", "")
        if user:
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.ssl_context) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def write_config(self, config: dict[str, Any]) -> None:
        """Replace the config file with the running config deep-merged with ``config`` (for reloads)."""
        self.config = deep_merge(self.config, config)
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, timeout: float = 20.0) -> Agent:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}: {self.log()}")
            try:
                self.scrape_text()
                return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"agent did not serve metrics in {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def scrape_text(self) -> str:
        status, body = self.get("/metrics")
        if status != 200:
            raise OSError(f"GET /metrics answered {status}")
        return body.decode()

    def scrape(self) -> Series:
        return parse_metrics(self.scrape_text())

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 when the series does not exist yet)."""
        return self.scrape().get((name, frozenset(labels.items())), 0.0)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def remove_pins(self) -> None:
        shutil.rmtree(self.pin_path, ignore_errors=True)


@contextmanager
def running_agent(ebpf: Optional[dict[str, Any]], workdir: Path) -> Iterator[Optional[Agent]]:
    """An agent with these ``integrations.ebpf`` settings for the block, stopped and unpinned after;
    ``None`` runs no agent (the untraced baseline of a benchmark)."""
    if ebpf is None:
        yield None
        return
    agent = Agent({"integrations": {"ebpf": ebpf}}, workdir).start()
    try:
        yield agent
    finally:
        agent.stop()
        agent.remove_pins()


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """``agent_factory(config_overrides, start=True)`` -> a running Agent, stopped and unpinned after."""
    agents: list[Agent] = []

    def make(config: Optional[dict[str, Any]] = None, start: bool = True) -> Agent:
        a = Agent(config or {}, tmp_path)
        agents.append(a)
        return a.start() if start else a

    yield make
    for a in agents:
        a.stop()
        a.remove_pins()


@pytest.fixture(scope="session")
def build_c(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """``build_c(name, source)`` -> path of the compiled workload (gcc -O2)."""
    out = tmp_path_factory.mktemp("bin")

    def build(name: str, source: str) -> Path:
        src = out / f"{name}.c"
        exe = out / name
        src.write_text(source)
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True)
        return exe

    return build


def getppid_workload(name: str, n: int) -> None:
    """Run a process that names itself ``name`` (its comm, for process filters), makes ``n`` getppid calls, exits."""
    code = f"import os\nfrom agent import host\nhost.set_process_name({name!r})\nfor _ in range({n}): os.getppid()"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def skip_unless_built(cls: Any, attach_type: str) -> None:
    """Under $TFO_AGENT_FORCE_VARIANT (the suite's run on the compat build), skip an attach type of
    collector class ``cls`` that the forced build does not offer."""
    from agent.collectors import FORCE_VARIANT_ENV, forced_variant

    variant = forced_variant()
    if variant and not any(m.attach_type == attach_type and m.variant == variant for m in cls.modes):
        pytest.skip(f"{FORCE_VARIANT_ENV}={variant}: {cls.name} has no {attach_type} mode in that build")


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.1) -> bool:
    """Poll until ``predicate()`` is true; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() != 0:
        pytest.exit("the suite loads BPF programs and needs root", returncode=2)
