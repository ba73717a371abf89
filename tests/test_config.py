"""Configuration: seed defaults, env expansion, and one clear line with exit 2 for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import config

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=ROOT)


def test_empty_file_is_the_seed_defaults() -> None:
    cfg = config.parse("", "empty.yaml")
    e = cfg.ebpf
    assert (e.enabled, e.programs_path, e.pin_path, e.scrape_interval) == (
        True,
        "/var/lib/tfo-agent/ebpf",
        "/sys/fs/bpf/tfo-agent",
        15.0,
    )
    assert (
        e.collect_syscalls,
        e.collect_network,
        e.collect_file_io,
        e.collect_scheduler,
        e.collect_memory,
        e.collect_tcp_events,
        e.collect_dns,
        e.collect_http,
    ) == (True, True, True, False, False, True, False, False)
    assert e.exclude_processes == ("tfo-agent", "systemd") and e.process_filter == ()
    assert (e.sample_rate, e.ring_buffer_size, e.perf_buffer_size, e.max_stack_depth) == (100, 65536, 8192, 20)
    assert e.btf_custom_path is None
    assert (e.labels, e.container_runtime_endpoint, e.container_labels) == (("comm",), "", False)
    c = e.cilium
    assert c.hubble_address == "hubble-relay.kube-system.svc:4245" and c.hubble_tls_enabled
    assert c.exclude_namespaces == ("kube-system", "cilium") and c.aggregation_window == 10.0
    assert (c.flow_buffer_size, c.flow_sample_rate, c.max_flows_per_second) == (4096, 1, 10000)
    assert cfg.exporters.prometheus.listen_address == "0.0.0.0:9435"


def test_env_expansion_and_durations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFO_PIN", "/sys/fs/bpf/x")
    text = (
        "integrations:\n  ebpf:\n    pin_path: ${TFO_PIN}\n    programs_path: ${TFO_UNSET:-/opt/bpf}\n"
        "    scrape_interval: 1500ms\n    cilium:\n      aggregation_window: 2m\n"
    )
    cfg = config.parse(text)
    assert (cfg.ebpf.pin_path, cfg.ebpf.programs_path, cfg.ebpf.scrape_interval) == ("/sys/fs/bpf/x", "/opt/bpf", 1.5)
    assert cfg.ebpf.cilium.aggregation_window == 120.0


E = "integrations:\n  ebpf:\n"
BAD = [
    (
        "unknown-key",
        E + "    sample_rat: 50\n",
        ":3: integrations.ebpf.sample_rat: expected 'sample_rate' (did you mean it?)",
    ),
    ("unknown-top", "integration: {}\n", "integration: expected 'integrations' (did you mean it?)"),
    ("unknown-no-hint", E + "    frobnicate: 1\n", "expected one of btf_path, cilium"),
    (
        "rate-high",
        E + "    sample_rate: 101\n",
        "integrations.ebpf.sample_rate: expected an integer 1 to 100, found 101",
    ),
    ("rate-zero", E + "    sample_rate: 0\n", "expected an integer 1 to 100, found 0"),
    ("rate-type", E + "    sample_rate: half\n", "sample_rate: expected an integer, found half"),
    ("ringbuf", E + "    ring_buffer_size: 100000\n", "ring_buffer_size: expected a power of two"),
    ("perf-negative", E + "    perf_buffer_size: -1\n", "perf_buffer_size: expected an integer at least 1, found -1"),
    ("duration", E + "    scrape_interval: 15 seconds\n", "scrape_interval: expected a duration like 500ms, 15s"),
    ("duration-zero", E + "    scrape_interval: 0s\n", "scrape_interval: expected a value greater than 0"),
    ("bool", E + "    collect_syscalls: yes please\n", "collect_syscalls: expected true or false, found yes please"),
    ("list", E + "    process_filter: nginx\n", "process_filter: expected a list of strings, found nginx"),
    (
        "address",
        "exporters:\n  prometheus:\n    listen_address: localhost\n",
        "exporters.prometheus.listen_address: expected an address host:port",
    ),
    (
        "port",
        "exporters:\n  prometheus:\n    listen_address: 0.0.0.0:70000\n",
        "with a port 1-65535, found '0.0.0.0:70000'",
    ),
    (
        "choice",
        "exporters:\n  otlp:\n    protocol: udp\n",
        "exporters.otlp.protocol: expected one of grpc, http/protobuf",
    ),
    (
        "tls-missing",
        E + "    cilium:\n      enabled: true\n      hubble_tls_ca: /nonexistent/ca.crt\n",
        ":5: integrations.ebpf.cilium.hubble_tls_ca: expected a readable file, found '/nonexistent/ca.crt' (missing)",
    ),
    (
        "btf-missing",
        E + "    btf_path: /nonexistent/vmlinux.btf\n",
        "integrations.ebpf.btf_path: expected a readable file",
    ),
    (
        "env-unset",
        E + "    pin_path: ${TFO_SURELY_UNSET_VAR}\n",
        "expected environment variable TFO_SURELY_UNSET_VAR to be set",
    ),
    (
        "labels-unknown",
        E + "    labels: [comm, node]\n",
        ":3: integrations.ebpf.labels: expected labels drawn from comm, container, pod, namespace (not 'node')",
    ),
    ("labels-empty", E + "    labels: []\n", "integrations.ebpf.labels: expected a non-empty list of distinct labels"),
    ("labels-twice", E + "    labels: [pod, pod]\n", "integrations.ebpf.labels: expected a non-empty list of distinct"),
    ("labels-scalar", E + "    labels: pod\n", "integrations.ebpf.labels: expected a list of strings, found pod"),
    (
        "runtime-relative",
        E + "    container_runtime_endpoint: run/containerd/containerd.sock\n",
        'integrations.ebpf.container_runtime_endpoint: expected "" (auto-detect) or an absolute socket path',
    ),
    (
        "runtime-url",
        E + "    container_runtime_endpoint: tcp://10.0.0.1:1234\n",
        'container_runtime_endpoint: expected "" (auto-detect) or an absolute socket path or unix:///path',
    ),
    ("not-mapping", "integrations: [1, 2]\n", ":1: integrations: expected a mapping, found a list"),
    ("yaml", "integrations:\n  ebpf: [\n", "not valid YAML"),
    (
        "duplicate",
        E + "    sample_rate: 10\n    sample_rate: 20\n",
        ":4: integrations.ebpf.sample_rate: expected each key once",
    ),
]


@pytest.mark.parametrize(("text", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for args in (("config", "validate", str(path)), ("run", "-c", str(path)), ("check", "-c", str(path))):
        out = cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stdout == ""
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
        assert str(path) in lines[0] and fragment in lines[0], lines[0]


def test_missing_config_file_and_bad_flag() -> None:
    out = cli("config", "validate", "/nonexistent/tfo.yaml")
    assert (
        out.returncode == 2
        and out.stderr.strip() == "tfo-agent: config error: /nonexistent/tfo.yaml: config file not found"
    )
    out = cli("run", "--bogus")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "--bogus" in out.stderr


def test_check_passes_here_and_reports_unavailable_features(tmp_path: Path) -> None:
    """Every collect_* switch is in this build: the feature made unavailable here is Hubble, whose
    gRPC import fails (a grpc package that raises shadows the real one)."""
    path = tmp_path / "ok.yaml"
    path.write_text(
        f"integrations:\n  ebpf:\n    programs_path: {ROOT / 'bpf'}\n    collect_dns: true\n    collect_http: true\n"
        "    cilium: {enabled: true, hubble_tls_enabled: false}\n"
    )
    shadow = tmp_path / "shadow" / "grpc"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    out = subprocess.run(
        [sys.executable, "-m", "agent", "check", "-c", str(path)], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[OK  ] collector syscalls: attaches via tp_btf" in out.stdout
    for name in ("dns", "http"):
        assert f"[OK  ] collector {name}: attaches via tp_btf" in out.stdout
    assert "[WARN] cilium: enabled but not available" in out.stdout


def test_check_fails_with_remedy_when_a_collector_cannot_load(tmp_path: Path) -> None:
    path = tmp_path / "nobpf.yaml"
    path.write_text(f"integrations:\n  ebpf:\n    programs_path: {tmp_path}\n")
    out = cli("check", "-c", str(path), "--json")
    assert out.returncode == 1
    report = json.loads(out.stdout)
    failing = {c["name"]: c for c in report["checks"] if not c["ok"]}
    assert "collector syscalls" in failing
    assert all(name.startswith("collector ") for name in failing), failing
    assert "not found" in failing["collector syscalls"]["found"]
    assert "kernel version compatibility" in failing["collector syscalls"]["remedy"]


def test_check_shows_which_node_name_hubble_uses(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        f"integrations:\n  ebpf:\n    programs_path: {ROOT / 'bpf'}\n"
        "    cilium: {enabled: true, hubble_tls_enabled: false}\n"
    )
    env = {**os.environ, "NODE_NAME": "worker-7"}
    out = subprocess.run(
        [sys.executable, "-m", "agent", "check", "-c", str(path)], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert (
        "[OK  ] hubble flows: hubble-relay.kube-system.svc:4245, node scope as node 'worker-7' (from env)" in out.stdout
    )
