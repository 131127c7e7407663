"""Evaluate-only runs in a deployment (issue 41, item 9), attacked the way a dishonest coordinator
would: round 0 of an evaluate request scores the run's starting adapter alone, nothing trained.

The hospital answers only where its policy says so (`allow_evaluation` and
`evaluate_starting_adapter`), with noised counts charged to its ledger before any record is read,
once a run; the adapter must be the starting one it built from its own pinned files; and a run it
evaluated this way trains nothing there. The coordinator's side is the real `run_federation` over
the hospitals' real handlers (real data file, policy, ledger, audit log, tiny model).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from site_fixtures import LABELS, hospital_node_config, run_config, write_notes, write_policy

from fedward.client.app import handle_evaluate, handle_train, load_site_data, open_site
from fedward.client.privacy.ledger import PrivacyLedger
from fedward.client.site import START_EVALUATION_KEY, START_ROUND
from fedward.common.model import build_model, get_adapter_arrays
from fedward.common.protocol import wire
from fedward.common.protocol.reasons import Reason
from fedward.server.app import run_federation

pytestmark = pytest.mark.usefixtures("inside_a_flower_app")

EVALUATE_ONLY = {"allow_evaluation": True, "evaluate_starting_adapter": True}


@pytest.fixture
def hospital(tmp_path, tiny_model_dir):
    data = tmp_path / "notes.csv"
    write_notes(data, ("text", "label", "mrn"))
    node_config = hospital_node_config(data, tmp_path / "policy.toml", tmp_path)
    write_policy(tmp_path / "policy.toml")
    config = run_config(tiny_model_dir, rounds=2).updated(
        evaluate_only=True, out=str(tmp_path / "coordinator")
    )
    return config, node_config, tmp_path


def _context(node_config: dict) -> Context:
    return Context(run_id=11, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _message(config, arrays, kind, server_round, run_id) -> Message:
    content = RecordDict(
        {
            wire.ARRAYS: wire.arrays_to_record(arrays),
            wire.CONFIG: wire.round_config(config.spec, server_round, run_id),
        }
    )
    return Message(content=content, message_type=kind, dst_node_id=7)


def _evaluate(config, node_config, arrays=None, run_id="run-a") -> Message:
    arrays = _starting_arrays(config) if arrays is None else arrays
    message = _message(config, arrays, MessageType.EVALUATE, START_ROUND, run_id)
    return handle_evaluate(message, _context(node_config), load_site_data, open_site)


def _train(config, node_config, run_id="run-a") -> Message:
    message = _message(config, _starting_arrays(config), MessageType.TRAIN, 1, run_id)
    return handle_train(message, _context(node_config), load_site_data, open_site)


def _starting_arrays(config) -> dict:
    return get_adapter_arrays(build_model(config.spec, len(LABELS)))


def _reason(reply: Message) -> Reason:
    assert wire.REFUSAL in reply.content, dict(reply.content)
    return Reason.from_record(reply.content[wire.REFUSAL])


def _ledger(node_config) -> PrivacyLedger:
    return PrivacyLedger.open(node_config["ledger"], node_config["dataset-id"])


def _spent(node_config) -> float:
    return _ledger(node_config).epsilon_spent(1e-5)


def test_an_evaluate_only_run_is_refused_where_the_policy_forbids_it(hospital):
    """Evaluation off (the default), or on for trained rounds only: refused with the policy's
    reason, before anything is charged."""
    config, node_config, tmp_path = hospital
    assert _reason(_evaluate(config, node_config)).code == "evaluation.not_allowed"
    write_policy(tmp_path / "policy.toml", allow_evaluation=True)
    reply = _evaluate(config, node_config)
    assert _reason(reply).code == "evaluation.start_not_allowed"
    assert wire.METRICS not in reply.content
    assert _ledger(node_config).entries == []


def test_each_evaluate_only_run_is_charged_and_answered_once(hospital):
    config, node_config, tmp_path = hospital
    write_policy(tmp_path / "policy.toml", evaluation_epsilon=0.5, **EVALUATE_ONLY)
    reply = _evaluate(config, node_config)
    released = dict(reply.content[wire.METRICS])
    assert released["num-examples"] != 8  # the validation split has 8: what left was noised
    first = _spent(node_config)
    assert first > 0  # charged
    assert _ledger(node_config).rounds_recorded("run-a" + START_EVALUATION_KEY) == [1]

    # the same run again: refused, nothing more charged
    again = _evaluate(config, node_config)
    assert _reason(again) == Reason("evaluation.repeated", {"round": 0})
    assert _spent(node_config) == first

    # a new run id is a new release, charged again
    assert wire.METRICS in _evaluate(config, node_config, run_id="run-b").content
    assert _spent(node_config) > first


def test_an_evaluate_only_run_cannot_score_an_arbitrary_adapter(hospital):
    """Round 0 scores the starting adapter the hospital builds itself; any other adapter is
    refused before anything is read or charged."""
    config, node_config, tmp_path = hospital
    write_policy(tmp_path / "policy.toml", **EVALUATE_ONLY)
    starting = _starting_arrays(config)
    crafted = {name: np.random.default_rng(1).normal(size=a.shape) for name, a in starting.items()}
    reply = _evaluate(config, node_config, crafted)
    assert _reason(reply).code == "model.start_mismatch"
    assert _ledger(node_config).entries == []


def test_an_evaluate_only_run_is_refused_when_the_budget_is_short(hospital):
    config, node_config, tmp_path = hospital
    write_policy(
        tmp_path / "policy.toml", evaluation_epsilon=10.0, lifetime_epsilon=6.0, **EVALUATE_ONLY
    )
    reply = _evaluate(config, node_config)
    assert _reason(reply).code == "evaluation.budget"
    assert wire.METRICS not in reply.content


def test_a_run_evaluated_alone_trains_nothing_at_the_hospital(hospital):
    config, node_config, tmp_path = hospital
    write_policy(tmp_path / "policy.toml", **EVALUATE_ONLY)
    assert wire.METRICS in _evaluate(config, node_config).content
    reply = _train(config, node_config)
    assert _reason(reply).code == "run.evaluate_only"
    assert wire.ARRAYS not in reply.content
    assert _ledger(node_config).rounds_recorded("run-a") == []


class HospitalsGrid:
    """The Flower grid of a deployment, played in process: each message goes to the real
    handler of the hospital it names, and every message type sent is kept."""

    def __init__(self, node_configs: dict[int, dict]) -> None:
        self.contexts = {node: _context(nc) for node, nc in node_configs.items()}
        self.sent: list[str] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        handlers = {MessageType.TRAIN: handle_train, MessageType.EVALUATE: handle_evaluate}
        replies = []
        for message in messages:
            self.sent.append(message.metadata.message_type)
            handler = handlers[message.metadata.message_type]
            context = self.contexts[message.metadata.dst_node_id]
            replies.append(handler(message, context, load_site_data, open_site))
        return replies


def test_a_deployed_evaluate_only_run_sends_no_training_and_records_the_charged_release(hospital):
    config, node_config, tmp_path = hospital
    write_policy(tmp_path / "policy.toml", **EVALUATE_ONLY)
    grid = HospitalsGrid({7: node_config})
    result = run_federation(grid, config, 42)

    assert grid.sent == [MessageType.EVALUATE]  # no train message, no secure-aggregation stage
    (row,) = result.rounds
    assert (row["round"], row["status"]) == (0, "evaluated")
    assert row["hospitals"]["st-mary"]["num_examples"] != 8  # the noised release
    assert not (Path(config.local.out) / "adapter").exists()
    assert _spent(node_config) > 0
    hospital_audit = [
        json.loads(line)
        for line in Path(node_config["audit-log"]).read_text(encoding="utf-8").splitlines()
    ]
    assert [r["kind"] for r in hospital_audit] == ["evaluation"]
