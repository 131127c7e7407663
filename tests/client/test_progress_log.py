"""A deployed hospital's progress within a round goes to its own log (issue 41, item 5): the
stage and the epoch, never a record."""

from __future__ import annotations

import logging

import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from site_fixtures import LABELS, WORDS, hospital_node_config, run_config, write_notes, write_policy

from fedward.client.app import handle_train, load_site_data, open_site
from fedward.common.model import build_model, get_adapter_arrays
from fedward.common.protocol import wire

pytestmark = pytest.mark.usefixtures("inside_a_flower_app")


def test_a_deployed_hospital_logs_each_epoch_of_its_round(tmp_path, tiny_model_dir, caplog):
    data = tmp_path / "notes.csv"
    write_notes(data, ("text", "label", "mrn"))
    node_config = hospital_node_config(data, tmp_path / "policy.toml", tmp_path)
    write_policy(tmp_path / "policy.toml")
    config = run_config(tiny_model_dir, rounds=2).updated(local_epochs=2)
    arrays = get_adapter_arrays(build_model(config.spec, len(LABELS)))
    content = RecordDict(
        {
            wire.ARRAYS: wire.arrays_to_record(arrays),
            wire.CONFIG: wire.round_config(config.spec, 1, "run-a"),
        }
    )
    message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)
    context = Context(
        run_id=11, node_id=7, node_config=node_config, state=RecordDict(), run_config={}
    )
    with caplog.at_level(logging.INFO, logger="fedward.client.app"):
        reply = handle_train(message, context, load_site_data, open_site)
    assert wire.REFUSAL not in reply.content
    logged = [r.getMessage() for r in caplog.records if r.name == "fedward.client.app"]
    assert "st-mary: round 1: epoch 1/2" in logged and "st-mary: round 1: epoch 2/2" in logged
    assert not any(words in line for line in logged for words in WORDS.values())
