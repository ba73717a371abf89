"""The dashboards and rules in monitoring/, proven against a real Prometheus (Debian's) scraping a real
agent: the default collectors plus scheduler, memory, DNS and HTTP, and Hubble from the demo replay
relay, while this test makes syscalls, files, TCP connections, DNS queries and HTTP requests. Every
query is taken from the JSON and YAML themselves, so a panel or rule added later is covered too."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.collectors import FORCE_ATTACH_ENV
from tests.conftest import ROOT, Agent, free_port, wait_for

MONITORING = ROOT / "monitoring"
DASHBOARDS = sorted((MONITORING / "dashboards").glob("*.json"))
RULES = MONITORING / "rules" / "tfo-agent.rules.yml"
RULE_TESTS = MONITORING / "rules" / "tfo-agent.rules.test.yml"
# Panels whose query may return nothing, and why: the condition they show did not happen here.
MAY_BE_EMPTY = {
    "Collector failures": "every collector runs",
    "OOM kills by victim (last hour)": "no OOM kill happens during the test",
}
# Grafana's variables, as the test substitutes them.
VARIABLES = {"$__rate_interval": "30s", "$instance": ".*", "$node": ".*", "$job": ".*"}
COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)\s*([0-9.eE+-]+)\s*$")
FUNCTIONS_AND_KEYWORDS = {
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "rate", "increase", "irate", "histogram_quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "vector", "absent", "label_values", "e", "inf", "nan",
}  # fmt: skip


def panels() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            if panel["type"] != "row":
                yield path.name, panel


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) of every target."""
    return [(d, p["title"], t["expr"]) for d, p in panels() for t in p["targets"]]


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def substitute(expr: str) -> str:
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label matchers, groupings, strings, ranges stripped)."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[m.end() :].lstrip()
        if m.group() not in FUNCTIONS_AND_KEYWORDS and not rest.startswith("("):
            names.add(m.group())
    return names


# ------------------------------------------------------------------ the files themselves


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_valid_with_unique_ids_and_variables(path: Path) -> None:
    board = json.loads(path.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"instance", "node"} <= set(variables)
    for _, p in panels():
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]


def test_promtool_check_rules_is_clean() -> None:
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_promtool_unit_tests_fire_and_resolve_every_alert() -> None:
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {r["alert"] for r in rules() if "alert" in r}
    out = subprocess.run(
        ["promtool", "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_every_alert_has_a_runbook_and_the_bool_form() -> None:
    for r in (r for r in rules() if "alert" in r):
        assert len(r["annotations"].get("runbook", "")) > 40, r["alert"]
        assert COMPARISON.search(r["expr"]), f"{r['alert']}: expression must end in <comparison> <number>"


# ------------------------------------------------------------------ a real Prometheus and agent


class Prometheus:
    """Debian's prometheus on a free loopback port, with its own data directory."""

    def __init__(self, workdir: Path, targets: list[str], rule_file: Path) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rule_file)],
            "scrape_configs": [{"job_name": "tfo-agent", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        assert wait_for(self.ready, timeout=60), (workdir / "prometheus.log").read_text()[-2000:]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=20) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr}: {exc.read().decode()}") from exc
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def firing(self, alert: str) -> list[dict[str, Any]]:
        return self.query(f'ALERTS{{alertname="{alert}", alertstate="firing"}}')

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def dns_server(sock: socket.socket) -> None:
    """Answer DNS queries on ``sock``: names starting with "nx" with NXDOMAIN, the rest with no answer."""
    while True:
        try:
            query, peer = sock.recvfrom(512)
        except OSError:
            return
        rcode = 3 if query[13:15] == b"nx" else 0
        sock.sendto(query[:2] + bytes([0x81, 0x80 | rcode]) + query[4:6] + b"\0" * 6 + query[12:], peer)


def dns_query(name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return b"\x12\x34\x01\x00\x00\x01" + b"\0" * 6 + labels + b"\0\x00\x01\x00\x01"


class Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 404 if self.path.startswith("/missing") else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *_: Any) -> None:
        pass


def workload(seconds: float) -> None:
    """Syscalls (with errors), file I/O, loopback TCP connections, DNS queries to a responder on
    127.0.0.1:53 and HTTP requests to a server in this process (both directions are seen)."""
    deadline = time.monotonic() + seconds
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind(("127.0.0.1", 53))
    threading.Thread(target=dns_server, args=(dns,), daemon=True).start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.connect(("127.0.0.1", 53))
    with socket.create_server(("127.0.0.1", 0)) as srv:
        while time.monotonic() < deadline:
            for name in ("www.example.test", "nx.example.test"):
                client.send(dns_query(name))
                client.recv(512)
            for path in ("/", "/missing"):
                conn = http.client.HTTPConnection(*web.server_address, timeout=5)
                conn.request("GET", path)
                conn.getresponse().read()
                conn.close()
            with contextlib.suppress(OSError):
                open("/nonexistent/tfo-monitoring")  # noqa: SIM115 (an ENOENT on purpose)
            with socket.create_connection(srv.getsockname()) as c:
                conn, _ = srv.accept()
                c.sendall(b"x" * 4096)
                conn.recv(4096)
                conn.close()
            Path("/tmp/tfo-monitoring-file").write_bytes(b"y" * 8192)
            time.sleep(0.05)
    client.close()
    dns.close()
    web.shutdown()
    web.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Relay, agent (defaults + scheduler + memory + DNS + HTTP + Hubble), a second agent whose memory collector
    cannot attach (forced to a mode it lacks), and Prometheus scraping both, with the shipped rules
    copied with every `for:` set to 0s so that the alerts fire within the test."""
    work = tmp_path_factory.mktemp("monitoring")
    relay_port = free_port()
    relay = subprocess.Popen(
        [sys.executable, "-m", "agent", "hubble", "replay", "--demo", "--listen", f"127.0.0.1:{relay_port}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    hubble = {"enabled": True, "hubble_address": f"127.0.0.1:{relay_port}", "hubble_tls_enabled": False}
    hubble["flow_scope"] = "cluster"
    collectors = ("syscalls", "network", "file_io", "tcp_events", "scheduler", "memory", "dns", "http")
    ebpf = {f"collect_{c}": True for c in collectors}
    agent = Agent({"integrations": {"ebpf": {**ebpf, "cilium": hubble}}}, work).start()
    broken = Agent({"integrations": {"ebpf": {"collect_memory": True}}}, work)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(FORCE_ATTACH_ENV, "memory=no_such_mode")
        broken.start()
    rules_copy = work / "rules.yml"
    rules_copy.write_text(re.sub(r"(?m)^(\s+)for: \S+$", r"\1for: 0s", RULES.read_text()))
    prom = Prometheus(work, [f"127.0.0.1:{agent.port}", f"127.0.0.1:{broken.port}"], rules_copy)
    try:
        workload(20)
        yield {"prom": prom, "agent": agent, "relay": relay}
    finally:
        prom.stop()
        for a in (agent, broken):
            a.stop()
            a.remove_pins()
        relay.kill()
        relay.wait()
        shutil.rmtree(work / "data", ignore_errors=True)


def exposition_names(text: str) -> set[str]:
    """Sample names, and every name a family declares (a family with no series yet, e.g. failures)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name + s for s in ("_bucket", "_count", "_sum")} if kind == "histogram" else {name}
        elif line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


def test_every_metric_a_query_uses_is_exposed(stack: dict[str, Any]) -> None:
    exposed = exposition_names(stack["agent"].scrape_text())
    recorded = {r["record"] for r in rules() if "record" in r}
    exprs = [e for _, _, e in panel_queries()] + [r["expr"] for r in rules()]
    for expr in exprs:
        for name in metric_names(expr) - recorded - {"up", "ALERTS"}:
            assert name in exposed, f"{name} (in {expr}) is not in the agent's exposition"
        for pattern in re.findall(r'__name__=~"([^"]+)"', expr):
            assert any(re.fullmatch(pattern, n) for n in exposed), f"no exposed metric matches {pattern}"


def test_every_panel_query_returns_data(stack: dict[str, Any]) -> None:
    prom: Prometheus = stack["prom"]
    empty = []
    for dashboard, title, expr in panel_queries():
        if not prom.query(substitute(expr)) and title not in MAY_BE_EMPTY:
            empty.append(f"{dashboard} / {title}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_every_rule_runs_and_its_signal_has_data(stack: dict[str, Any]) -> None:
    """Recording rules return data; an alert's expression runs, and with `bool` (its signal whatever
    the threshold) returns data, so it watches series that exist."""
    prom: Prometheus = stack["prom"]
    for r in rules():
        if "record" in r:
            assert prom.query(r["record"]), f"recording rule {r['record']} has no data"
            continue
        prom.query(r["expr"])
        signal = COMPARISON.sub(lambda m: f"{m.group(1)} bool {m.group(2)}", r["expr"])
        assert prom.query(signal), f"{r['alert']}: {signal} returns no data"


def test_collector_down_and_hubble_disconnected_fire(stack: dict[str, Any]) -> None:
    prom: Prometheus = stack["prom"]
    assert wait_for(lambda: bool(prom.firing("TfoAgentCollectorDown")), timeout=30)
    assert {a["metric"]["collector"] for a in prom.firing("TfoAgentCollectorDown")} == {"memory"}
    assert not prom.firing("TfoAgentHubbleDisconnected")
    stack["relay"].kill()
    stack["relay"].wait()
    assert wait_for(lambda: bool(prom.firing("TfoAgentHubbleDisconnected")), timeout=60)
