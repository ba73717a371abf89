"""The generated Hubble API modules (see ``build_protos``), built on first use when missing or
generated for another protobuf runtime (which refuses gencode newer than itself)."""

from __future__ import annotations

import importlib
from types import ModuleType


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"agent.hubble.proto_gen.{name}")


try:
    flow_pb2 = _load("flow.flow_pb2")
except Exception:  # not built yet, or built by a newer protoc than this protobuf runtime: build now
    from agent.hubble.build_protos import build

    try:
        build()
    except ImportError:
        raise ImportError(
            "Hubble protobuf modules are missing: run 'python agent/hubble/build_protos.py' (needs grpcio-tools)"
        ) from None
    importlib.invalidate_caches()
    flow_pb2 = _load("flow.flow_pb2")

observer_pb2 = _load("observer.observer_pb2")
relay_pb2 = _load("relay.relay_pb2")

GET_FLOWS = "/observer.Observer/GetFlows"
SERVER_STATUS = "/observer.Observer/ServerStatus"


def enum_names(enum_name: str, module: ModuleType = flow_pb2) -> dict[int, str]:
    """Number -> name for an enum of the generated modules."""
    return {v.number: v.name for v in module.DESCRIPTOR.enum_types_by_name[enum_name].values}
