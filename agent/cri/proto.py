"""The generated CRI modules (``runtime.v1``, from ``protos/runtime/api.proto``), built on first use
when missing, older than the .proto, or generated for another protobuf runtime.

The project's one proto builder (``agent/hubble/build_protos.py``) is loaded by path, so that this
does not import the Hubble integration (and its gRPC settings) when only the runtime is wanted.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType


def _builder() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "hubble" / "build_protos.py"
    spec = importlib.util.spec_from_file_location("tfo_build_protos", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(reason: str) -> None:
    builder = _builder()
    try:
        builder.build(builder.CRI.out, builder.CRI)
    except ImportError:
        raise ImportError(
            f"CRI protobuf modules are {reason}: run 'python agent/hubble/build_protos.py' (needs grpcio-tools)"
        ) from None
    importlib.invalidate_caches()


def _ensure() -> None:
    builder = _builder()
    if not builder.outdated(builder.CRI.out, tree=builder.CRI):
        return
    try:
        _build("missing or older than their .proto file")
    except (ImportError, OSError):
        if builder.outdated(builder.CRI.out, missing_only=True, tree=builder.CRI):
            raise
        # all there but older (a read-only install without the generator): use them as they are


_ensure()
try:
    api_pb2 = importlib.import_module("agent.cri.proto_gen.runtime.api_pb2")
except Exception:  # built by a newer protoc than this protobuf runtime: build now
    _build("generated for another protobuf runtime")
    api_pb2 = importlib.import_module("agent.cri.proto_gen.runtime.api_pb2")
api_pb2_grpc = importlib.import_module("agent.cri.proto_gen.runtime.api_pb2_grpc")
