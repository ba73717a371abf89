"""Pod and container attribution, namespace_filter and node endpoints, with a real containerd and real pods.

Every test runs the real agent (its BPF objects in this kernel) next to Debian's containerd with the
CRI plugin and runc (``tests/conftest_cri.py``), and creates pods over CRI as kubelet does. Their
containers make a known number of ``getppid`` calls and write a known number of bytes; the agent
must show exactly those, under the right pod.

cgroup v1 and v2: this VM mounts the v1 controllers plus a v2 ``unified`` tree, and runc makes each
container's cgroup in both. The attribution tests run once keyed by the v1 memory controller's
cgroup ids and once by the v2 tree's (``TFO_AGENT_CGROUP_KEY``), both with containerd's cgroupfs
layout; the systemd driver's layouts (slices and scopes, which need systemd as PID 1) are checked
on the path parser below.

runc's own set-up runs in the container's cgroup before it starts the container's command (two
``getppid`` calls here), so syscall counts are compared from the moment ``/work`` runs, once the
agent attributes the container's cgroup (``attributed``): before that, those calls are not under
the pod's names yet, and would show up in the difference.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from agent.cri.cgroups import KEY_ENV, CgroupRef, hierarchies, parse_path
from agent.cri.index import MIN_RESCAN_SECONDS
from tests.conftest import ROOT, Agent, Series, wait_for
from tests.conftest_cri import Containerd, Cri, Pod, containerd_fixture, cri_fixture  # noqa: F401 (fixtures)

COUNT = "ebpf_syscall_count_total"
WRITES = "ebpf_file_write_bytes_total"
LABELS = ["comm", "namespace", "pod", "container"]
KEYS = pytest.mark.parametrize("key", ["memory", "v2"], ids=["cgroup-v1-memory", "cgroup-v2"])


def config(ctd: Containerd, **ebpf: object) -> dict[str, object]:
    base = {"collect_file_io": True, "container_runtime_endpoint": ctd.socket, "labels": LABELS}
    return {"integrations": {"ebpf": {**base, **ebpf}}}


def of(pod: Pod, container: str = "app", **more: str) -> dict[str, str]:
    """The container labels of a pod's container (plus ``more``)."""
    return {"namespace": pod.namespace, "pod": pod.name, "container": container, **more}


def value(series: Series, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def gauge(agent: Agent, name: str) -> float:
    return value(agent.scrape(), name)


def getppid_series(m: Series) -> dict[tuple[tuple[str, str], ...], float]:
    """Every getppid count series (for failure messages)."""
    return {tuple(sorted(k[1])): v for k, v in m.items() if k[0] == COUNT and ("syscall", "getppid") in k[1]}


def known(agent: Agent, *pods: Pod) -> bool:
    """Does the agent know these pods' containers (the runtime's last answer has them all)?"""
    return gauge(agent, "tfo_agent_cri_containers") >= sum(len(p.containers) for p in pods)


def started(agent: Agent, *pods: Pod) -> None:
    for pod in pods:
        pod.wait_running()
    assert wait_for(lambda: known(agent, *pods), timeout=10), agent.log()


def attributed(agent: Agent, pod: Pod) -> bool:
    """Does some syscall series carry the pod's container labels yet (its cgroup is indexed, so
    everything counted there so far is attributed)?"""
    labels = set(of(pod).items())
    return any(k[0] == COUNT and labels <= k[1] for k in agent.scrape())


def run(*pods: Pod) -> None:
    for pod in pods:
        pod.go()
    for pod in pods:
        pod.wait_done()


@KEYS
def test_labels_attribute_syscalls_and_file_writes_to_pods(
    agent_factory: Callable[..., Agent], cri: Cri, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv(KEY_ENV, key)
    agent = agent_factory(config(cri.ctd, collect_scheduler=True, collect_memory=True))
    # 60,000 calls overflow a cached count (2^22 - 1 weight units) once: part is handed to the hash
    shop = cri.run_pod("web-1", "shop", {"app": (60_000, 123_457)})
    tools = cri.run_pod("web-1", "tools", {"app": (20_000, 65_536)})
    started(agent, shop, tools)
    assert wait_for(lambda: attributed(agent, shop) and attributed(agent, tools), timeout=15), agent.log()
    before = agent.scrape()
    run(shop, tools)
    wanted = ((shop, 60_000, 123_457), (tools, 20_000, 65_536))

    def grown(m: Series, pod: Pod) -> float:
        return value(m, COUNT, syscall="getppid", **of(pod)) - value(before, COUNT, syscall="getppid", **of(pod))

    # names are joined at read time from the agent's cgroup index, which a loaded host may refresh a
    # little after the workload ends: wait for the counts, then require them exact
    wait_for(lambda: all(grown(agent.scrape(), pod) >= calls for pod, calls, _ in wanted), timeout=15)
    after = agent.scrape()
    for pod, calls, nbytes in wanted:
        got = grown(after, pod)
        assert got == calls, (pod.namespace, got, getppid_series(before), getppid_series(after))
        assert value(after, WRITES, comm="work", **of(pod)) == nbytes
        # every per-process family has the labels: the wait for "go" (failed stat calls, sleeps)
        assert any(
            k[0] == "ebpf_syscall_errors_total" and {("errno", "ENOENT"), *of(pod).items()} <= k[1] for k in after
        )
        for family in ("ebpf_context_switches_total", "ebpf_process_runtime_seconds_total", "ebpf_page_faults_total"):
            assert any(k[0] == family and {("comm", "work"), *of(pod).items()} <= k[1] for k in after), family
    # processes outside containers: empty pod and namespace labels
    assert any(k[0] == COUNT and dict(k[1])["pod"] == "" == dict(k[1])["namespace"] for k in after)


def test_namespace_filter_counts_only_pods_of_listed_namespaces(agent_factory: Callable[..., Agent], cri: Cri) -> None:
    """Default labels: the syscall count has no pod label, so the filter alone decides what is in it."""
    early = cri.run_pod("web-1", "shop", {"app": (11_000, 1_000)})
    early.wait_running()
    ebpf = {"collect_file_io": True, "container_runtime_endpoint": cri.ctd.socket, "namespace_filter": ["shop"]}
    agent = agent_factory({"integrations": {"ebpf": ebpf}})
    late = cri.run_pod("web-2", "shop", {"app": (7_000, 2_000)})  # after the agent started
    other = cri.run_pod("web-1", "tools", {"app": (50_000, 40_000)})
    started(agent, early, late, other)
    # each shop pod: its pod cgroup, the sandbox's and the container's, on every tree the kernel walks
    trees = len([t for t in hierarchies() if t.v2 or t.controllers])
    ns_cgroups = "tfo_agent_namespace_filter_cgroups"
    assert wait_for(lambda: gauge(agent, ns_cgroups) == 2 * 3 * trees, timeout=10), gauge(agent, ns_cgroups)
    before = agent.scrape()
    run(early, late, other)
    after = agent.scrape()
    assert value(after, COUNT, syscall="getppid") - value(before, COUNT, syscall="getppid") == 11_000 + 7_000
    assert value(after, WRITES, comm="work") == 1_000 + 2_000


def test_label_sets_stay_under_the_cap_and_folds_lose_nothing(agent_factory: Callable[..., Agent], cri: Cri) -> None:
    """Five pods, room for two label sets and ``other``: the rest fold, counted once each, totals kept
    (namespace_filter keeps the host's processes out, so totals are exact)."""
    ebpf = {"labels": ["pod"], "max_comm_series": 3, "namespace_filter": ["capped"]}
    agent = agent_factory(config(cri.ctd, **ebpf))
    pods = [cri.run_pod(f"web-{i}", "capped", {"app": (1_000 * (i + 1), 100 * (i + 1))}) for i in range(5)]
    started(agent, *pods)
    assert wait_for(lambda: gauge(agent, "tfo_agent_namespace_filter_cgroups") > 0, timeout=10)
    # Counts of a cgroup the agent's last scan missed wait for a read that may rescan (one a second):
    # past that, the next read shows runc's calls of every pod. Folded pods show as "other", so
    # ``attributed`` cannot tell when that is.
    time.sleep(MIN_RESCAN_SECONDS)

    def sums(m: Series) -> tuple[float, float]:
        calls = sum(v for k, v in m.items() if k[0] == COUNT and ("syscall", "getppid") in k[1])
        return calls, sum(v for k, v in m.items() if k[0] == WRITES)

    before = sums(agent.scrape())
    run(*pods)
    wait_for(lambda: sums(agent.scrape())[0] - before[0] >= 15_000, timeout=15)  # attributed at read time
    m = agent.scrape()
    after = sums(m)
    assert (after[0] - before[0], after[1] - before[1]) == (15_000, 1_500)
    for family in (COUNT, WRITES):
        pod_labels = {dict(k[1])["pod"] for k in m if k[0] == family}
        assert len(pod_labels) <= 3 and "other" in pod_labels, (family, pod_labels)
    for collector in ("syscalls", "file_io"):
        assert value(m, f"tfo_agent_{collector}_comm_folded_total") == 3


@KEYS
def test_pod_created_again_under_the_same_name_starts_from_its_own_counts(
    agent_factory: Callable[..., Agent], cri: Cri, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv(KEY_ENV, key)
    agent = agent_factory(config(cri.ctd))
    first = cri.run_pod("web-1", "shop", {"app": (40_000, 50_000)})
    started(agent, first)
    assert wait_for(lambda: attributed(agent, first), timeout=15), getppid_series(agent.scrape())
    at_start = value(agent.scrape(), COUNT, syscall="getppid", **of(first))  # runc's own calls
    run(first)
    # The names are joined in at read time from the agent's cgroup index, which a loaded host may
    # refresh a little after the workload ends: wait for the count, then require it exact.
    wait_for(lambda: value(agent.scrape(), COUNT, syscall="getppid", **of(first)) >= at_start + 40_000, timeout=15)
    m = agent.scrape()
    assert value(m, COUNT, syscall="getppid", **of(first)) == at_start + 40_000
    assert value(m, WRITES, comm="work", **of(first)) == 50_000
    cri.remove_pod(first)
    assert wait_for(lambda: gauge(agent, "tfo_agent_cri_containers") == 0, timeout=10)  # the agent saw it go
    second = cri.run_pod("web-1", "shop", {"app": (3_000, 4_000)})  # same names, new UID
    assert second.uid != first.uid
    started(agent, second)

    # Until the new container's cgroup is attributed, the removed pod's final counts stay in their
    # grace period under the same names; then the new pod's own series replaces them.
    def fresh() -> bool:
        return value(agent.scrape(), COUNT, syscall="getppid", **of(second)) == at_start

    assert wait_for(fresh, timeout=15), getppid_series(agent.scrape())
    run(second)
    wait_for(lambda: value(agent.scrape(), COUNT, syscall="getppid", **of(second)) >= at_start + 3_000, timeout=15)
    m = agent.scrape()
    assert value(m, COUNT, syscall="getppid", **of(second)) == at_start + 3_000
    assert value(m, WRITES, comm="work", **of(second)) == 4_000


def test_node_endpoints_are_the_runtimes_pods(agent_factory: Callable[..., Agent], cri: Cri) -> None:
    """kubernetes_enabled at node scope: the endpoint gauges are the pods on this node, per namespace,
    and follow a container and then a pod that stop; the flows (other namespaces) do not count."""
    from tests.conftest_hubble import relay

    with relay("basic-sample-400-tcp-flows.json", loop=True) as (_, address):
        cilium = {
            "enabled": True,
            "hubble_address": address,
            "hubble_tls_enabled": False,
            "node_name": "kind-control-plane",
            "aggregation_window": "500ms",
            "kubernetes_enabled": True,
            "flow_scope": "node",
        }
        agent = agent_factory(config(cri.ctd, labels=["comm"], cilium=cilium))
        web1 = cri.run_pod("web-1", "shop", {"app": (0, 0)})
        web2 = cri.run_pod("web-2", "shop", {"app": (0, 0), "sidecar": (0, 0)})
        probe = cri.run_pod("probe-1", "tools", {"app": (0, 0)})
        started(agent, web1, web2, probe)

        def endpoints() -> dict[tuple[str, str], float]:
            m = agent.scrape()
            return {(k[0], dict(k[1])["namespace"]): v for k, v in m.items() if k[0].startswith("hubble_endpoint_")}

        def becomes(want: dict[tuple[str, str], float]) -> bool:
            return wait_for(lambda: endpoints() == want, timeout=15)

        count, ready = "hubble_endpoint_count", "hubble_endpoint_ready"
        want = {(count, "shop"): 2, (ready, "shop"): 2, (count, "tools"): 1, (ready, "tools"): 1}
        assert becomes(want), endpoints()
        assert sum(v for k, v in agent.scrape().items() if k[0] == "hubble_flows_total") > 0  # flows do come
        cri.stop_container(web2, "sidecar")
        assert becomes({**want, (ready, "shop"): 1}), endpoints()
        cri.stop_pod(web2)
        assert becomes({**want, (count, "shop"): 1, (ready, "shop"): 1}), endpoints()


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "check", "-c", str(path)], capture_output=True, text=True, cwd=ROOT
    )


def write_config(tmp_path: Path, endpoint: str) -> Path:
    path = tmp_path / "cri.yaml"
    path.write_text(
        f"integrations:\n  ebpf:\n    programs_path: {ROOT / 'bpf'}\n    collect_network: false\n"
        f"    collect_tcp_events: false\n    labels: [comm, pod, namespace]\n"
        f"    container_runtime_endpoint: {endpoint}\n"
    )
    return path


def http_server(path: Path) -> socket.socket:
    """A unix socket answering HTTP/1.1 400 to anything, as a runtime socket that is not CRI (docker.sock)."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    return server


@pytest.mark.parametrize("kind", ["missing", "regular-file", "not-cri"])
def test_no_runtime_is_one_line_and_metrics_go_on(
    agent_factory: Callable[..., Agent], tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "runtime.sock"
    server: Optional[socket.socket] = None
    if kind == "regular-file":
        path.write_text("not a socket\n")
    elif kind == "not-cri":
        server = http_server(path)
    why = {"missing": "no such socket", "regular-file": "not a unix socket", "not-cri": "http1.x server"}
    try:
        out = check(write_config(tmp_path, str(path)))
        assert out.returncode == 0, out.stdout + out.stderr
        lines = [line for line in out.stdout.splitlines() if "container runtime" in line]
        assert len(lines) == 1 and lines[0].startswith("[WARN]") and why[kind] in lines[0], out.stdout
        ebpf = {"labels": ["comm", "pod", "namespace"], "container_runtime_endpoint": str(path)}
        agent = agent_factory({"integrations": {"ebpf": ebpf}})
        os.getppid()
        assert wait_for(lambda: value(agent.scrape(), "tfo_agent_cri_up") == 0 and known_series(agent))
        assert agent.get("/readyz")[0] == 200
        warnings = [line for line in agent.log().splitlines() if "container runtime:" in line]
        assert len(warnings) == 1 and why[kind] in warnings[0], agent.log()
        assert "Traceback" not in agent.log()
    finally:
        if server is not None:
            server.close()


def known_series(agent: Agent) -> bool:
    """Syscall series exist, with empty pod and namespace labels."""
    keys = [dict(k[1]) for k in agent.scrape() if k[0] == COUNT]
    return bool(keys) and all(k["pod"] == "" == k["namespace"] for k in keys)


def test_check_reports_the_runtime(containerd: Containerd, tmp_path: Path) -> None:
    if containerd.proc is None:
        containerd.start()
    out = check(write_config(tmp_path, f"unix://{containerd.socket}"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[OK  ] container runtime: containerd 1.6" in out.stdout and containerd.socket in out.stdout


def test_runtime_that_goes_away_and_comes_back_is_used_again(agent_factory: Callable[..., Agent], cri: Cri) -> None:
    agent = agent_factory(config(cri.ctd))
    pod = cri.run_pod("web-1", "shop", {"app": (9_000, 10)})
    started(agent, pod)
    cri.ctd.stop()  # the socket goes away; the pod's container keeps running under its shim
    assert wait_for(lambda: gauge(agent, "tfo_agent_cri_up") == 0, timeout=15)
    cri.ctd.start()
    assert wait_for(lambda: gauge(agent, "tfo_agent_cri_up") == 1 and known(agent, pod), timeout=15)
    assert wait_for(lambda: attributed(agent, pod), timeout=15), agent.log()
    before = value(agent.scrape(), COUNT, syscall="getppid", **of(pod))
    run(pod)
    wait_for(lambda: value(agent.scrape(), COUNT, syscall="getppid", **of(pod)) - before >= 9_000, timeout=15)
    assert value(agent.scrape(), COUNT, syscall="getppid", **of(pod)) - before == 9_000


UID = "6f1d2c3b-9a8e-4d7c-b6a5-0f1e2d3c4b5a"
CID = "7c282e62e59b6ee898e3dcbcb7eeaeccc7ac2d7b2aa47658852e9f49c0ae49db"


@pytest.mark.parametrize(
    "path, ref",
    [
        (f"/kubepods/besteffort/pod{UID}/{CID}", CgroupRef(UID, CID)),  # cgroupfs, v1 and v2
        (f"/kubepods/pod{UID}/{CID}", CgroupRef(UID, CID)),  # guaranteed QoS
        (f"/kubepods/burstable/pod{UID}", CgroupRef(UID, "")),  # the pod's own cgroup
        (
            "/kubepods.slice/kubepods-besteffort.slice/"
            f"kubepods-besteffort-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
            CgroupRef(UID, CID),
        ),
        (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{CID}.scope", CgroupRef(UID, CID)),
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice"
            f"/crio-conmon-{CID}.scope",
            CgroupRef(UID, ""),  # CRI-O's monitor process, not the container
        ),
        (f"/system.slice/docker-{CID}.scope", CgroupRef("", CID)),
        (f"/docker/{CID}", CgroupRef("", CID)),
        (f"/machine.slice/libpod-{CID}.scope/container", CgroupRef("", CID)),  # a cgroup the container made
        ("/system.slice/containerd.service", CgroupRef()),
        ("/user.slice/user-0.slice/session-3.scope", CgroupRef()),
        ("/", CgroupRef()),
    ],
)
def test_cgroup_paths_of_every_layout(path: str, ref: CgroupRef) -> None:
    assert parse_path(path) == ref
