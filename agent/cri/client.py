"""The container runtime's CRI socket: ``runtime.v1.RuntimeService`` over gRPC on a unix socket.

What kubelet itself uses, so any runtime kubelet drives works (containerd's CRI plugin, CRI-O),
with no Kubernetes API access on the node. Every failure is a ``CriError`` whose message is one
line naming the socket and what went wrong.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Optional

import grpc

from agent.cri.proto import api_pb2, api_pb2_grpc

# Looked for in this order when no endpoint is configured.
DEFAULT_SOCKETS = ("/run/containerd/containerd.sock", "/var/run/crio/crio.sock")
TIMEOUT = 3.0  # seconds per call


class CriError(RuntimeError):
    """The runtime could not be asked; the message says why, in one line."""


@dataclass(frozen=True)
class Pod:
    """A pod sandbox as the runtime reports it."""

    sandbox_id: str
    uid: str
    name: str
    namespace: str
    ready: bool


@dataclass(frozen=True)
class Container:
    """A container as the runtime reports it (``sandbox_id``: its pod's sandbox)."""

    id: str
    sandbox_id: str
    name: str
    running: bool


def socket_path(endpoint: str) -> str:
    """``unix:///run/x.sock`` or ``/run/x.sock`` -> ``/run/x.sock``."""
    return endpoint[len("unix://") :] if endpoint.startswith("unix://") else endpoint


def find_socket(endpoint: str) -> Optional[str]:
    """The socket to use: the configured one (even if absent for now: it may come), else the first
    default that exists; None when nothing is configured or found."""
    if endpoint:
        return socket_path(endpoint)
    return next((p for p in DEFAULT_SOCKETS if os.path.exists(p)), None)


def check_socket(path: str) -> None:
    """Raise CriError unless ``path`` is a unix socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CriError(f"{path}: no such socket (is the container runtime running?)") from None
    except OSError as exc:
        raise CriError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise CriError(f"{path}: not a unix socket")


def _describe(path: str, exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or str(code)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{path}: does not serve the CRI (runtime.v1.RuntimeService): {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"{path}: cannot talk to the runtime: {details.splitlines()[0]}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{path}: the runtime did not answer within {TIMEOUT:g}s"
    return f"{path}: {code.name if code else 'error'}: {details.splitlines()[0] if details else ''}"


class CriClient:
    """One channel to the runtime; each call raises CriError on failure."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{os.path.abspath(path)}")
        self._stub = api_pb2_grpc.RuntimeServiceStub(self._channel)

    def _call(self, method: str, request: object) -> object:
        check_socket(self.path)
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise CriError(_describe(self.path, exc)) from None

    def version(self) -> tuple[str, str]:
        """(runtime name, runtime version)."""
        r = self._call("Version", api_pb2.VersionRequest(version="v1"))
        return r.runtime_name, r.runtime_version  # type: ignore[attr-defined]

    def pods(self) -> list[Pod]:
        r = self._call("ListPodSandbox", api_pb2.ListPodSandboxRequest())
        return [
            Pod(p.id, p.metadata.uid, p.metadata.name, p.metadata.namespace, p.state == api_pb2.SANDBOX_READY)
            for p in r.items  # type: ignore[attr-defined]
        ]

    def containers(self) -> list[Container]:
        r = self._call("ListContainers", api_pb2.ListContainersRequest())
        return [
            Container(c.id, c.pod_sandbox_id, c.metadata.name, c.state == api_pb2.CONTAINER_RUNNING)
            for c in r.containers  # type: ignore[attr-defined]
        ]

    def container_state(self, container_id: str) -> int:
        """The container's ``ContainerState`` number (CONTAINER_RUNNING, CONTAINER_EXITED, ...)."""
        r = self._call("ContainerStatus", api_pb2.ContainerStatusRequest(container_id=container_id))
        return int(r.status.state)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._channel.close()
