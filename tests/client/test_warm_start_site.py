"""A deployed hospital and a run that starts from an adapter (`init_adapter`), attacked the way a
dishonest coordinator would: an unpinned adapter, other content under the pinned path, other
weights sent as the first global adapter. Each is refused before any record is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from site_fixtures import LABELS, hospital_node_config, run_config, write_notes, write_policy

from fedward.client.app import handle_train, load_site_data, open_site
from fedward.client.privacy.ledger import PrivacyLedger
from fedward.common.model import build_model, get_adapter_arrays, save_adapter
from fedward.common.protocol import wire
from fedward.common.protocol.reasons import Reason
from fedward.common.warm_start import adapter_content_hash

pytestmark = pytest.mark.usefixtures("inside_a_flower_app")


@pytest.fixture
def hospital(tmp_path, tiny_model_dir):
    """A hospital's files, a starting adapter on its disk, and a run that starts from it."""
    data = tmp_path / "notes.csv"
    write_notes(data)
    public = run_config(tiny_model_dir, rounds=2).updated(lora_variant="lora", seed=3)
    model = build_model(public.spec, len(LABELS))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.25)
    adapter = save_adapter(
        model, tmp_path / "public-adapter", LABELS, public.spec.task, public.spec.model
    )
    node_config = hospital_node_config(data, tmp_path / "policy.toml", tmp_path)
    config = run_config(tiny_model_dir, rounds=2).updated(
        lora_variant="lora", init_adapter=str(adapter)
    )
    return config, node_config, adapter, tmp_path


def _train(config, node_config, arrays, server_round=1) -> Message:
    content = RecordDict(
        {
            wire.ARRAYS: wire.arrays_to_record(arrays),
            wire.CONFIG: wire.round_config(config.spec, server_round, "run-a"),
        }
    )
    message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)
    context = Context(
        run_id=11, node_id=7, node_config=node_config, state=RecordDict(), run_config={}
    )
    return handle_train(message, context, load_site_data, open_site)


def _starting_arrays(config) -> dict:
    """What an honest coordinator sends first: the adapter as `build_model` loads it."""
    return get_adapter_arrays(build_model(config.spec, len(LABELS)))


def _reason(reply: Message) -> Reason:
    return Reason.from_record(dict(reply.content[wire.REFUSAL]))


def _audit(node_config) -> list[dict]:
    lines = Path(node_config["audit-log"]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _without_data(node_config, tmp_path) -> dict:
    """The data file does not exist: a refusal that came after reading it would be a DataError."""
    return {**node_config, "data-path": str(tmp_path / "does-not-exist.csv")}


def test_a_run_from_an_unpinned_adapter_is_refused_before_any_record_is_read(hospital):
    config, node_config, _, tmp_path = hospital
    write_policy(Path(node_config["policy"]))  # pins the model, no starting adapter
    reply = _train(config, _without_data(node_config, tmp_path), _starting_arrays(config))
    reason = _reason(reply)
    assert reason.code == "policy.rules" and reason.params["rules"] == "allowed_adapter_hashes"
    assert wire.ARRAYS not in reply.content
    assert [record["kind"] for record in _audit(node_config)] == ["refusal"]


def test_a_pinned_adapter_trains_and_the_audit_record_names_its_content(hospital):
    config, node_config, adapter, _ = hospital
    pinned = adapter_content_hash(adapter)
    write_policy(Path(node_config["policy"]), allowed_adapter_hashes=[pinned])
    reply = _train(config, node_config, _starting_arrays(config))
    assert wire.REFUSAL not in reply.content
    train = [r for r in _audit(node_config) if r["kind"] == "train"][-1]["fields"]
    assert train["init_adapter_sha256"] == pinned
    assert PrivacyLedger.open(node_config["ledger"], "st-mary").rounds_recorded("run-a") == [1]


@pytest.mark.parametrize("alteration", ["weights", "label names"])
def test_other_content_under_the_pinned_path_is_refused(hospital, alteration):
    """The coordinator (or whoever ships the folder) swaps the adapter under the same name."""
    config, node_config, adapter, tmp_path = hospital
    write_policy(
        Path(node_config["policy"]), allowed_adapter_hashes=[adapter_content_hash(adapter)]
    )
    if alteration == "weights":
        from safetensors.torch import load_file, save_file

        weights = load_file(adapter / "adapter_model.safetensors")
        name = next(iter(weights))
        weights[name] = weights[name] + 1.0
        save_file(weights, adapter / "adapter_model.safetensors")
    else:  # same bytes of weights, two labels' rows swapped by renaming them
        meta = json.loads((adapter / "fedward.json").read_text())
        meta["labels"] = list(reversed(meta["labels"]))
        (adapter / "fedward.json").write_text(json.dumps(meta))
    reply = _train(config, _without_data(node_config, tmp_path), _starting_arrays(config))
    reason = _reason(reply)
    assert reason.code == "policy.rules" and reason.params["rules"] == "allowed_adapter_hashes"


@pytest.mark.parametrize("sent", ["fresh adapter", "one head value changed"])
def test_a_first_round_from_other_weights_than_the_pinned_adapter_is_refused(hospital, sent):
    """The files on the hospital's disk are the pinned ones, but the coordinator sends other
    starting weights in round 1: refused before any record is read, nothing spent."""
    config, node_config, adapter, tmp_path = hospital
    write_policy(
        Path(node_config["policy"]), allowed_adapter_hashes=[adapter_content_hash(adapter)]
    )
    if sent == "fresh adapter":
        arrays = get_adapter_arrays(build_model(config.updated(init_adapter="").spec, 2))
    else:
        arrays = _starting_arrays(config)
        head = next(
            name for name in arrays if name.endswith("classifier.modules_to_save.default.bias")
        )
        arrays[head] = arrays[head] + 1e-3
    reply = _train(config, _without_data(node_config, tmp_path), arrays)
    assert _reason(reply).code == "model.start_mismatch"
    assert wire.ARRAYS not in reply.content
    assert PrivacyLedger.open(node_config["ledger"], "st-mary").rounds_recorded("run-a") == []


def test_a_hospital_first_asked_at_a_later_round_checks_the_pin_there(hospital):
    """Issue 40, 5: the check ran only in round 1, so a coordinator that first asked a hospital
    at round 2 started it from other weights unchecked. Now the pin is checked at the data
    set's first round of the run, whatever its number; from the next one on, the global
    adapter is the coordinator's average and is not checked."""
    config, node_config, adapter, _ = hospital
    write_policy(
        Path(node_config["policy"]), allowed_adapter_hashes=[adapter_content_hash(adapter)]
    )
    config = config.updated(rounds=3)
    other = get_adapter_arrays(build_model(config.updated(init_adapter="").spec, 2))
    reply = _train(config, node_config, other, server_round=2)
    assert _reason(reply).code == "model.start_mismatch"
    assert PrivacyLedger.open(node_config["ledger"], "st-mary").entries == []  # nothing spent
    reply = _train(config, node_config, _starting_arrays(config), server_round=2)
    assert wire.REFUSAL not in reply.content
    reply = _train(config, node_config, other, server_round=3)  # an average, as far as it knows
    assert wire.REFUSAL not in reply.content
    assert PrivacyLedger.open(node_config["ledger"], "st-mary").rounds_recorded("run-a") == [2, 3]
