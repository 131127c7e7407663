"""A hospital's own model (client/personalize.py): chosen on a fold of its own patients, scored
on its validation notes, kept at home, and never in a message.

The attack: a coordinator that would like the hospital's own (not DP) model, or any figure of
it, to reach it. The hospital's replies must be the same with the own model on and off, and
nothing of the own adapter may travel.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from site_fixtures import LABELS, WORDS, run_config, write_policy

from fedward.client.app import (
    HospitalData,
    handle_evaluate,
    handle_train,
    load_site_data,
    open_site,
    own_model,
)
from fedward.client.model_cache import cached_model, initial_arrays
from fedward.client.personalize import HomeRecipe, choose_own, home_folds, resample_scorer
from fedward.common.data import Record
from fedward.common.model import get_adapter_arrays
from fedward.common.protocol import wire
from fedward.common.tasks import task_named

#: Small enough for a test, and still a real choice between candidates.
RECIPE = HomeRecipe(
    head_learning_rates=(3e-2,), pulls=(0.0, 1.0), mixes=(0.5,), max_epochs=15, patience=4
)


def _notes(count: int, offset: int = 0) -> list[Record]:
    """Notes of the two labels, three per patient (a patient's notes share its label)."""
    return [
        Record(
            f"note {i}: {WORDS[LABELS[(i // 3) % 2]]}",
            LABELS[(i // 3) % 2],
            patient=f"p{(i + offset) // 3}",
        )
        for i in range(offset, offset + count)
    ]


@pytest.fixture
def hospital(tiny_model_dir, fresh_prefix_caches):
    config = run_config(tiny_model_dir, rounds=1).updated(dp_unit="patient", seed=3)
    data = HospitalData("st-mary", _notes(120), _notes(30, offset=300))
    return config, data


def test_a_useless_global_model_is_not_what_the_hospital_keeps(hospital):
    config, data = hospital
    fresh = initial_arrays(config.spec.model, config.spec.task, config.spec.training.seed)
    rng = np.random.default_rng(0)
    crafted = {name: 5 * rng.normal(size=a.shape).astype(a.dtype) for name, a in fresh.items()}
    own = own_model(data, config, crafted, RECIPE)
    report = own.report
    assert report.own_method != "global"
    assert report.alone > report.global_  # the two kinds of notes are easy apart, alone
    assert report.own >= report.alone - 0.01
    assert report.validation_examples == len(data.val)
    assert set(report.selection) == {
        "alone",
        "global",
        "fine-tune (pull 0)",
        "fine-tune (pull 1)",
        "mix (0.5 alone)",
    }
    assert not all(np.array_equal(own.arrays[name], crafted[name]) for name in crafted)


@pytest.mark.parametrize(
    ("right", "kept"),
    [
        # right on 52 of 60 notes where alone is right on 50: no better beyond the notes' noise
        ({"alone": 50, "global": 52}, "alone"),
        # right on 57 of 60: clearly better, in nearly every resample of the notes
        ({"alone": 50, "global": 45, "fine-tune (pull 0)": 57}, "fine-tune (pull 0)"),
        # a tie between the global model and its fine-tuned form keeps it untouched
        ({"alone": 40, "global": 57, "fine-tune (pull 0)": 57}, "global"),
    ],
)
def test_the_own_model_is_alone_unless_joining_clearly_pays_on_the_validation_notes(right, kept):
    truth = [0] * 60
    predicted = {name: [0] * count + [1] * (60 - count) for name, count in right.items()}
    for name in predicted:  # each candidate wrong on different notes, as real ones are
        predicted[name] = predicted[name][-len(name) :] + predicted[name][: -len(name)]
    score = resample_scorer(task_named("classification"), truth, predicted, LABELS)
    chosen = choose_own(list(predicted), list(range(60)), score, HomeRecipe(), seed=0)
    assert chosen == kept


def test_the_validation_folds_hold_whole_patients_and_every_label(hospital):
    _, data = hospital
    folds = home_folds(data.train, 5, seed=0)
    assert sorted(i for fold in folds for i in fold) == list(range(len(data.train)))
    sizes = [len(fold) for fold in folds]
    assert max(sizes) - min(sizes) <= 3  # dealt in turn: a patient's three notes at most apart
    for fold in folds:
        patients = {data.train[i].patient for i in fold}
        assert all(
            data.train[i].patient not in patients for i in set(range(len(data.train))) - set(fold)
        )
        assert {data.train[i].label for i in fold} == set(LABELS)


# --- deployed: kept at home, never sent --------------------------------------------------------


def _node(folder: Path, own: bool) -> dict:
    folder.mkdir(parents=True)
    with open(folder / "notes.csv", "w", encoding="utf-8") as handle:
        handle.write("text,label,patient\n")
        for record in _notes(60):
            handle.write(f"{record.text},{record.label},{record.patient}\n")
    write_policy(
        folder / "policy.toml", lifetime_epsilon=60.0, max_rounds=50, allow_evaluation=True
    )
    return {
        "data-path": str(folder / "notes.csv"),
        "policy": str(folder / "policy.toml"),
        "ledger": str(folder / "ledger"),
        "hospital-name": "st-mary",
        "dataset-id": "icu-notes",
        "patient-column": "patient",
        "device": "cpu",
        "own-model": own,
    }


def _play(node_config: dict, config) -> list[Message]:
    arrays = get_adapter_arrays(
        cached_model(config.spec.model, config.spec.task, config.spec.training.seed)
    )
    replies = []
    for kind, handler in (
        (MessageType.TRAIN, handle_train),
        (MessageType.EVALUATE, handle_evaluate),
    ):
        content = RecordDict(
            {
                wire.ARRAYS: wire.arrays_to_record(arrays),
                wire.CONFIG: wire.round_config(config.spec, 1, "run-1"),
            }
        )
        message = Message(content=content, message_type=kind, dst_node_id=7)
        context = Context(
            run_id=11, node_id=7, node_config=node_config, state=RecordDict(), run_config={}
        )
        replies.append(handler(message, context, load_site_data, open_site))
    return replies


def test_a_deployed_hospital_keeps_its_own_model_at_home_and_sends_none_of_it(
    tmp_path, tiny_model_dir, inside_a_flower_app, fresh_prefix_caches
):
    config = run_config(tiny_model_dir, rounds=1).updated(dp_unit="patient", batch_size=4)
    with_own = _play(_node(tmp_path / "on", own=True), config)
    without = _play(_node(tmp_path / "off", own=False), config)

    folder = tmp_path / "on" / "ledger" / "own" / "icu-notes" / "run-1"
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    assert {"alone", "global", "own", "gain", "own_method"} <= set(report)
    assert (folder / "adapter" / "adapter_config.json").is_file()
    for path in (folder, folder / "adapter", *(folder / "adapter").iterdir()):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path  # the hospital's only
    assert not (tmp_path / "off" / "ledger" / "own").exists()
    audit = (tmp_path / "on" / "ledger" / "audit.jsonl").read_text(encoding="utf-8")
    assert '"own_model"' in audit

    # The replies: the same keys either way, no figure of the own model among them, and no
    # tensor of the own adapter in any of them (the trained update is the DP one).
    from safetensors.numpy import load_file

    own_arrays = list(load_file(folder / "adapter" / "adapter_model.safetensors").values())
    for on, off in zip(with_own, without, strict=True):
        assert sorted(on.content.keys()) == sorted(off.content.keys())
        for key, record in on.content.items():
            assert sorted(record.keys()) == sorted(off.content[key].keys()), key
            if isinstance(record, ArrayRecord):
                for array in record.values():
                    sent = array.numpy()
                    assert not any(
                        own.shape == sent.shape and np.allclose(own, sent) for own in own_arrays
                    )
    # Patient data: the hospital releases no evaluation (its counts are per record), and still
    # keeps its own model; nothing of it in what it sends.
    assert wire.REFUSAL in with_own[1].content
    sent = [key for reply in with_own for record in reply.content.values() for key in record]
    assert not any("personal" in key or "alone" in key or "own" in key for key in sent)
