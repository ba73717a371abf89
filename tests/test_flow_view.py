"""The decoding view (agent/hubble/flow_view.py) reads every recorded flow as the generated
messages do: its endpoint bytes decode to the same endpoints, and all else re-encodes the same."""

from __future__ import annotations

import pytest

from agent.hubble.flow_view import RAW_FIELDS, Endpoint, GetFlowsResponseView
from agent.hubble.proto import observer_pb2
from agent.hubble.replay import load_flows
from tests.conftest_hubble import FIXTURE_FILES, FIXTURES


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_the_view_reads_recorded_flows_as_the_generated_messages_do(name: str) -> None:
    flows = [m for m in load_flows(str(FIXTURES / name)) if m.HasField("flow")]
    assert flows
    for msg in flows:
        view = GetFlowsResponseView.FromString(msg.SerializeToString())
        rest = observer_pb2.GetFlowsResponse.FromString(view.SerializeToString())
        assert view.flow.l4 == msg.flow.l4 and view.flow.l7 == msg.flow.l7  # typed as they were
        for field in RAW_FIELDS:
            assert Endpoint.FromString(getattr(view.flow, field)) == getattr(msg.flow, field)
            msg.flow.ClearField(field)  # an empty endpoint is no bytes at all in the view
            rest.flow.ClearField(field)
        assert rest == msg
