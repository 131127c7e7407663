"""A request that lacks a record a stage reads is refused like any bad request: a reason code
leaves, the full story goes to the hospital's own log, and nothing is read or spent. Before, a
train or evaluate request without its config record, or a SecAgg+ stage without its payload,
raised out of the handler (the coordinator got Flower's error instead of fedward's refusal, and
the hospital's log had no refusal line).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from site_fixtures import hospital_node_config, write_notes, write_policy

from fedward.client.app import handle_evaluate, handle_train, load_site_data, open_site
from fedward.client.secagg.stages import handle_secagg_stage
from fedward.common.protocol import wire
from fedward.common.protocol.reasons import Reason
from fedward.common.secagg import SHARE_KEYS

pytestmark = pytest.mark.usefixtures("inside_a_flower_app")


@pytest.fixture
def node_config(tmp_path):
    data = tmp_path / "notes.csv"
    write_notes(data)
    write_policy(tmp_path / "policy.toml")
    return hospital_node_config(data, tmp_path / "policy.toml", tmp_path)


def _context(node_config: dict) -> Context:
    return Context(run_id=11, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _without_config(kind: str) -> Message:
    arrays = {"adapter": np.zeros(4, dtype=np.float32)}
    content = RecordDict({wire.ARRAYS: wire.arrays_to_record(arrays)})
    return Message(content=content, message_type=kind, dst_node_id=7)


def _reason(reply: Message) -> Reason:
    assert wire.REFUSAL in reply.content, dict(reply.content)
    return Reason.from_record(reply.content[wire.REFUSAL])


@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
def test_a_request_without_its_config_record_is_refused_and_spends_nothing(
    node_config, tmp_path, kind, caplog
):
    handler = handle_train if kind == MessageType.TRAIN else handle_evaluate
    with caplog.at_level(logging.WARNING):
        reply = handler(_without_config(kind), _context(node_config), load_site_data, open_site)
    assert _reason(reply).code == "config.invalid"
    assert "run spec is invalid" in caplog.text  # the hospital's own log says why
    assert not (tmp_path / "ledger").exists() or not any((tmp_path / "ledger").rglob("*.json*"))


def test_a_secagg_stage_without_its_payload_is_refused(node_config, caplog):
    message = Message(content=RecordDict({}), message_type=MessageType.TRAIN, dst_node_id=7)
    with caplog.at_level(logging.WARNING):
        reply = handle_secagg_stage(message, _context(node_config), SHARE_KEYS)
    assert _reason(reply).code.startswith("secagg.")
    assert "no secure-aggregation round in progress" in caplog.text
