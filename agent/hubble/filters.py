"""GetFlowsRequest filtering and field-mask checking as Hubble does them, for the replay relay.

Implemented ``FlowFilter`` fields: ``node_name``, ``source_pod``/``destination_pod`` (``ns/`` and
``ns/pod-prefix``), ``verdict``. Other fields are accepted and ignored (they do not narrow the match).
Within one filter every implemented field that is set must match (values of one field are
alternatives); a flow passes the whitelist when one filter matches and is removed by the blacklist
when one filter matches. A ``field_mask`` path must name a field of ``flow.Flow`` (through singular
messages only), as Hubble's ``FieldMask.IsValid`` requires; the paths come from the proto descriptor.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Optional

from google.protobuf.field_mask_pb2 import FieldMask

from agent.hubble.proto import flow_pb2


@lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    # '*' spans any characters but '.', so "*.domain.com" matches one DNS label, "k8s*" a prefix.
    return re.compile("".join("[^.]*" if ch == "*" else re.escape(ch) for ch in pattern) + r"\Z")


def node_matches(pattern: str, node: str) -> bool:
    """Cilium node-name patterns: ``name``, ``prefix*``, ``cluster/name``, ``cluster/`` (whole cluster).

    Node names from a relay are ``cluster/node``; a pattern without ``/`` matches the node part in
    any cluster, and a bare node name (older Cilium) has no cluster part.
    """
    cluster, _, name = node.rpartition("/")
    if "/" in pattern:
        pat_cluster, _, pat_name = pattern.partition("/")
        if not _glob(pat_cluster).match(cluster):
            return False
        return not pat_name or bool(_glob(pat_name).match(name))
    return bool(_glob(pattern).match(name))


def _pod_matches(patterns: Sequence[str], ep: flow_pb2.Endpoint) -> bool:
    for pat in patterns:
        ns, sep, prefix = pat.rpartition("/")
        if sep and ns != ep.namespace:
            continue
        if ep.pod_name.startswith(prefix) and (prefix or sep):
            return True
    return False


def filter_matches(flt: flow_pb2.FlowFilter, flow: flow_pb2.Flow, node: str) -> bool:
    """True when ``flow`` (seen on ``node``) satisfies every implemented field of ``flt``."""
    if flt.node_name and not any(node_matches(p, node) for p in flt.node_name):
        return False
    if flt.verdict and flow.verdict not in flt.verdict:
        return False
    if flt.source_pod and not _pod_matches(flt.source_pod, flow.source):
        return False
    return not (flt.destination_pod and not _pod_matches(flt.destination_pod, flow.destination))


def request_selects(
    whitelist: Sequence[flow_pb2.FlowFilter], blacklist: Sequence[flow_pb2.FlowFilter], flow: flow_pb2.Flow, node: str
) -> bool:
    """Whitelist minus blacklist, as GetFlows applies them."""
    if whitelist and not any(filter_matches(f, flow, node) for f in whitelist):
        return False
    return not any(filter_matches(f, flow, node) for f in blacklist)


def invalid_mask_path(paths: Sequence[str]) -> Optional[str]:
    """The first ``field_mask`` path that names no field of ``flow.Flow``, else None."""
    for path in paths:
        if not FieldMask(paths=[path]).IsValidForDescriptor(flow_pb2.Flow.DESCRIPTOR):
            return path
    return None
