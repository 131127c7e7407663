"""Patient-level DP in the trainer (client/trainer.py, client/privacy.py): each test tries to
break one guarantee the way a careless implementation would.

- The contribution bound: a patient with 50 records (all pushing the same way) must move the
  noiseless sum of clipped gradients no more than a patient with one record: at most
  `max_grad_norm`. The same data trained record by record moves it about 50 times as far,
  which shows the test can fail.
- Sampling is by patient: every step draws whole patients, never a patient's records apart.
- The accountant counts patients: the plan's sample rate is expected patients / patients.
- NER: a sentence cut into pieces keeps its patient, so a patient stays one unit.
"""

from __future__ import annotations

import numpy as np
import pytest
from tiny_training import LABELS, TAGS, WORDS, tokenizer

from fedward.client import trainer
from fedward.client.privacy.accounting import DPPlan, plan_dp, privacy_units
from fedward.common.config import RunConfig
from fedward.common.data import EncodedDataset, Record, encode_classification, patient_units
from fedward.common.errors import ConfigError, DataError
from fedward.common.model import build_model, get_adapter_arrays
from fedward.common.tasks import task_named
from fedward.common.tasks.ner import PatientSentence

pytestmark = pytest.mark.usefixtures("fresh_prefix_caches")

LR = 0.01
CLIP = 1.0


def _config(model_dir: str, unit: str, **overrides) -> RunConfig:
    values = dict(
        model=model_dir,
        rounds=1,
        local_epochs=1,
        batch_size=1000,  # every patient in the one batch: sample rate 1, one step
        optimizer="sgd",
        learning_rate=LR,
        head_learning_rate=LR,
        max_length=24,
        lora_layers=2,
        lora_variant="lora",
        dp=True,
        dp_unit=unit,
        max_grad_norm=CLIP,
        max_records_per_patient=64,
        device="cpu",
    )
    return RunConfig(**{**values, **overrides})


def _records(patients: dict[str, int], seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    records = []
    for patient, count in patients.items():
        label = LABELS[len(records) % 2]
        text = " ".join(rng.choice(WORDS[label], size=6))
        records += [Record(text, label, patient=patient) for _ in range(count)]  # one direction
    return records


def _encode(config: RunConfig, tok, records: list[Record]) -> EncodedDataset:
    units = patient_units(records) if config.spec.privacy.dp_unit == "patient" else None
    label_to_id = {label: i for i, label in enumerate(LABELS)}
    return encode_classification(tok, records, label_to_id, config.spec.task.max_length, units)


def _sentences(patients: dict[str, int]) -> list[PatientSentence]:
    sentences = []
    for number, (patient, count) in enumerate(patients.items()):
        words = [(WORDS[LABELS[number % 2]][k], "O") for k in range(4)]
        words.insert(number % 4, ("pneumonia", "B-Disease"))
        sentences += [PatientSentence(words, patient) for _ in range(count)]
    return sentences


def _clipped_sum(config, tok, records, monkeypatch) -> np.ndarray:
    """The sum of clipped unit gradients of one noiseless step over all units, from the update:
    one SGD step moves the parameters by -lr * sum / (units in the batch)."""
    if config.spec.task.name == "ner":
        units = patient_units(records) if config.spec.privacy.dp_unit == "patient" else None
        dataset = task_named("ner").encode(records, TAGS, tok, 24, units)
    else:
        dataset = _encode(config, tok, records)
    units = privacy_units(config.spec.privacy, dataset)
    plan = DPPlan(noise_multiplier=0.0, sample_rate=1.0, steps=1)
    monkeypatch.setattr(trainer, "check_budget", lambda *args: 0.0)  # noiseless: no epsilon
    model = build_model(config.spec, len(TAGS if config.spec.task.name == "ner" else LABELS))
    start = get_adapter_arrays(model)
    result = trainer.train_locally(model, dataset, config, start, [], tok.pad_token_id, plan=plan)
    flat = np.concatenate([result.delta[name].ravel() for name in sorted(result.delta)])
    return -flat.astype(np.float64) * units / LR


@pytest.mark.parametrize("unit, bound", [("patient", CLIP), ("record", None)])
def test_a_patient_with_50_records_moves_the_update_no_more_than_one_with_1(
    four_layer_model_dir, monkeypatch, unit, bound
):
    config = _config(four_layer_model_dir, unit)
    tok = tokenizer(four_layer_model_dir)
    others = {f"p{i}": 1 + i % 3 for i in range(6)}
    base = _clipped_sum(config, tok, _records(others), monkeypatch)
    many = _clipped_sum(config, tok, _records({**others, "x": 50}), monkeypatch)
    one = _clipped_sum(config, tok, _records({**others, "x": 1}), monkeypatch)
    moved_by_many = np.linalg.norm(many - base)
    moved_by_one = np.linalg.norm(one - base)
    if bound is not None:
        assert moved_by_many <= bound * 1.01
        assert moved_by_one <= bound * 1.01
        assert moved_by_many > 0.5 * bound  # it did contribute: the bound is not vacuous
    else:
        # record-level DP clips each record: the same 50 records move it ~50 times as far
        assert moved_by_many > 20 * CLIP
        assert moved_by_one <= CLIP * 1.01


def test_an_ner_patient_with_50_sentences_moves_the_update_no_more_than_the_clip(
    four_layer_model_dir, monkeypatch
):
    config = _config(four_layer_model_dir, "patient", task="ner", labels=TAGS)
    tok = tokenizer(four_layer_model_dir)
    others = {f"p{i}": 1 + i % 3 for i in range(6)}
    base = _clipped_sum(config, tok, _sentences(others), monkeypatch)
    many = _clipped_sum(config, tok, _sentences({**others, "x": 50}), monkeypatch)
    assert 0.5 * CLIP < np.linalg.norm(many - base) <= CLIP * 1.01


def test_the_record_bound_caps_the_records_of_a_sampled_patient(four_layer_model_dir, monkeypatch):
    config = _config(four_layer_model_dir, "patient", max_records_per_patient=3)
    tok = tokenizer(four_layer_model_dir)
    dataset = _encode(config, tok, _records({"a": 40, "b": 1, "c": 5}))
    rows_per_step: list[int] = []
    original = trainer._BatchStep._patient_rows

    def recording(self, patients):
        rows, row_units = original(self, patients)
        rows_per_step.append(len(rows))
        assert len(set(row_units)) == len(patients)
        return rows, row_units

    monkeypatch.setattr(trainer._BatchStep, "_patient_rows", recording)
    monkeypatch.setattr(trainer, "check_budget", lambda *args: 0.0)
    model = build_model(config.spec, len(LABELS))
    trainer.train_locally(
        model,
        dataset,
        config,
        get_adapter_arrays(model),
        [],
        tok.pad_token_id,
        plan=DPPlan(0.0, 1.0, 1),
    )
    assert rows_per_step == [3 + 1 + 3]


def test_sampling_draws_whole_patients(four_layer_model_dir, monkeypatch):
    # Poisson sampling at a rate below 1: whatever is drawn, a patient's records come together.
    config = _config(four_layer_model_dir, "patient", batch_size=2, local_epochs=3)
    tok = tokenizer(four_layer_model_dir)
    patients = {f"p{i}": 1 + i % 4 for i in range(8)}
    records = _records(patients)
    dataset = _encode(config, tok, records)
    members = dataset.unit_members()
    drawn: list[list[int]] = []
    original = trainer._BatchStep.__call__

    def recording(self, indices):
        drawn.append(list(indices))
        return original(self, indices)

    monkeypatch.setattr(trainer._BatchStep, "__call__", recording)
    model = build_model(config.spec, len(LABELS))
    result = trainer.train_locally(
        model, dataset, config, get_adapter_arrays(model), [], tok.pad_token_id
    )
    assert drawn and all(0 <= unit < len(members) for batch in drawn for unit in batch)
    # the loader's indices are patient numbers (8 of them), not record positions (20)
    assert max(unit for batch in drawn for unit in batch) < len(patients)
    assert result.plan.sample_rate == pytest.approx(1 / 4)  # ceil(8 patients / 2)


def test_the_accountant_counts_patients_not_records():
    config = RunConfig(dp_unit="patient", batch_size=16, rounds=3, local_epochs=2)
    records = _records({f"p{i}": 5 for i in range(64)})  # 320 records, 64 patients
    dataset = EncodedDataset([[1]] * len(records), [0] * len(records), patient_units(records))
    assert privacy_units(config.spec.privacy, dataset) == 64
    plan = plan_dp(
        config.spec.privacy,
        config.spec.training,
        config.spec.federation.rounds,
        privacy_units(config.spec.privacy, dataset),
    )
    assert plan.sample_rate == pytest.approx(16 / 64)  # expected patients / patients
    assert plan.steps == 2 * 4
    by_record = plan_dp(
        config.spec.privacy, config.spec.training, config.spec.federation.rounds, len(dataset)
    )
    assert by_record.sample_rate == pytest.approx(16 / 320)
    assert plan.noise_multiplier > by_record.noise_multiplier  # fewer units: more noise


def test_a_patient_level_run_needs_patients():
    config = RunConfig(dp_unit="patient")
    with pytest.raises(ConfigError):
        privacy_units(config.spec.privacy, EncodedDataset([[1], [2]], [0, 1]))
    with pytest.raises(DataError):
        patient_units([Record("a note", "x")])


def test_a_cut_ner_sentence_keeps_its_patient(tiny_model_dir):
    tok = tokenizer(tiny_model_dir)
    long = PatientSentence([("fever", "O")] * 60 + [("pneumonia", "B-Disease")], "anna")
    short = PatientSentence([("cough", "O"), ("asthma", "B-Disease")], "ben")
    examples = [long, short]
    encoded = task_named("ner").encode(
        examples, ["O", "B-Disease", "I-Disease"], tok, 16, patient_units(examples)
    )
    assert len(encoded) > 2  # the long sentence was cut
    assert encoded.num_units == 2
    assert encoded.units == [0] * (len(encoded) - 1) + [1]
