"""What the replay relay serves besides GetFlows and ServerStatus, as Hubble Relay does.

- ``grpc.health.v1.Health``: ``Check`` (and ``Watch``) answer SERVING for the server as a whole
  (``""``) and for ``hubble.server.Observer``, the name ``hubble status`` asks about; any other
  name is NOT_FOUND (Watch: SERVICE_UNKNOWN), as the protocol says.
- ``GetNodes``: the recording's nodes, all connected, each with its number of recorded flows.
- ``GetNamespaces``: the namespaces of the recorded flows' endpoints, with their cluster.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import grpc

from agent.hubble.proto import OBSERVER_HEALTH_NAME, health_pb2, observer_pb2, relay_pb2

VERSION = "tfo-agent-replay"
Status = health_pb2.HealthCheckResponse.ServingStatus
_SERVED = ("", OBSERVER_HEALTH_NAME)


class HealthService:
    """grpc.health.v1.Health for a server whose only service is the Hubble observer."""

    def __init__(self, stopping: threading.Event) -> None:
        self.stopping = stopping

    def check(self, req: health_pb2.HealthCheckRequest, ctx: grpc.ServicerContext) -> Any:
        if req.service not in _SERVED:
            ctx.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {req.service!r}")
        return health_pb2.HealthCheckResponse(status=Status.Value("SERVING"))

    def watch(self, req: health_pb2.HealthCheckRequest, ctx: grpc.ServicerContext) -> Iterator[Any]:
        status = "SERVING" if req.service in _SERVED else "SERVICE_UNKNOWN"
        yield health_pb2.HealthCheckResponse(status=Status.Value(status))
        while ctx.is_active() and not self.stopping.is_set():
            time.sleep(0.05)  # the status never changes while the relay runs

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler serving ``grpc.health.v1.Health``."""
        request = health_pb2.HealthCheckRequest.FromString
        response = health_pb2.HealthCheckResponse.SerializeToString
        return grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.check, request_deserializer=request, response_serializer=response
                ),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    self.watch, request_deserializer=request, response_serializer=response
                ),
            },
        )


class Inventory:
    """GetNodes and GetNamespaces over the recorded messages (``(message, node)`` pairs).

    ``flows``: node -> recorded flows. A flow's namespaces are listed with the endpoint's
    ``cluster_name``, else the cluster part of a relay's ``cluster/node`` name, else "".
    """

    def __init__(self, recorded: Iterable[tuple[observer_pb2.GetFlowsResponse, str]], uptime_ns: Callable[[], int]):
        self.uptime_ns = uptime_ns
        self.flows: Counter[str] = Counter()
        namespaces: set[tuple[str, str]] = set()
        for msg, node in recorded:
            is_flow = msg.WhichOneof("response_types") == "flow"
            if node:
                self.flows[node] += is_flow  # a node seen only in notices is listed with 0 flows
            if not is_flow:
                continue
            node_cluster = node.rpartition("/")[0]
            for ep in (msg.flow.source, msg.flow.destination):
                if ep.namespace:
                    namespaces.add((ep.cluster_name or node_cluster, ep.namespace))
        self.namespaces = sorted(namespaces)

    def get_nodes(self, _req: observer_pb2.GetNodesRequest, _ctx: grpc.ServicerContext) -> Any:
        uptime = self.uptime_ns()
        connected = relay_pb2.NodeState.Value("NODE_CONNECTED")
        return observer_pb2.GetNodesResponse(
            nodes=[
                observer_pb2.Node(
                    name=name,
                    version=VERSION,
                    state=connected,
                    uptime_ns=uptime,
                    num_flows=count,
                    max_flows=count,
                    seen_flows=count,
                )
                for name, count in sorted(self.flows.items())
            ]
        )

    def get_namespaces(self, _req: observer_pb2.GetNamespacesRequest, _ctx: grpc.ServicerContext) -> Any:
        return observer_pb2.GetNamespacesResponse(
            namespaces=[observer_pb2.Namespace(cluster=c, namespace=ns) for c, ns in self.namespaces]
        )

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The observer.Observer method handlers for GetNodes and GetNamespaces."""
        return {
            "GetNodes": grpc.unary_unary_rpc_method_handler(
                self.get_nodes,
                request_deserializer=observer_pb2.GetNodesRequest.FromString,
                response_serializer=observer_pb2.GetNodesResponse.SerializeToString,
            ),
            "GetNamespaces": grpc.unary_unary_rpc_method_handler(
                self.get_namespaces,
                request_deserializer=observer_pb2.GetNamespacesRequest.FromString,
                response_serializer=observer_pb2.GetNamespacesResponse.SerializeToString,
            ),
        }
