"""Verify the fleet rollout on the molecule VMs (pytest-testinfra over molecule's inventory).

Hosts: tfo-k8s-node-1 (k8s_nodes), tfo-bm-1, tfo-bm-510, tfo-bm-612 (bare_metal; Debian 12's
6.1 kernel, Debian 11's 5.10 and Debian 13's 6.12 on the same userland) and tfo-bm-nobtf
(bare_metal, whose btf_path points at a missing file, so preflight must refuse it and leave it
untouched).

On every installed host the agent's counters are compared with workloads of known size and the
kernel's own accounting (``workload.py``): TCP and UDP bytes and packets over loopback, getppid
calls, file bytes written and read. The figures are written to
``$MOLECULE_EPHEMERAL_DIRECTORY/accuracy.jsonl`` and printed at the end of the run (conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import testinfra.utils.ansible_runner
import yaml

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
REFUSED = "tfo-bm-nobtf"
INSTALLED = sorted(h for h in RUNNER.get_hosts("all") if h != REFUSED)
REPO = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
ROLE_DEFAULTS: dict[str, Any] = yaml.safe_load((REPO / "roles/tfo_agent/defaults/main.yml").read_text())
CONFIG = "/etc/tfo-agent/config.yaml"
SAMPLE = re.compile(r"^ebpf_syscall_count_total(\{[^}]*\})?\s+([0-9.eE+-]+)", re.MULTILINE)

ACCURACY_LOG = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/tmp")) / "accuracy.jsonl"
WORKLOAD = Path(__file__).with_name("workload.py")
SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)", re.MULTILINE)
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
SSH_OPTS += ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
# Workload sizes: large enough that the host's background (sshd carrying the workload's own
# session, journald, the scrapes) stays inside the tolerances below, which a zero, halved or
# doubled count cannot meet.
TCP_BYTES = 32 * 1024 * 1024
UDP_DATAGRAMS, UDP_SIZE = 4096, 1024
GETPPID_CALLS = 200_000
FILE_BYTES = 16 * 1024 * 1024
WORKLOAD_COMM = "tfo-verify"  # workload.py renames itself to this for the per-process series

testinfra_hosts = INSTALLED


def instance(name: str) -> dict[str, Any]:
    configs: list[dict[str, Any]] = yaml.safe_load(Path(os.environ["MOLECULE_INSTANCE_CONFIG"]).read_text())
    return next(c for c in configs if c["instance"] == name)


def package_under_test() -> Path:
    """Same choice as inventory/group_vars/all.yml: $TFO_AGENT_PACKAGE, else the newest dist/ .deb."""
    env = os.environ.get("TFO_AGENT_PACKAGE")
    if env:
        return Path(env)
    return sorted((REPO / "dist").glob("tfo-agent_*_amd64.deb"))[-1]


def agent_config(host: Any) -> dict[str, Any]:
    with host.sudo():
        text = host.file(CONFIG).content_string
    config: dict[str, Any] = yaml.safe_load(text)
    return config


def expected(host: Any, var: str) -> Any:
    """The value the inventory (group_vars/host_vars) gives a role variable, else the role default."""
    hv = host.ansible.get_variables()
    value = hv.get(var, ROLE_DEFAULTS[var])
    return value


def scrape(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as resp:
        body = resp.read().decode()
    samples = SAMPLE.findall(body)
    assert samples, "no ebpf_syscall_count_total sample in /metrics"
    return sum(float(v) for _, v in samples)


def ansible_playbook(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    cmd = ["ansible-playbook", "-i", INVENTORY, str(REPO / "playbooks/install.yml"), *args]
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


# ------------------------------------------------------------------ hosts that were installed


def test_package_installed(host: Any) -> None:
    pkg = host.package("tfo-agent")
    assert pkg.is_installed
    # the version installed is the one in the package file under test
    version = subprocess.run(
        ["dpkg-deb", "-f", str(package_under_test()), "Version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    assert pkg.version == version


def test_service_active_and_enabled(host: Any) -> None:
    svc = host.service("tfo-agent")
    assert svc.is_running
    assert svc.is_enabled


def test_bpffs_mounted_by_the_unit(host: Any) -> None:
    """/sys/fs/bpf is bpffs, and starting the agent mounts it again when it is gone.

    systemd mounts bpffs itself at boot on Debian 12, so the proof that the package's units
    (sys-fs-bpf.mount or equivalent ordering) mount it is: unmount it, start the agent, look.
    """
    mount = host.mount_point("/sys/fs/bpf")
    assert mount.exists
    assert mount.filesystem == "bpf"
    with host.sudo():
        host.run_expect([0], "systemctl stop tfo-agent.service")
        host.run_expect([0], "umount -l /sys/fs/bpf")
        assert not host.mount_point("/sys/fs/bpf").exists
        host.run_expect([0], "timeout 120 systemctl start tfo-agent.service")
        assert host.mount_point("/sys/fs/bpf").exists
        assert host.mount_point("/sys/fs/bpf").filesystem == "bpf"
        assert host.service("tfo-agent").is_running


def test_config_follows_group_vars(host: Any) -> None:
    config = agent_config(host)
    ebpf = config["integrations"]["ebpf"]
    cilium = ebpf["cilium"]
    # every plain (untemplated) value the inventory or the role defaults give lands in the file
    for var in ROLE_DEFAULTS:
        if var.startswith("tfo_agent_cilium_"):
            section, key = cilium, var[len("tfo_agent_cilium_") :]
        elif var.startswith("tfo_agent_"):
            section, key = ebpf, var[len("tfo_agent_") :]
        else:
            continue
        if key not in section:
            continue
        want = expected(host, var)
        if isinstance(want, str) and "{{" in want:
            continue
        assert section[key] == want, f"{var}: config has {section[key]!r}, inventory says {want!r}"
    prom = config["exporters"]["prometheus"]
    assert prom == {"enabled": True, "listen_address": expected(host, "tfo_agent_prometheus_listen_address")}

    groups = host.ansible.get_variables()["group_names"]
    if "k8s_nodes" in groups:
        assert cilium["enabled"] is True
        assert cilium["flow_scope"] == "node"
        assert cilium["node_name"] == host.ansible.get_variables()["inventory_hostname"]
        assert cilium["hubble_tls_enabled"] is True
        assert ebpf["collect_dns"] is True
        assert ebpf["collect_scheduler"] is False
        assert "monitoring" in cilium["exclude_namespaces"]
        tls = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "hubble-tls"
        with host.sudo():
            for name, mode in (("ca.crt", 0o644), ("tls.crt", 0o644), ("tls.key", 0o600)):
                f = host.file(f"/etc/hubble/{name}")
                assert f.is_file and f.mode == mode and f.user == "root"
                assert f.content_string == (tls / name).read_text()
    else:
        assert "bare_metal" in groups
        assert cilium["enabled"] is False
        assert ebpf["collect_scheduler"] is True
        assert ebpf["collect_memory"] is True
        assert "postgres" in ebpf["exclude_processes"]
        assert not host.file("/etc/hubble").exists


def test_configs_differ_between_groups() -> None:
    k8s = testinfra.get_host("ansible://tfo-k8s-node-1?ansible_inventory=" + INVENTORY)
    bm = testinfra.get_host("ansible://tfo-bm-1?ansible_inventory=" + INVENTORY)
    a, b = agent_config(k8s), agent_config(bm)
    assert a != b
    assert a["integrations"]["ebpf"]["cilium"]["enabled"] != b["integrations"]["ebpf"]["cilium"]["enabled"]


def test_metrics_served_and_growing(host: Any) -> None:
    name = host.ansible.get_variables()["inventory_hostname"]
    port = int(instance(name)["metrics_port"])
    deadline = time.monotonic() + 90
    while True:  # the agent may still be loading its programs right after a restart
        try:
            first = scrape(port)
            break
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(3)
    # generate syscalls and wait past a scrape interval
    host.run("for i in $(seq 200); do cat /proc/self/status >/dev/null; done")
    time.sleep(8)
    second = scrape(port)
    assert second > first, f"ebpf_syscall_count_total did not grow: {first} -> {second}"


def test_agent_check_passes(host: Any) -> None:
    # bounded like the role's preflight (group_vars/all.yml tfo_agent_check_timeout)
    timeout = int(host.ansible.get_variables().get("tfo_agent_check_timeout", 600))
    with host.sudo():
        result = host.run(f"timeout {timeout} tfo-agent check")
    assert result.rc == 0, f"rc={result.rc} (124: no answer within {timeout} s) " + result.stdout + result.stderr


def test_config_validates_on_host(host: Any) -> None:
    with host.sudo():
        result = host.run(f"tfo-agent config validate {CONFIG}")
    assert result.rc == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ counts against the kernel's


def metrics(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics: {(name, {(label, value)…}): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as resp:
        body = resp.read().decode()
    return {
        (name, frozenset(LABEL.findall(labels or ""))): float(value) for name, labels, value in SERIES.findall(body)
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def collector_state(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> str:
    """What the agent says about its collectors (up, and the failure reasons), for failure messages."""
    up = sorted(
        dict(k[1])["collector"] + "=" + f"{v:.0f}" for k, v in samples.items() if k[0] == "tfo_agent_collector_up"
    )
    failed = sorted(
        f"{d['collector']}: {d['reason']}"
        for d in (dict(k[1]) for k in samples if k[0] == "tfo_agent_collector_failure_info")
    )
    return f"collector_up {', '.join(up) or 'none'}; failures: {'; '.join(failed) or 'none'}"


COLLECTOR_OF = {"ebpf_network": "network", "ebpf_syscall": "syscalls", "ebpf_file": "file_io"}


def attach_mode(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str) -> str:
    """The attach mode (type and build variant) the collector behind ``metric`` runs in, per the agent."""
    collector = next((c for prefix, c in COLLECTOR_OF.items() if metric.startswith(prefix)), "")
    modes = {
        (d["attach_type"] + (f" ({d['variant']})" if d.get("variant") else ""))
        for d in (dict(k[1]) for k, v in samples.items() if k[0] == "tfo_agent_program_attached" and v == 1)
        if d.get("collector") == collector
    }
    return ", ".join(sorted(modes)) or "none"


def wait_metrics(port: int, timeout: float = 120) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    deadline = time.monotonic() + timeout
    while True:  # the agent may still be loading its programs after the bpffs test restarted it
        try:
            return metrics(port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(3)


def run_workload(name: str, *args: object) -> dict[str, Any]:
    """workload.py on the VM over plain SSH (no module upload: the less background traffic the better)."""
    vm = instance(name)
    cmd = ["ssh", *SSH_OPTS, "-i", vm["identity_file"], "-p", str(vm["port"]), f"{vm['user']}@{vm['address']}"]
    cmd += ["python3", "-", *(str(a) for a in args)]
    with WORKLOAD.open() as script:
        out = subprocess.run(cmd, stdin=script, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, f"workload {args} on {name} failed: {out.stdout[-2000:]} {out.stderr[-2000:]}"
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@dataclass
class Run:
    """One workload on one host: its report and /metrics right before and after."""

    name: str
    kernel: str
    workload: str
    result: dict[str, Any]
    before: dict[tuple[str, frozenset[tuple[str, str]]], float]
    after: dict[tuple[str, frozenset[tuple[str, str]]], float]
    seconds: float


RUNS: dict[tuple[str, str], Run] = {}


def workload(host: Any, mode: str, *args: object) -> Run:
    """Run ``workload.py mode args`` once per host (the tests of one workload share it)."""
    name = host.ansible.get_variables()["inventory_hostname"]
    key = (name, mode)
    if key not in RUNS:
        port = int(instance(name)["metrics_port"])
        before = wait_metrics(port)
        t0 = time.monotonic()
        result = run_workload(name, mode, *args)
        seconds = time.monotonic() - t0
        time.sleep(1)  # counters are read from the kernel maps at scrape time; a margin for the last events
        after = metrics(port)
        RUNS[key] = Run(name, str(instance(name).get("kernel", "?")), mode, result, before, after, round(seconds, 1))
    return RUNS[key]


def compare(run: Run, metric: str, labels: dict[str, str], want: float, what: str, rel: float, slack: float) -> None:
    """The metric's growth over the run equals ``want`` within rel*want + slack; recorded either way."""
    before = value(run.before, metric, **labels)
    after = value(run.after, metric, **labels)
    delta = None if after is None else after - (before or 0.0)
    tolerance = rel * want + slack
    ok = delta is not None and abs(delta - want) <= tolerance
    series = metric + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    record = {
        "host": run.name,
        "kernel": run.kernel,
        "series": series,
        "agent_delta": delta,
        "expected": want,
        "expected_is": what,
        "tolerance": round(tolerance),
        "ok": ok,
        "workload_seconds": run.seconds,
        "mode": attach_mode(run.after, metric),
    }
    with ACCURACY_LOG.open("a") as f:
        f.write(json.dumps(record) + "\n")
    where = f"{run.name} (kernel {run.kernel})"
    assert after is not None, f"{where}: no {series} in /metrics after the workload; {collector_state(run.after)}"
    assert ok, (
        f"{where}: {series} grew by {delta:.0f} over the {run.workload} workload; {what} is {want:.0f}"
        f" (tolerance ±{tolerance:.0f}); workload report {run.result}"
    )


def test_tcp_sent_bytes_match_the_kernel(host: Any) -> None:
    """A loopback transfer of N bytes adds N sent (the client socket's tcpi_bytes_acked: N + 1, the SYN)."""
    run = workload(host, "tcp", TCP_BYTES)
    assert run.result["sent"] == TCP_BYTES
    acked = run.result["client_tcp_info"]["bytes_acked"]
    assert TCP_BYTES <= acked <= TCP_BYTES + 1, run.result  # the kernel saw the workload's figure
    labels = {"direction": "sent", "protocol": "tcp"}
    what = f"bytes sent (TCP_INFO bytes_acked {acked})"
    compare(run, "ebpf_network_bytes_total", labels, TCP_BYTES, what, 0.01, 65536)


def test_tcp_received_bytes_match_the_kernel(host: Any) -> None:
    """… and N received: the server socket's tcpi_bytes_received."""
    run = workload(host, "tcp", TCP_BYTES)
    assert run.result["received"] == TCP_BYTES
    received = run.result["server_tcp_info"]["bytes_received"]
    assert TCP_BYTES <= received <= TCP_BYTES + 1, run.result
    labels = {"direction": "received", "protocol": "tcp"}
    compare(run, "ebpf_network_bytes_total", labels, received, "TCP_INFO bytes_received", 0.01, 65536)


@pytest.mark.parametrize("direction,field", [("sent", "segs_out"), ("received", "segs_in")])
def test_tcp_segments_match_the_kernel(host: Any, direction: str, field: str) -> None:
    """TCP segments: the two sockets' own segs_out (segs_in) as TCP_INFO reports them before close.

    The handshake, FIN and last ACKs and the SSH session carrying the workload add a few dozen
    segments; a zero or halved count fails.
    """
    run = workload(host, "tcp", TCP_BYTES)
    segs = run.result["client_tcp_info"][field] + run.result["server_tcp_info"][field]
    labels = {"direction": direction, "protocol": "tcp"}
    compare(run, "ebpf_network_packets_total", labels, segs, f"TCP_INFO {field} of both sockets", 0.05, 100)


@pytest.mark.parametrize("direction", ["sent", "received"])
@pytest.mark.parametrize("what", ["bytes", "datagrams"])
def test_udp_matches_the_kernel(host: Any, what: str, direction: str) -> None:
    """K datagrams of S bytes over loopback: K*S bytes and K datagrams each way (/proc/net/snmp agrees)."""
    run = workload(host, "udp", UDP_DATAGRAMS, UDP_SIZE)
    snmp = run.result["snmp_udp_delta"]
    datagrams = run.result[f"{direction}_datagrams"]
    assert run.result["sent_datagrams"] == UDP_DATAGRAMS
    # the kernel's own protocol counters saw at least the workload's datagrams
    assert snmp["OutDatagrams" if direction == "sent" else "InDatagrams"] >= datagrams, run.result
    labels = {"direction": direction, "protocol": "udp"}
    if what == "bytes":
        compare(run, "ebpf_network_bytes_total", labels, run.result[direction], f"UDP bytes {direction}", 0.01, 65536)
    else:
        compare(run, "ebpf_network_packets_total", labels, datagrams, f"UDP datagrams {direction}", 0.01, 64)


def test_syscall_count_matches_the_calls(host: Any) -> None:
    """N getppid() calls add N to ebpf_syscall_count_total{syscall="getppid"} (shells add a few)."""
    run = workload(host, "getppid", GETPPID_CALLS)
    compare(run, "ebpf_syscall_count_total", {"syscall": "getppid"}, GETPPID_CALLS, "getppid calls", 0.005, 64)


@pytest.mark.parametrize("op,field,io", [("write", "written", "wchar_delta"), ("read", "read", "rchar_delta")])
def test_file_bytes_match_the_kernel(host: Any, op: str, field: str, io: str) -> None:
    """W bytes written to a regular file and read back, under the workload's own comm.

    The kernel's accounting is the process's /proc/self/io wchar/rchar (rchar also holds the
    first /proc/self/io read, ~100 bytes).
    """
    run = workload(host, "file", FILE_BYTES)
    assert run.result[field] == FILE_BYTES
    assert FILE_BYTES <= run.result[io] <= FILE_BYTES + 4096, run.result
    metric = f"ebpf_file_{op}_bytes_total"
    compare(
        run, metric, {"comm": WORKLOAD_COMM}, run.result[field], f"bytes {field} ({io} {run.result[io]})", 0.001, 4096
    )


# ------------------------------------------------------------------ the host preflight refused


@pytest.mark.parametrize("name", [REFUSED])
def test_refused_host_left_untouched(name: str) -> None:
    refused = testinfra.get_host(f"ansible://{name}?ansible_inventory={INVENTORY}")
    assert not refused.package("tfo-agent").is_installed
    assert not refused.file("/etc/tfo-agent").exists
    assert not refused.file("/var/cache/tfo-agent-ansible").exists
    assert refused.run("systemctl cat tfo-agent.service").rc != 0


def test_refusal_reported_with_remedy() -> None:
    """The fleet run reports the refused host, what was found and the seed's remedy, and succeeds."""
    result = ansible_playbook("--limit", REFUSED)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    text = " ".join(out.split())
    assert f"{REFUSED} cannot run tfo-agent: BTF for CO-RE" in text
    assert "found tfo_agent_btf_path=/nonexistent/tfo-agent/vmlinux.btf is missing or unreadable" in text
    assert "remedy: BTF not found: install kernel BTF" in text
    assert "or provide btf_path" in text
    assert "tfo-agent preflight refused 1 host(s)" in text
    assert re.search(rf"{REFUSED}\s*:\s*ok=\d+\s+changed=0\s+unreachable=0\s+failed=0", text), text[-2000:]


def test_refusal_can_fail_the_host() -> None:
    result = ansible_playbook("--limit", REFUSED, "-e", "tfo_agent_preflight_on_failure=fail")
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, text[-3000:]
    assert re.search(rf"{REFUSED}\s*:\s*ok=\d+\s+changed=0\s+unreachable=0\s+failed=1", text), text[-2000:]


def test_check_mode_on_a_fresh_host() -> None:
    """--check on a host that has nothing yet (the refused VM, with its BTF fixed) runs clean."""
    result = ansible_playbook("--limit", REFUSED, "--check", "-e", "tfo_agent_btf_path=")
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 0, text[-4000:]
    assert re.search(rf"{REFUSED}\s*:\s*ok=\d+\s+changed=[1-9]\d*\s+unreachable=0\s+failed=0", text), text[-2000:]
    refused = testinfra.get_host(f"ansible://{REFUSED}?ansible_inventory={INVENTORY}")
    assert not refused.package("tfo-agent").is_installed


def test_check_mode_after_converge_reports_no_change() -> None:
    # one converged host of each kind of config is enough (module runs are slow under TCG)
    name = "tfo-k8s-node-1"
    result = ansible_playbook("--check", "--diff", "--limit", name)
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 0, text[-4000:]
    assert re.search(rf"{name}\s*:\s*ok=\d+\s+changed=0\s+unreachable=0\s+failed=0", text), text[-2000:]
