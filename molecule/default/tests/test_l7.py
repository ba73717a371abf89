"""collect_dns and collect_http on the molecule VMs (Debian 12 userland, Debian's kernels): they
attach there and count real requests exactly.

Beside the service, a second agent (own config, port and pin path; only the test's processes)
runs on each installed host while a workload in the VM makes requests: curl (as ``l7curl``)
against a Python HTTP/1.1 server, and DNS queries from Python to a Python responder on
127.0.0.1:53, both in one process (``l7py``, a name python3 gives itself with prctl: on 5.10 the
kernel leaves "python3"'s tail behind the new name's NUL, which the filter and the counters'
keys must ignore), so both directions of HTTP are counted. Then
``tfo-agent check`` with both collectors on must pass their self-tests, whose TLS exchange goes
through the OpenSSL uprobes. Outside molecule, ``pytest --hosts=local:// molecule/default/tests/test_l7.py``
runs it on this machine, with $TFO_L7_AGENT (the agent command) and $TFO_L7_PROGRAMS (the BPF objects)
pointing at a checkout.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import testinfra.utils.ansible_runner
from prometheus_client.parser import text_string_to_metric_families

if "MOLECULE_INVENTORY_FILE" in os.environ:
    testinfra_hosts = sorted(
        h
        for h in testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("all")
        if h != "tfo-bm-nobtf"  # refused by preflight: no agent there
    )

AGENT = os.environ.get("TFO_L7_AGENT", "tfo-agent")
PROGRAMS = os.environ.get("TFO_L7_PROGRAMS", "/var/lib/tfo-agent/ebpf")
PORT = 9499
PIN = "/sys/fs/bpf/tfo-l7-verify"
CONFIG = "/tmp/tfo-l7-verify.yaml"
N_OK, N_MISSING, N_A, N_NX = 5, 3, 4, 2
WORKLOAD = r"""
import http.server, json, os, socket, struct, subprocess, sys, threading
import ctypes
ctypes.CDLL(None).prctl(15, b"l7py", 0, 0, 0)  # PR_SET_NAME: the process's comm
n_ok, n_missing, n_a, n_nx = (int(v) for v in sys.argv[1:5])

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"ok\n" if self.path == "/ok" else b"missing\n"
        self.send_response(200 if self.path == "/ok" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=srv.serve_forever, daemon=True).start()
curl = "/tmp/l7curl"
if not os.path.exists(curl):
    os.symlink("/usr/bin/curl", curl)
base = f"http://127.0.0.1:{srv.server_address[1]}"
urls = [base + "/ok"] * n_ok + [base + "/missing"] * n_missing
args = [a for u in urls for a in ("-o", "/dev/null", u)]  # one connection, kept alive
out = subprocess.run([curl, "-s", "-w", "%{http_code}\n", *args], capture_output=True, text=True)
codes = out.stdout.split()

dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.bind(("127.0.0.1", 53))
def answer():
    for _ in range(n_a + n_nx):
        q, peer = dns.recvfrom(512)
        a = bytearray(q)
        a[2] |= 0x80
        a[3] = 0x80 | (3 if q[12:].startswith(b"\x02nx") else 0)
        dns.sendto(bytes(a), peer)
threading.Thread(target=answer, daemon=True).start()
def query(name, qtype, ident):
    qname = b"".join(bytes([len(p)]) + p for p in name.encode().split(b".")) + b"\0"
    return struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", qtype, 1)
rcodes = []
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
    c.settimeout(5)
    c.connect(("127.0.0.1", 53))
    for i in range(n_a + n_nx):
        c.send(query("ok.verify.tfo" if i < n_a else "nx.verify.tfo", 1 if i < n_a else 28, i))
        rcodes.append(c.recv(512)[3] & 0xF)
print(json.dumps({"codes": codes, "rcodes": rcodes}))
"""


def as_root(host: Any) -> Any:
    return contextlib.nullcontext() if host.user().uid == 0 else host.sudo()


def run(host: Any, cmd: str, *args: str) -> str:
    with as_root(host):
        out = host.run(cmd, *args)
    assert out.rc == 0, f"{cmd} {args}: {out.stdout} {out.stderr}"
    return str(out.stdout)


def series(host: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = run(host, f"curl -sf http://127.0.0.1:{PORT}/metrics")
    return {
        (s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


def collectors_up(host: Any) -> set[str]:
    """The collectors the verify agent reports attached (none while its listener is not up)."""
    if host.run("curl -sf http://127.0.0.1:%s/metrics", str(PORT)).rc != 0:
        return set()
    got = series(host)
    return {dict(k)["collector"] for (n, k), v in got.items() if n == "tfo_agent_collector_up" and v == 1}


def test_dns_and_http_count_real_requests(host: Any) -> None:
    config = {
        "integrations": {
            "ebpf": {
                "programs_path": PROGRAMS,
                "pin_path": PIN,
                "collect_syscalls": False,
                "collect_network": False,
                "collect_file_io": False,
                "collect_tcp_events": False,
                "collect_dns": True,
                "collect_http": True,
                "process_filter": ["l7py", "l7curl"],
                "exclude_processes": [],
            }
        },
        "exporters": {"prometheus": {"listen_address": f"127.0.0.1:{PORT}"}},
    }
    run(host, "printf %s %s > " + CONFIG, "%s", json.dumps(config))  # JSON is YAML
    run(host, f"sh -c '{AGENT} run -c {CONFIG} > /tmp/tfo-l7-verify.log 2>&1 & echo $! > /tmp/tfo-l7-verify.pid'")
    try:
        deadline = time.monotonic() + 120
        while not {"dns", "http"} <= collectors_up(host):  # both attached before the workload starts
            assert time.monotonic() < deadline, run(host, "cat /tmp/tfo-l7-verify.log")
            time.sleep(1)
        seen = json.loads(
            run(host, "python3 -c %s %s %s %s %s", WORKLOAD, str(N_OK), str(N_MISSING), str(N_A), str(N_NX))
        )
        assert seen == {"codes": ["200"] * N_OK + ["404"] * N_MISSING, "rcodes": [0] * N_A + [3] * N_NX}
        time.sleep(1)
        got = series(host)
        assert {"dns", "http"} <= collectors_up(host), run(host, "cat /tmp/tfo-l7-verify.log")
        context = run(host, "cat /tmp/tfo-l7-verify.log") + "".join(
            f"\n{n}{dict(k)} {v}" for (n, k), v in sorted(got.items(), key=str) if "_dns_" in n or "_http_" in n
        )

        def value(name: str, **labels: str) -> float:
            return got.get((name, frozenset(labels.items())), 0.0)

        for comm, direction in (("l7curl", "client"), ("l7py", "server")):
            assert (
                value("ebpf_http_requests_total", comm=comm, direction=direction, method="GET") == N_OK + N_MISSING
            ), context
            for status, n in (("200", N_OK), ("404", N_MISSING)):
                assert (
                    value("ebpf_http_responses_total", comm=comm, direction=direction, method="GET", status=status) == n
                ), context
            assert (
                value("ebpf_http_request_duration_seconds_count", comm=comm, direction=direction) == N_OK + N_MISSING
            ), context
        assert value("ebpf_dns_queries_total", comm="l7py", qtype="A") == N_A, context
        assert value("ebpf_dns_queries_total", comm="l7py", qtype="AAAA") == N_NX, context
        assert value("ebpf_dns_responses_total", comm="l7py", qtype="A", rcode="No Error") == N_A, context
        nx = value("ebpf_dns_responses_total", comm="l7py", qtype="AAAA", rcode="Non-Existent Domain")
        assert nx == N_NX, context
        assert value("ebpf_dns_latency_seconds_count", comm="l7py") == N_A + N_NX, context
        errors = {dict(k)["reason"]: v for (n, k), v in got.items() if n.endswith("_parse_errors_total")}
        assert set(errors.values()) == {0.0}, context
    finally:
        with as_root(host):
            host.run(f"sh -c 'kill $(cat /tmp/tfo-l7-verify.pid); sleep 2; rm -rf {PIN}'")


def test_check_passes_the_dns_and_http_self_tests(host: Any) -> None:
    """The self-tests include a TLS exchange: the OpenSSL uprobes count on this kernel too."""
    config = {
        "integrations": {
            "ebpf": {"programs_path": PROGRAMS, "pin_path": PIN, "collect_dns": True, "collect_http": True}
        }
    }
    run(host, "printf %s %s > " + CONFIG, "%s", json.dumps(config))
    with as_root(host):
        out = host.run(f"{AGENT} check -c {CONFIG} --json")
    report = json.loads(out.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("collector dns", "collector http"):
        assert checks[name]["ok"], checks[name]
        assert "counts a test workload" in checks[name]["found"]
