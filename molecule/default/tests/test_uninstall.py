"""Last of verify (files run in name order): playbooks/uninstall.yml with purge on one host. The
other files' tests need the agent installed on every host, so this one runs after them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import testinfra

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
REPO = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])


def test_uninstall_playbook_purges() -> None:
    """playbooks/uninstall.yml with purge stops and removes the agent (on one host)."""
    name = "tfo-bm-1"
    cmd = ["ansible-playbook", "-i", INVENTORY, str(REPO / "playbooks/uninstall.yml")]
    cmd += ["--limit", name, "-e", "tfo_agent_purge=true"]
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 0, text[-4000:]
    gone = testinfra.get_host(f"ansible://{name}?ansible_inventory={INVENTORY}")
    assert not gone.package("tfo-agent").is_installed
    assert gone.run("dpkg-query -W -f='${Status}' tfo-agent").stdout.strip() in ("", "unknown ok not-installed")
    assert not gone.file("/etc/tfo-agent").exists
    assert gone.run("systemctl is-active tfo-agent.service").stdout.strip() != "active"
