"""Tests for the task objects (common/tasks): what differs between classification and NER."""

from __future__ import annotations

import typing

import pytest
import torch

from fedward.common.config import RunConfig, TaskSpec
from fedward.common.data import Record
from fedward.common.errors import ConfigError, DataError
from fedward.common.model import build_base, load_tokenizer
from fedward.common.tasks import TASKS, task_named
from fedward.common.tasks.classification import CLASSIFICATION
from fedward.common.tasks.heads import MeanPoolClassifier
from fedward.common.tasks.ner import IGNORE_INDEX, NER

CONLL = "".join(f"word{i}\tB-Disease\nis\tO\nbad\tO\n\n" for i in range(10))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("all-MiniLM-L6-v2")


def test_every_task_a_run_config_accepts_has_an_object():
    accepted = typing.get_args(TaskSpec.model_fields["name"].annotation)
    assert sorted(accepted) == sorted(TASKS)
    assert all(task_named(name).name == name for name in accepted)


def test_an_unknown_task_is_one_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="field 'task': unknown task 'summarise'"):
        task_named("summarise")


def test_the_head_learning_rate_defaults_per_task_and_a_set_value_wins():
    assert RunConfig(task="classification").spec.head_lr == 0.1
    assert RunConfig(task="ner").spec.head_lr == 0.01
    assert RunConfig(task="ner", head_learning_rate=0.2).spec.head_lr == 0.2


def test_classification_scores_its_primary_metric_and_its_table_columns():
    scores = CLASSIFICATION.metrics([0, 1, 1, 2], [0, 1, 0, 2], ["a", "b", "c"])
    assert scores["accuracy"] == 0.75
    assert CLASSIFICATION.primary_metric == "macro_f1"
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)  # F1 of a, b, c
    assert {key for key, _ in CLASSIFICATION.metric_columns} <= set(scores)


def test_ner_scores_entities_with_its_primary_metric_and_its_table_columns():
    labels = ["O", "B-Disease", "I-Disease"]
    true = [[IGNORE_INDEX, 1, 2, 0, IGNORE_INDEX], [IGNORE_INDEX, 1, 0, IGNORE_INDEX]]
    pred = [[0, 1, 2, 0, 0], [0, 0, 0, 0]]  # the first entity found, the second missed
    scores = NER.metrics(true, pred, labels)
    assert NER.primary_metric == "f1"
    assert (scores["precision"], scores["recall"]) == (1.0, 0.5)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["f1_Disease"] == pytest.approx(2 / 3)
    assert {key for key, _ in NER.metric_columns} <= set(scores)


def test_ner_split_keeps_order_and_always_leaves_a_validation_sentence():
    sentences = [[(f"w{i}", "O")] for i in range(10)]
    train, val = NER.split(sentences, 0.2, seed=1)
    assert (train, val) == (sentences[:8], sentences[8:])
    assert NER.split(sentences, 0.2, seed=2) == (train, val)
    one = [[("fever", "B-Symptom")]]
    assert NER.split(one, 0.2, seed=0) == (one, one)


def test_classification_split_keeps_every_label_on_both_sides():
    records = [Record(f"note {i}", "flu" if i < 8 else "cold") for i in range(10)]
    train, val = CLASSIFICATION.split(records, 0.1, seed=3)
    assert len(train) + len(val) == 10
    assert {r.label for r in train} == {r.label for r in val} == {"flu", "cold"}


def test_ner_reads_the_training_file_of_a_folder(tmp_path):
    (tmp_path / "train.tsv").write_text(CONLL, encoding="utf-8")
    assert NER.read(tmp_path, "text", "label") == NER.read(tmp_path / "train.tsv", "", "")
    assert NER.label_set(NER.read(tmp_path, "text", "label"), "x") == [
        "O",
        "B-Disease",
        "I-Disease",
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no train.tsv/train.txt/train.conll"):
        NER.read(tmp_path / "empty", "", "")


def test_encoding_maps_labels_to_ids_in_the_run_order(tokenizer):
    records = [Record("chest pain", "cardiac"), Record("cough and fever", "pulmonary")]
    dataset = CLASSIFICATION.encode(records, ["pulmonary", "cardiac"], tokenizer, max_length=16)
    assert dataset.labels == [1, 0]
    assert dataset.input_ids[0][0] == tokenizer.cls_token_id

    sentence = [("metformin", "B-Drug"), ("helps", "O")]
    encoded = NER.encode([sentence], ["O", "B-Drug", "I-Drug"], tokenizer, max_length=16)
    ids, labels = encoded[0]
    assert len(ids) == len(labels)
    assert [label for label in labels if label != IGNORE_INDEX] == [1, 0]


def test_each_task_puts_its_own_head_on_the_base_model(tiny_model_dir, tokenizer):
    classifier = build_base(CLASSIFICATION, tiny_model_dir, 4)
    tagger = build_base(NER, tiny_model_dir, 5)
    assert isinstance(classifier, MeanPoolClassifier)
    encoded = tokenizer(["fever and cough"], return_tensors="pt")
    with torch.no_grad():
        assert classifier(**encoded).logits.shape == (1, 4)
        assert tagger(**encoded).logits.shape == (1, encoded["input_ids"].shape[1], 5)


def test_predictions_are_described_per_task(tiny_model_dir, tokenizer):
    labels = ["cardiac", "pulmonary"]
    with torch.no_grad():
        line = CLASSIFICATION.describe_prediction(
            build_base(CLASSIFICATION, tiny_model_dir, 2).eval(), tokenizer, labels, "pain", 16
        )
        tagger = build_base(NER, tiny_model_dir, 3).eval()
        empty = NER.describe_prediction(tagger, tokenizer, ["O", "B-X", "I-X"], "   ", 16)
    (best, other) = (item.rsplit(" ", 1) for item in line)  # top 3 of 2 labels: both
    assert best[0].strip() in labels and 0.5 <= float(best[1]) <= 1.0
    assert float(best[1]) + float(other[1]) == pytest.approx(1.0, abs=2e-3)
    assert empty == ["(no words)"]
