"""Fast checks of the tfo_agent Ansible role and playbooks (the VM proof is `molecule test`).

- every seed config key is a role variable with the seed's default, and argument_specs types them;
- the role's template, rendered by Ansible for each example inventory group, is a config the
  agent's own `config validate` accepts, and differs between groups as their group_vars say;
- the playbooks pass `ansible-playbook --syntax-check`, the role `ansible-lint --profile production`.

Needs ansible-core (and ansible-lint for the lint test): skipped without them outside CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ROLE = REPO / "roles" / "tfo_agent"
EXAMPLE = REPO / "playbooks" / "inventory" / "example"
LINTED = ["roles/tfo_agent", "playbooks", "molecule/default"]

# The seed's integrations.ebpf and integrations.ebpf.cilium keys with its defaults
# (btf_path " " in the seed means auto-detect: the role writes "").
SEED_EBPF: dict[str, Any] = {
    "enabled": True,
    "programs_path": "/var/lib/tfo-agent/ebpf",
    "pin_path": "/sys/fs/bpf/tfo-agent",
    "scrape_interval": "15s",
    "collect_syscalls": True,
    "collect_network": True,
    "collect_file_io": True,
    "collect_scheduler": False,
    "collect_memory": False,
    "collect_tcp_events": True,
    "collect_dns": False,
    "collect_http": False,
    "process_filter": [],
    "container_filter": [],
    "namespace_filter": [],
    "exclude_processes": ["tfo-agent", "systemd"],
    "sample_rate": 100,
    "ring_buffer_size": 65536,
    "perf_buffer_size": 8192,
    "max_stack_depth": 20,
    "btf_path": "",
}
SEED_CILIUM: dict[str, Any] = {
    "enabled": True,
    "hubble_address": "hubble-relay.kube-system.svc:4245",
    "hubble_tls_enabled": True,
    "hubble_tls_cert": "/etc/hubble/tls.crt",
    "hubble_tls_key": "/etc/hubble/tls.key",
    "hubble_tls_ca": "/etc/hubble/ca.crt",
    "collect_flows": True,
    "collect_l7_flows": True,
    "collect_drops": True,
    "collect_policies": True,
    "collect_services": True,
    "kubernetes_enabled": True,
    "watch_namespaces": [],
    "exclude_namespaces": ["kube-system", "cilium"],
    "flow_buffer_size": 4096,
    "flow_sample_rate": 1,
    "max_flows_per_second": 10000,
    "aggregation_window": "10s",
    # issue 9: node scope by default
    "flow_scope": "node",
    "node_name": "",
}


def tool(name: str) -> str:
    """An Ansible CLI next to this interpreter, else on PATH; skip (fail in CI) when absent."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} not installed (pip install ansible-core ansible-lint)")
        pytest.skip(f"{name} not installed (pip install ansible-core ansible-lint)")
    return found


def run_ok(cmd: list[str], timeout: float, **kwargs: Any) -> None:
    """Run ``cmd`` (cwd, env… in ``kwargs``) and assert that it succeeded, showing its output if not."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]


def defaults() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    return data


def test_every_seed_key_is_a_role_variable_with_the_seed_default() -> None:
    d = defaults()
    for key, value in SEED_EBPF.items():
        assert d[f"tfo_agent_{key}"] == value, key
    for key, value in SEED_CILIUM.items():
        assert d[f"tfo_agent_cilium_{key}"] == value, key
    assert d["tfo_agent_prometheus_listen_address"] == "0.0.0.0:9435"


def test_preflight_minimum_kernel_is_the_agents() -> None:
    """The role refuses exactly the kernels `tfo-agent check` refuses (its `kernel >=` line)."""
    from agent.host import MIN_KERNEL

    want = ".".join(str(part) for part in MIN_KERNEL)
    assert defaults()["tfo_agent_min_kernel_version"] == want, (
        f"role default tfo_agent_min_kernel_version is {defaults()['tfo_agent_min_kernel_version']!r},"
        f" agent/host.py MIN_KERNEL is {want!r}"
    )


def test_argument_specs_cover_and_type_every_default() -> None:
    spec = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]
    d = defaults()
    assert set(options) == set(d)
    kinds = {bool: "bool", int: "int", str: "str", list: "list", dict: "dict"}
    for name, value in d.items():
        assert options[name]["type"] == kinds[type(value)], name
        assert options[name]["default"] == value, name
        assert options[name]["description"], name
    assert options["tfo_agent_cilium_flow_scope"]["choices"] == ["node", "cluster"]


def render(tmp_path: Path, group: str) -> dict[str, Any]:
    """Render templates/config.yaml.j2 with Ansible for a host of the example inventory's group."""
    out = tmp_path / f"{group}.yaml"
    tls = tmp_path / "tls"
    tls.mkdir(exist_ok=True)
    extra: dict[str, Any] = {"ansible_python_interpreter": sys.executable}
    for name, var in (("ca.crt", "ca"), ("tls.crt", "cert"), ("tls.key", "key")):
        (tls / name).write_text("placeholder\n")
        extra[f"tfo_agent_cilium_hubble_tls_{var}"] = str(tls / name)
    extras = tmp_path / "extra.yml"
    extras.write_text(yaml.safe_dump(extra))
    play = tmp_path / "render.yml"
    play.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "render",
                    "hosts": group,
                    "gather_facts": False,
                    "connection": "local",
                    "vars_files": [str(ROLE / "vars" / "main.yml")],
                    "tasks": [
                        {
                            "name": "render the config",
                            "ansible.builtin.template": {
                                "src": str(ROLE / "templates" / "config.yaml.j2"),
                                "dest": str(out),
                                "mode": "0644",
                            },
                            "run_once": True,
                        }
                    ],
                }
            ]
        )
    )
    # the role defaults as the inventory's lowest-precedence `all` vars, so group_vars win as they
    # do over role defaults
    low = tmp_path / "defaults-inventory.yml"
    low.write_text(yaml.safe_dump({"all": {"vars": defaults()}}))
    env = dict(os.environ, ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_NOCOLOR="1")
    run_ok([tool("ansible-playbook"), "-i", str(low), "-i", str(EXAMPLE), str(play), "-e", f"@{extras}"], 300, env=env)
    run_ok([sys.executable, "-m", "agent", "config", "validate", str(out)], 60, cwd=REPO)
    config: dict[str, Any] = yaml.safe_load(out.read_text())
    return config


def test_example_groups_render_valid_configs_that_follow_group_vars(tmp_path: Path) -> None:
    k8s = render(tmp_path, "k8s_nodes")
    agg = render(tmp_path, "hubble_aggregator")
    bm = render(tmp_path, "bare_metal")
    k8s_cilium = k8s["integrations"]["ebpf"]["cilium"]
    assert k8s_cilium["enabled"] is True
    assert k8s_cilium["flow_scope"] == "node"
    assert k8s_cilium["node_name"] == "k8s-node-1"
    assert k8s_cilium["hubble_tls_enabled"] is True
    assert k8s["integrations"]["ebpf"]["collect_dns"] is True
    assert agg["integrations"]["ebpf"]["cilium"]["enabled"] is True
    assert agg["integrations"]["ebpf"]["cilium"]["flow_scope"] == "cluster"
    assert bm["integrations"]["ebpf"]["cilium"]["enabled"] is False
    assert bm["integrations"]["ebpf"]["collect_scheduler"] is True
    assert "postgres" in bm["integrations"]["ebpf"]["exclude_processes"]
    for config in (k8s, agg, bm):
        assert config["exporters"]["prometheus"] == {"enabled": True, "listen_address": "0.0.0.0:9435"}


@pytest.mark.parametrize("playbook", ["install.yml", "uninstall.yml"])
def test_playbooks_syntax(playbook: str) -> None:
    run_ok([tool("ansible-playbook"), "--syntax-check", "-i", str(EXAMPLE), str(REPO / "playbooks" / playbook)], 300)


def test_ansible_lint_production_profile() -> None:
    run_ok([tool("ansible-lint"), "--offline", "--profile", "production", *LINTED], 600, cwd=REPO)


def test_monitoring_play_installs_validated_rules_and_dashboards(tmp_path: Path) -> None:
    """install.yml's Prometheus play, run for real on this machine (local connection) into a
    temporary tree: the rule file passes promtool on the way in, every dashboard lands."""
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "prometheus_servers": {
                    "hosts": {
                        "localhost": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
                    }
                }
            }
        )
    )
    rules, boards = tmp_path / "rules", tmp_path / "dashboards"
    out = subprocess.run(
        [
            tool("ansible-playbook"), "-i", str(inventory), str(REPO / "playbooks" / "install.yml"),
            "--limit", "prometheus_servers",
            "-e", f"tfo_agent_prometheus_rules_dir={rules} tfo_agent_grafana_dashboards_dir={boards}",
            "-e", "tfo_agent_prometheus_service='' tfo_agent_target_hosts=agents",  # no agent play here
        ],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, ANSIBLE_ROLES_PATH=str(REPO / "roles"), ANSIBLE_NOCOLOR="1"),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert (rules / "tfo-agent.rules.yml").read_text() == (REPO / "monitoring/rules/tfo-agent.rules.yml").read_text()
    shipped = sorted(p.name for p in (REPO / "monitoring/dashboards").iterdir())
    assert sorted(p.name for p in boards.iterdir()) == shipped
