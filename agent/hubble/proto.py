"""The generated Hubble API modules (see ``build_protos``), built on first use when missing, older
than their .proto, or generated for another protobuf runtime (which refuses gencode newer than itself)."""

from __future__ import annotations

import importlib
from types import ModuleType

from agent.hubble import build_protos


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"agent.hubble.proto_gen.{name}")


def _build(reason: str) -> None:
    try:
        build_protos.build()
    except ImportError:
        raise ImportError(
            f"Hubble protobuf modules are {reason}: run 'python agent/hubble/build_protos.py' (needs grpcio-tools)"
        ) from None
    importlib.invalidate_caches()


# Rebuilt before any import when a .proto changed: a loaded module cannot be replaced in the descriptor pool.
if build_protos.outdated():
    try:
        _build("missing or older than their .proto files")
    except (ImportError, OSError):
        if build_protos.outdated(missing_only=True):
            raise
        # all there but older (a read-only install without the generator): use them as they are
try:
    flow_pb2 = _load("flow.flow_pb2")
except Exception:  # built by a newer protoc than this protobuf runtime (fails before registering): build now
    _build("generated for another protobuf runtime")
    flow_pb2 = _load("flow.flow_pb2")

relay_pb2 = _load("relay.relay_pb2")
observer_pb2 = _load("observer.observer_pb2")
health_pb2 = _load("health.health_pb2")

GET_FLOWS = "/observer.Observer/GetFlows"
GET_NODES = "/observer.Observer/GetNodes"
GET_NAMESPACES = "/observer.Observer/GetNamespaces"
SERVER_STATUS = "/observer.Observer/ServerStatus"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
OBSERVER_HEALTH_NAME = "hubble.server.Observer"  # the service name hubble asks the health service about


def enum_names(enum_name: str, module: ModuleType = flow_pb2) -> dict[int, str]:
    """Number -> name for an enum of the generated modules."""
    return {v.number: v.name for v in module.DESCRIPTOR.enum_types_by_name[enum_name].values}
