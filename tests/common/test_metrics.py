"""Tests for the task metrics' counts and the scores computed from counts summed over hospitals
(common/metrics.py): the global model's macro-F1 is that of all rows pooled, not a mean."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from fedward.common.metrics import (
    classification_metrics,
    entity_counts,
    label_counts,
    pooled_entity_scores,
    pooled_macro_f1,
    split_counts,
    summed_counts,
)
from fedward.common.tasks.classification import CLASSIFICATION
from fedward.common.tasks.ner import ner_metrics
from fedward.common.tasks.ner.entity_metrics import ner_metrics_from_ids

# Two hospitals with opposite label mixes (label skew, as in the synthetic notes): each has one
# note of the other's common label and calls it its own common label. Each hospital's own
# macro-F1 is dragged down by its rare label (0.46); over all rows both labels do well (0.86).
HOSPITAL_A = ([0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0])
HOSPITAL_B = ([1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1])


def _counts(rows: tuple[list[int], list[int]]) -> dict[str, tuple[float, float, float]]:
    tp, fp, fn = label_counts(*rows, num_labels=2)
    return {str(k): (tp[k], fp[k], fn[k]) for k in range(len(tp))}


def test_pooled_macro_f1_is_sklearns_over_all_rows_and_not_the_mean_of_the_hospitals():
    pooled_true = HOSPITAL_A[0] + HOSPITAL_B[0]
    pooled_pred = HOSPITAL_A[1] + HOSPITAL_B[1]
    expected = f1_score(pooled_true, pooled_pred, average="macro")

    summed = summed_counts(
        [
            {
                f"{kind}:{name}": value
                for name, values in _counts(rows).items()
                for kind, value in zip(("tp", "fp", "fn"), values)
            }
            for rows in (HOSPITAL_A, HOSPITAL_B)
        ]
    )
    assert pooled_macro_f1(summed) == pytest.approx(expected)

    own = [
        classification_metrics(*rows, num_labels=2)["macro_f1"] for rows in (HOSPITAL_A, HOSPITAL_B)
    ]
    mean_of_hospitals = float(np.mean(own))  # equal example counts: weighted = plain mean
    assert (mean_of_hospitals, expected) == (pytest.approx(6 / 13), pytest.approx(6 / 7))


def test_pooled_macro_f1_leaves_out_labels_nobody_has_or_predicts_as_sklearn_does():
    true, pred = [0, 0, 1], [0, 1, 1]  # label 2 of 3 neither true nor predicted
    assert pooled_macro_f1(_counts((true, pred))) == pytest.approx(
        f1_score(true, pred, labels=[0, 1], average="macro")
    )
    assert np.isnan(pooled_macro_f1({"0": (0, 0, 0)}))


def test_a_hospitals_classification_metrics_carry_its_counts_per_label():
    true, pred = [0, 0, 0, 0, 0, 0, 1, 2], [0, 0, 0, 0, 0, 1, 2, 2]
    scores, counts = split_counts(CLASSIFICATION.metrics(true, pred, ["flu", "cold", "sepsis"]))
    assert set(scores) == {"accuracy", "macro_f1"}
    assert counts == {
        "tp:0": 5.0, "fp:0": 0.0, "fn:0": 1.0,
        "tp:1": 0.0, "fp:1": 1.0, "fn:1": 1.0,
        "tp:2": 1.0, "fp:2": 1.0, "fn:2": 0.0,
    }  # fmt: skip
    assert pooled_macro_f1(summed_counts([counts])) == pytest.approx(scores["macro_f1"])


def test_pooled_entity_scores_are_seqevals_over_all_sentences():
    hospital_a = (
        [["B-Disease", "I-Disease", "O"], ["B-Drug", "O"]],
        [["B-Disease", "I-Disease", "O"], ["O", "O"]],
    )
    hospital_b = (
        [["O", "B-Disease"], ["B-Disease", "O"], ["O", "O"]],
        [["B-Drug", "B-Disease"], ["B-Disease", "O"], ["B-Disease", "O"]],
    )
    summed = summed_counts(
        split_counts(
            {
                f"{kind}:{name}": value
                for name, values in entity_counts(*rows).items()
                for kind, value in zip(("tp", "fp", "fn"), values)
            }
        )[1]
        for rows in (hospital_a, hospital_b)
    )
    pooled = pooled_entity_scores(summed)
    expected = ner_metrics(hospital_a[0] + hospital_b[0], hospital_a[1] + hospital_b[1])
    for key in ("precision", "recall", "f1"):
        assert pooled[key] == pytest.approx(expected[key])
        for entity_type, scores in expected["per_type"].items():
            assert pooled[f"{key}_{entity_type}"] == pytest.approx(scores[key])


def test_ner_metrics_carry_counts_for_every_entity_type_of_the_labels():
    labels = ["O", "B-Disease", "I-Disease", "B-Drug", "I-Drug"]
    metrics = ner_metrics_from_ids([[-100, 1, 2, 0]], [[0, 1, 2, 0]], labels)
    _, counts = split_counts(metrics)
    assert counts == {
        "tp:Disease": 1.0, "fp:Disease": 0.0, "fn:Disease": 0.0,
        "tp:Drug": 0.0, "fp:Drug": 0.0, "fn:Drug": 0.0,
    }  # fmt: skip
