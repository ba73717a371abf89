"""``tfo-agent check`` for Hubble: what ``hubble status`` does, with the seed's remedies.

The gRPC health ``Check`` for ``hubble.server.Observer`` first (a relay without the health service
is reported as such, not as a failure), then ``ServerStatus``. The channel is the one the agent
itself opens (``channel_security``): same address, TLS files and server name.
"""

from __future__ import annotations

from typing import Optional

import grpc

from agent.config import CiliumConfig, ConfigError
from agent.host import Check
from agent.hubble import channel_security, resolve_node_name
from agent.hubble.proto import HEALTH_CHECK, OBSERVER_HEALTH_NAME, SERVER_STATUS, health_pb2, observer_pb2

REFUSED = "Verify Hubble Relay is running"
TLS_FAILED = "Check TLS certificates"
NO_FLOWS = "Verify Cilium is the CNI"
TIMEOUT = 5.0
_TLS_SIGNS = ("tls", "ssl", "handshake", "certificate", "hostname verification")


def hubble_checks(cfg: CiliumConfig, timeout: float = TIMEOUT) -> list[Check]:
    """The ``hubble flows``, ``hubble relay`` and ``hubble status`` lines of ``tfo-agent check``."""
    node, source = resolve_node_name(cfg)
    scope = f"node scope as node {node!r} (from {source})" if cfg.flow_scope == "node" else "cluster scope"
    checks = [Check("hubble flows", "ok", f"{cfg.hubble_address}, {scope}")]
    try:
        credentials, options = channel_security(cfg)
    except ConfigError as exc:
        return [*checks, Check("hubble relay", "fail", str(exc), TLS_FAILED)]
    security = describe_security(cfg)
    if credentials is None:
        channel = grpc.insecure_channel(cfg.hubble_address, options=options)
    else:
        channel = grpc.secure_channel(cfg.hubble_address, credentials, options=options)
    with channel:
        try:
            health = _health(channel, timeout)
        except grpc.RpcError as exc:
            return [*checks, _unreachable(cfg, security, exc, timeout)]
        found = f"reachable at {cfg.hubble_address}, {security}, health service: {health}"
        if health not in ("SERVING", "not offered"):
            return [*checks, Check("hubble relay", "fail", found, REFUSED)]
        checks.append(Check("hubble relay", "ok", found))
        checks.append(_server_status(channel, timeout))
    return checks


def describe_security(cfg: CiliumConfig) -> str:
    """How the channel is secured, in words: plaintext, or the name TLS verifies and the client cert."""
    if cfg.hubble_address.startswith("unix://") or not cfg.hubble_tls_enabled:
        return "plaintext"
    name = cfg.hubble_tls_server_name or _host(cfg.hubble_address)
    ca = f"CA {cfg.hubble_tls_ca}" if cfg.hubble_tls_ca else "system CAs"
    client = ", client certificate presented" if cfg.hubble_tls_cert else ""
    return f"TLS verified against {name!r} ({ca}){client}"


def _host(address: str) -> str:
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]")


def _health(channel: grpc.Channel, timeout: float) -> str:
    """SERVING, another serving status, or "not offered" (no health service, or it does not know the name)."""
    check = channel.unary_unary(
        HEALTH_CHECK,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    try:
        resp = check(health_pb2.HealthCheckRequest(service=OBSERVER_HEALTH_NAME), timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
            return "not offered"
        raise
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _server_status(channel: grpc.Channel, timeout: float) -> Check:
    call = channel.unary_unary(
        SERVER_STATUS,
        request_serializer=observer_pb2.ServerStatusRequest.SerializeToString,
        response_deserializer=observer_pb2.ServerStatusResponse.FromString,
    )
    try:
        st = call(observer_pb2.ServerStatusRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return Check("hubble status", "warn", "the relay does not offer ServerStatus: flows not checked")
        return Check("hubble status", "fail", f"ServerStatus failed: {_why(exc)}", REFUSED)
    found = f"{st.seen_flows} flows seen, {st.num_flows}/{st.max_flows} flows buffered"
    if st.flows_rate:
        found += f", {st.flows_rate:.1f} flows/s"
    if st.HasField("num_connected_nodes"):
        found += f", {st.num_connected_nodes.value} nodes connected"
    if st.HasField("num_unavailable_nodes"):
        found += f", {st.num_unavailable_nodes.value} unavailable"
        if st.unavailable_nodes:
            found += f" ({', '.join(st.unavailable_nodes)})"
    if st.version:
        found += f", version {st.version}"
    if not st.seen_flows and not st.num_flows:
        return Check("hubble status", "fail", f"No flows received: {found}", NO_FLOWS)
    unavailable = st.num_unavailable_nodes.value if st.HasField("num_unavailable_nodes") else 0
    level = "warn" if unavailable else "ok"
    return Check("hubble status", level, found, REFUSED + " on the unavailable nodes" if unavailable else "")


def _unreachable(cfg: CiliumConfig, security: str, exc: grpc.RpcError, timeout: float) -> Check:
    """The failed first call, with the seed's remedy for what went wrong."""
    why = _why(exc)
    low = why.lower()
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        what, remedy = f"no answer within {timeout:g}s", REFUSED
    elif "refused" in low:
        what, remedy = "Connection refused", REFUSED
    elif "resolving" in low or "lookup" in low:
        what, remedy = "cannot resolve the host", f"{REFUSED} and hubble_address names it"
    elif any(sign in low for sign in _TLS_SIGNS):
        what, remedy = "TLS handshake failed", TLS_FAILED
    elif "socket closed" in low or "connection reset" in low:
        expect = "client certificate refused" if cfg.hubble_tls_enabled else "the relay expects TLS"
        what, remedy = f"connection closed during setup ({expect}?)", TLS_FAILED
    else:
        what, remedy = "unreachable", REFUSED
    return Check("hubble relay", "fail", f"{what}: {cfg.hubble_address} ({security}): {why}", remedy)


def _why(exc: grpc.RpcError) -> str:
    code: Optional[grpc.StatusCode] = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'error'}: {details}"
