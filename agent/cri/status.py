"""``tfo-agent check``'s line about the container runtime, when the config wants pod metadata."""

from __future__ import annotations

from agent.host import Check

NAME = "container runtime"
EFFECT = "container, pod and namespace labels stay empty and namespace_filter matches no pod"


def runtime_check(endpoint: str) -> Check:
    """Ask the runtime what the agent would ask; a warning (not a failure) when it cannot."""
    try:
        from agent.cri.client import DEFAULT_SOCKETS, CriClient, CriError, find_socket
    except ImportError as exc:
        return Check(NAME, "warn", f"the CRI client cannot load ({exc}): {EFFECT}", "install python3-grpcio")
    path = find_socket(endpoint)
    if path is None:
        return Check(
            NAME,
            "warn",
            f"no CRI socket found (looked for {', '.join(DEFAULT_SOCKETS)}): {EFFECT}",
            "set integrations.ebpf.container_runtime_endpoint to the runtime's socket",
        )
    client = CriClient(path)
    try:
        name, version = client.version()
        pods, containers = client.pods(), client.containers()
    except CriError as exc:
        return Check(NAME, "warn", f"{exc}: {EFFECT}", "check container_runtime_endpoint and that the runtime runs")
    finally:
        client.close()
    return Check(NAME, "ok", f"{name} {version} at {path}: {len(pods)} pods, {len(containers)} containers")
