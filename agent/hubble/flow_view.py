"""A decoding view of ``GetFlowsResponse`` whose flow keeps its two endpoints as raw bytes.

A submessage and a ``bytes`` field look the same on the wire, so the view, derived at import from
the generated descriptors (same field numbers, nothing to keep in sync by hand), decodes the same
messages. Flows between the same two endpoints carry the same endpoint bytes, so the aggregator
reads an endpoint pair once and looks up what it derived from it after that.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from agent.hubble.proto import flow_pb2, observer_pb2

RAW_FIELDS = ("source", "destination")  # Flow fields the view keeps as bytes
PACKAGE = "tfo_agent.hubble.view"


def _message(file: descriptor_pb2.FileDescriptorProto, name: str) -> descriptor_pb2.DescriptorProto:
    return next(m for m in file.message_type if m.name == name)


def _build() -> type:
    flow_file, observer_file = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
    flow_pb2.DESCRIPTOR.CopyToProto(flow_file)
    observer_pb2.DESCRIPTOR.CopyToProto(observer_file)
    view = descriptor_pb2.FileDescriptorProto(
        name="tfo_agent/hubble/flow_view.proto", package=PACKAGE, syntax="proto3",
        dependency=sorted({observer_pb2.DESCRIPTOR.name, *observer_file.dependency, *flow_file.dependency}),
    )  # fmt: skip
    flow = view.message_type.add()
    flow.CopyFrom(_message(flow_file, "Flow"))
    flow.name = "FlowView"
    for fld in flow.field:
        if fld.name in RAW_FIELDS:
            fld.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            fld.ClearField("type_name")
    response = view.message_type.add()
    response.CopyFrom(_message(observer_file, "GetFlowsResponse"))
    response.name = "GetFlowsResponseView"
    next(f for f in response.field if f.name == "flow").type_name = f".{PACKAGE}.FlowView"
    pool = descriptor_pool.Default()
    pool.AddSerializedFile(view.SerializeToString())
    descriptor = pool.FindMessageTypeByName(f"{PACKAGE}.GetFlowsResponseView")
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(pool).GetPrototype(descriptor)  # protobuf < 4.22 (Debian 12)


GetFlowsResponseView = _build()
Endpoint = flow_pb2.Endpoint  # what the raw endpoint bytes decode into
