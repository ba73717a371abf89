"""/healthz and /readyz, and the listener's TLS and basic auth, on a real agent."""

from __future__ import annotations

import json
import platform
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
import trustme

from tests.conftest import BPF_DIR, Agent, wait_for

_ARCH = {"x86_64": "x86", "aarch64": "arm64"}


@pytest.fixture(scope="module")
def missing_tracepoint_programs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A programs_path whose syscalls.bpf.o loads fine but attaches to tracepoints this kernel lacks."""
    out = tmp_path_factory.mktemp("programs")
    src = (BPF_DIR / "syscalls.bpf.c").read_text()
    for real in ("tp_btf/sys_enter", "tp_btf/sys_exit"):
        src = src.replace(f'SEC("{real}")', 'SEC("tp_btf/tfo_no_such_tracepoint")')
    for real in ("raw_tp/sys_enter", "raw_tp/sys_exit"):
        src = src.replace(f'SEC("{real}")', 'SEC("raw_tp/tfo_no_such_tracepoint")')
    for real in ("tracepoint/raw_syscalls/sys_enter", "tracepoint/raw_syscalls/sys_exit"):
        src = src.replace(f'SEC("{real}")', 'SEC("tracepoint/tfo/no_such_tracepoint")')
    assert src.count("no_such_tracepoint") == 6
    (out / "syscalls.bpf.c").write_text(src)
    arch = _ARCH.get(platform.machine(), platform.machine())
    flags = ["-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{arch}", f"-I{BPF_DIR}"]
    subprocess.run(["clang", *flags, "-c", str(out / "syscalls.bpf.c"), "-o", str(out / "syscalls.bpf.o")], check=True)
    return out


def readyz(agent: Agent) -> tuple[int, dict[str, Any]]:
    status, body = agent.get("/readyz")
    return status, json.loads(body)


def test_ready_when_every_collector_attached(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory()
    assert agent.get("/healthz") == (200, b"ok\n")
    assert readyz(agent) == (200, {"status": "ready", "not_ready": {}})
    assert agent.value("tfo_agent_ready") == 1


def test_not_ready_when_tracepoint_missing(
    agent_factory: Callable[..., Agent], missing_tracepoint_programs: Path
) -> None:
    agent = agent_factory({"integrations": {"ebpf": {"programs_path": str(missing_tracepoint_programs)}}})
    status, body = readyz(agent)
    assert status == 503 and body["status"] == "not ready"
    reason = body["not_ready"]["syscalls"]
    assert "tfo_no_such_tracepoint" in reason and "No such file or directory" in reason
    assert agent.get("/healthz")[0] == 200  # alive, just not ready
    assert agent.value("tfo_agent_collector_up", collector="syscalls") == 0
    assert agent.value("tfo_agent_ready") == 0
    # Supervised: retried with backoff (1 s, 2 s, ...), still reported.
    assert wait_for(lambda: agent.value("tfo_agent_collector_restarts_total", collector="syscalls") >= 2, 10)
    assert readyz(agent)[0] == 503


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_agent(factory: Callable[..., Agent], ca: trustme.CA, tmp_path: Path) -> Agent:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "listener.crt", tmp_path / "listener.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    listener = {
        "tls": {"cert_file": str(cert_file), "key_file": str(key_file)},
        "basic_auth": {"username": "prom", "password": "s3cret pass"},
    }
    agent = factory({"exporters": {"prometheus": listener}}, start=False)
    agent.ssl_context = ssl.create_default_context()
    ca.configure_trust(agent.ssl_context)
    agent.auth = ("prom", "s3cret pass")
    return agent.start()


def test_tls_and_basic_auth(agent_factory: Callable[..., Agent], ca: trustme.CA, tmp_path: Path) -> None:
    agent = tls_agent(agent_factory, ca, tmp_path)
    assert agent.url.startswith("https://")
    assert agent.value("tfo_agent_collector_up", collector="syscalls") == 1
    assert agent.get("/readyz")[0] == 200
    for wrong in (("prom", "wrong"), ("other", "s3cret pass"), ("prom", "")):
        status, _ = agent.get("/metrics", auth=wrong)
        assert status == 401, wrong
    agent.auth = None
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(agent.url, timeout=5, context=agent.ssl_context)
    assert err.value.code == 401 and err.value.headers["WWW-Authenticate"] == 'Basic realm="tfo-agent"'
    assert agent.get("/readyz")[0] == 401
    assert agent.get("/healthz") == (200, b"ok\n")  # liveness needs no credentials
    # Plain HTTP is not served, and a client that does not trust the CA refuses the certificate.
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/healthz", timeout=5)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"https://127.0.0.1:{agent.port}/healthz", timeout=5)
