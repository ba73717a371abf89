"""HTTP collector against real nginx (static files, a 404, a POST target, gzip'ed chunked responses;
plaintext and TLS) driven by curl and Python's http.client over keep-alive and new connections.
Both sides must count exactly: nginx's access log for the server direction, what each client
printed for the client direction. TLS goes through the OpenSSL uprobes (nginx, curl and Python all
use the system's libssl.so.3): at the internal functions OpenSSL 3.0's exported ones call, and, in
the curl test, also at the exported functions themselves (the placement for other builds)."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from agent.collectors import FORCE_ATTACH_ENV
from agent.collectors.tls import EXPORTED, INTERNAL
from tests.conftest import ROOT, Agent, parse_metrics
from tests.l7servers import Nginx, env_with_path, named, nginx, settle, unique

BIG_BODY = 2 << 20  # curl sends "Expect: 100-continue" first: nginx answers 100, then 201

PY_CLIENT = r"""
import http.client, socket, ssl, sys, time
from agent import host
host.set_process_name(sys.argv[1])
port, tls_port, ca, mode = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
REQUESTS = [("GET", "/index.html", {}), ("GET", "/missing", {}), ("HEAD", "/index.html", {}),
            ("POST", "/post", {"body": b"x" * 5000}), ("GET", "/index.html", {"headers": {"Accept-Encoding": "gzip"}}),
            ("GET", "/big.txt", {})]
def connect(tls):
    if tls:
        return http.client.HTTPSConnection("127.0.0.1", tls_port, context=ssl.create_default_context(cafile=ca))
    return http.client.HTTPConnection("127.0.0.1", port)
def run(conn, method, path, kw):
    conn.request(method, path, **kw)
    r = conn.getresponse()
    r.read()
    print(method, r.status, flush=True)
if mode == "split":  # the request line in two writes
    for first in (b"GET /index.html HT", b"GE"):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(first)
            time.sleep(0.2)
            s.sendall(first[len(first):] + (b"TP/1.1" if first.endswith(b"HT") else b"T /index.html HTTP/1.1")
                      + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
            print("sent", s.recv(65536)[:12], flush=True)
elif mode == "garbage":
    import random
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(random.Random(14).randbytes(300))
        print("sent", s.recv(65536)[:12], flush=True)
else:
    for tls in (False, True):
        conn = connect(tls)  # keep-alive: one connection for the whole list
        for method, path, kw in REQUESTS:
            run(conn, method, path, kw)
        conn.close()
        for method, path, kw in REQUESTS[:3]:  # a new connection each
            conn = connect(tls)
            run(conn, method, path, kw)
            conn.close()
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Nginx]:
    with nginx(tmp_path, unique("ngx14")) as srv:
        yield srv


def http_agent(agent_factory: Callable[..., Agent], *comms: str) -> Agent:
    return agent_factory(
        {"integrations": {"ebpf": {"collect_http": True, "process_filter": list(comms), "max_comm_series": 10_000}}}
    )


class Seen:
    """The agent's HTTP series of one process and direction."""

    def __init__(self, agent: Agent, comm: str, direction: str) -> None:
        series = parse_metrics(agent.scrape_text())
        self.requests: Counter[str] = Counter()
        self.responses: Counter[tuple[str, str]] = Counter()
        self.durations = 0.0
        self.errors = {dict(k)["reason"]: v for (n, k), v in series.items() if n == "tfo_agent_http_parse_errors_total"}
        for (name, labels), v in series.items():
            d = dict(labels)
            if d.get("comm") != comm or d.get("direction") != direction:
                continue
            if name == "ebpf_http_requests_total":
                self.requests[d["method"]] += int(v)
            elif name == "ebpf_http_responses_total":
                self.responses[(d["method"], d["status"])] += int(v)
            elif name == "ebpf_http_request_duration_seconds_count":
                self.durations = v

    def check(self, truth: Counter[tuple[str, str]]) -> None:
        """Exactly the requests and responses of ``truth`` ((method, status) -> n), one duration each."""
        print(f"  agent {dict(self.responses)}; truth {dict(truth)}; parse errors {self.errors}")
        methods: Counter[str] = Counter()
        for (method, _), n in truth.items():
            methods[method] += n
        assert self.requests == methods
        assert self.responses == truth
        assert self.durations == sum(truth.values())


def curl_run(curl: str, nginx: Nginx, tls: bool, *requests: list[str]) -> Counter[tuple[str, str]]:
    """One curl process making ``requests`` (each a list of options ending with a path), reusing its
    connection; returns the (method, status) curl printed for each."""
    base = f"https://127.0.0.1:{nginx.tls_port}" if tls else f"http://127.0.0.1:{nginx.port}"
    cmd = [curl]
    for i, req in enumerate(requests):  # options hold until --next
        cmd += ["--next"] if i else []
        cmd += ["-s", "--http1.1", "--cacert", nginx.ca, "-o", "/dev/null", "-w", "%{method} %{response_code}\\n"]
        cmd += [*req[:-1], base + req[-1]]
    import subprocess

    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return Counter(tuple(line.split()) for line in out.splitlines())  # type: ignore[misc]


CURL_KEEPALIVE = (
    ["/index.html"],
    ["/missing"],
    ["-I", "/index.html"],
    ["-d", "hello", "/post"],
    ["--compressed", "/index.html"],  # gzip: a chunked response
    ["/big.txt"],
)


@pytest.mark.parametrize("probes", [INTERNAL, EXPORTED])
def test_curl_and_nginx_count_exactly_plaintext_and_tls(
    server: Nginx, agent_factory: Callable[..., Agent], tmp_path: Path, probes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if probes == EXPORTED:
        monkeypatch.setenv(FORCE_ATTACH_ENV, "tls=exported")
    curl_comm = unique("curl14")
    curl = named("curl", curl_comm, tmp_path)
    big = tmp_path / "big.body"
    big.write_bytes(b"x" * BIG_BODY)
    agent = http_agent(agent_factory, curl_comm, server.comm)
    libraries = {
        dict(k)["probes"]: v
        for (n, k), v in parse_metrics(agent.scrape_text()).items()
        if n == "tfo_agent_http_tls_libraries"
    }
    assert libraries[probes] >= 1 and sum(libraries.values()) == libraries[probes], libraries
    truth: Counter[tuple[str, str]] = Counter()
    for tls in (False, True):
        truth += curl_run(curl, server, tls, *CURL_KEEPALIVE, ["--data-binary", f"@{big}", "/post"])
        for req in CURL_KEEPALIVE[:3]:  # a new connection (and process) each
            truth += curl_run(curl, server, tls, req)
    log = server.wait_logged(sum(truth.values()))
    settle()
    print(f"curl printed {dict(truth)}; nginx logged {dict(log)}")
    assert log == truth
    Seen(agent, curl_comm, "client").check(truth)
    Seen(agent, server.comm, "server").check(log)
    assert Seen(agent, curl_comm, "client").errors == dict.fromkeys(
        ("truncated", "unmatched_response", "unanswered_request"), 0
    )


def test_python_http_client_counts_exactly(server: Nginx, agent_factory: Callable[..., Agent]) -> None:
    comm = unique("pyc14")
    agent = http_agent(agent_factory, comm, server.comm)
    out = run_py(comm, server, "requests")
    truth = Counter(tuple(line.split()) for line in out.splitlines())
    log = server.wait_logged(sum(truth.values()))
    settle()
    print(f"http.client saw {dict(truth)}; nginx logged {dict(log)}")
    assert log == truth
    Seen(agent, comm, "client").check(truth)  # type: ignore[arg-type]
    Seen(agent, server.comm, "server").check(log)
    assert set(Seen(agent, comm, "client").errors.values()) == {0}


def run_py(comm: str, server: Nginx, mode: str) -> str:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", PY_CLIENT, comm, str(server.port), str(server.tls_port), server.ca, mode],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env_with_path(),
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("mode", ["split", "garbage"])
def test_bad_input_is_never_a_wrong_count(server: Nginx, agent_factory: Callable[..., Agent], mode: str) -> None:
    """A request line split over two writes (after "GET /index.html HT", and inside the method after
    "GE"), and random bytes: on each side, what is counted is right and what is not is reported."""
    comm = unique("bad14")
    agent = http_agent(agent_factory, comm, server.comm)
    out = run_py(comm, server, mode)
    n = out.count("sent")
    log = server.wait_logged(n)
    settle()
    print(f"{mode}: client read {out.split()}; nginx logged {dict(log)}")
    client, nginx_side = Seen(agent, comm, "client"), Seen(agent, server.comm, "server")
    errors = sum(client.errors.values())
    print(f"  client {dict(client.responses)}, server {dict(nginx_side.responses)}, parse errors {client.errors}")
    for seen in (client, nginx_side):
        counted = sum(seen.responses.values())
        assert set(seen.responses) <= set(log)  # nothing counted that did not happen
        assert all(seen.responses[k] <= v for k, v in log.items())
        assert sum(seen.requests.values()) == counted == seen.durations
    missed = 2 * sum(log.values()) - sum(client.responses.values()) - sum(nginx_side.responses.values())
    assert errors >= missed  # each request one side missed is reported
    if mode == "split":
        assert client.responses[("GET", "200")] >= 1 and nginx_side.responses[("GET", "200")] >= 1
