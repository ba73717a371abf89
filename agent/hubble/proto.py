"""The generated Hubble API modules (see ``build_protos``), built on first use when missing."""

from __future__ import annotations

import importlib
from types import ModuleType


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"agent.hubble.proto_gen.{name}")


try:
    flow_pb2 = _load("flow.flow_pb2")
except ImportError:  # a source checkout that skipped the build step: build now, once
    from agent.hubble.build_protos import build

    try:
        build()
    except ImportError:
        raise ImportError(
            "Hubble protobuf modules are missing: run 'python -m agent.hubble.build_protos' (needs grpcio-tools)"
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
