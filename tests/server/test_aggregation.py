"""Tests for the coordinator's round arithmetic (server/aggregation.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from fedward.common.errors import ModelError
from fedward.common.metrics import split_counts
from fedward.common.model import ArraySpec
from fedward.common.tasks.classification import CLASSIFICATION
from fedward.common.tasks.ner import NER
from fedward.server.aggregation import (
    apply_average,
    global_evaluation,
    validate_update,
    weighted_mean,
    weighted_sum,
)

SPEC = [ArraySpec("lora_A", (2, 3), "float32"), ArraySpec("head.bias", (2,), "float32")]


def _arrays(a, bias) -> dict[str, np.ndarray]:
    return {
        "lora_A": np.asarray(a, dtype=np.float32),
        "head.bias": np.asarray(bias, dtype=np.float32),
    }


def test_weighted_fedavg_matches_a_hand_computation():
    global_arrays = _arrays([[1, 1, 1], [1, 1, 1]], [0.5, -0.5])
    first = _arrays([[0.1, 0.2, 0.3], [0.0, 0.0, 0.0]], [0.2, 0.0])  # 30 examples
    second = _arrays([[0.4, -0.2, 0.0], [0.3, 0.3, 0.3]], [-0.4, 0.6])  # 10 examples
    summed, total_weight = weighted_sum([(first, 30), (second, 10)])
    assert total_weight == 40
    np.testing.assert_allclose(summed["lora_A"], [[7.0, 4.0, 9.0], [3.0, 3.0, 3.0]], rtol=1e-6)
    np.testing.assert_allclose(summed["head.bias"], [2.0, 6.0], rtol=1e-6)

    new = apply_average(global_arrays, summed, total_weight)
    # global + (30 * first + 10 * second) / 40
    np.testing.assert_allclose(
        new["lora_A"], [[1.175, 1.1, 1.225], [1.075, 1.075, 1.075]], rtol=1e-6
    )
    np.testing.assert_allclose(new["head.bias"], [0.55, -0.35], rtol=1e-6)
    assert all(value.dtype == np.float32 for value in new.values())


def test_equal_weights_give_the_plain_mean_and_one_update_is_applied_whole():
    global_arrays = _arrays(np.zeros((2, 3)), [0, 0])
    a = _arrays(np.full((2, 3), 0.2), [0.1, 0.1])
    b = _arrays(np.full((2, 3), -0.6), [0.3, -0.1])
    new = apply_average(global_arrays, *weighted_sum([(a, 5), (b, 5)]))
    np.testing.assert_allclose(new["lora_A"], np.full((2, 3), -0.2), rtol=1e-6)
    np.testing.assert_allclose(new["head.bias"], [0.2, 0.0], atol=1e-7)
    alone = apply_average(global_arrays, *weighted_sum([(a, 7)]))
    np.testing.assert_allclose(alone["lora_A"], a["lora_A"], rtol=1e-6)


def test_sum_accumulates_in_float64():
    tiny = _arrays(np.full((2, 3), 1e-4), [1e-4, 1e-4])
    summed, weight = weighted_sum([(tiny, 1.0)] * 10_000)
    exact = 10_000 * np.float64(np.float32(1e-4))
    np.testing.assert_allclose(summed["lora_A"], np.full((2, 3), exact), rtol=1e-12)
    assert summed["lora_A"].dtype == np.float64 and weight == 10_000


def test_empty_sum_and_zero_weight_are_refused():
    with pytest.raises(ValueError):
        weighted_sum([])
    with pytest.raises(ValueError):
        apply_average(_arrays(np.zeros((2, 3)), [0, 0]), _arrays(np.zeros((2, 3)), [0, 0]), 0.0)


def test_a_good_update_passes_validation():
    validate_update(SPEC, _arrays(np.full((2, 3), -1.0), [1.0, 0.0]), clip=1.0)


@pytest.mark.parametrize(
    ("update", "words"),
    [
        (_arrays([[0, 0, math.nan], [0, 0, 0]], [0, 0]), "NaN"),
        (_arrays([[0, 0, 0], [0, 0, 0]], [math.inf, 0]), "NaN or infinite"),
        (_arrays([[0, 0, 0], [0, 1.5, 0]], [0, 0]), "outside [-1.0, 1.0]"),
        (_arrays(np.zeros((3, 2)), [0, 0]), "shape (3, 2), expected (2, 3)"),
        ({"lora_A": np.zeros((2, 3), dtype=np.float32)}, "missing ['head.bias']"),
        (
            {**_arrays(np.zeros((2, 3)), [0, 0]), "extra": np.zeros(1, dtype=np.float32)},
            "unexpected ['extra']",
        ),
        ({**_arrays(np.zeros((2, 3)), [0, 0]), "lora_A": np.zeros((2, 3))}, "dtype float64"),
    ],
)
def test_bad_updates_are_rejected(update, words):
    with pytest.raises(ModelError) as caught:
        validate_update(SPEC, update, clip=1.0)
    assert words in str(caught.value)


def test_weighted_mean_skips_nan_and_empty_weights():
    assert weighted_mean([(1.0, 1), (4.0, 3)]) == pytest.approx(3.25)
    assert weighted_mean([(1.0, 1), (math.nan, 5), (9.0, 0)]) == 1.0
    assert math.isnan(weighted_mean([]))


# --- the global model's evaluation ----------------------------------------------------------


def _hospital(true: list[int], pred: list[int], labels: int) -> tuple[dict, dict]:
    """A hospital's evaluation as the coordinator receives it: scores, and counts apart."""
    scores, counts = split_counts(
        CLASSIFICATION.metrics(true, pred, [f"label{k}" for k in range(labels)])
    )
    return {**scores, "num_examples": float(len(true))}, counts


def test_global_macro_f1_is_that_of_all_rows_pooled_and_the_hospital_mean_is_named_apart():
    # label skew: each hospital has one note of the other's common label and misses it
    a_true, a_pred = [0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0]
    b_true, b_pred = [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]
    scores_a, counts_a = _hospital(a_true, a_pred, 2)
    scores_b, counts_b = _hospital(b_true, b_pred, 2)
    merged = global_evaluation(
        CLASSIFICATION, {"a": scores_a, "b": scores_b}, {"a": counts_a, "b": counts_b}
    )
    pooled = f1_score(a_true + b_true, a_pred + b_pred, average="macro")
    mean = (8 * scores_a["macro_f1"] + 6 * scores_b["macro_f1"]) / 14
    assert merged["macro_f1"] == pytest.approx(pooled)
    assert merged["hospital_mean_macro_f1"] == pytest.approx(mean)
    assert pooled > mean + 0.3  # 0.84 against 0.46
    assert merged["accuracy"] == pytest.approx(np.mean(np.equal(a_true + b_true, a_pred + b_pred)))
    assert not any(":" in key for key in merged)


def test_without_every_hospitals_counts_there_is_no_global_macro_f1_rather_than_a_mean():
    scores_a, counts_a = _hospital([0, 1], [0, 1], 2)
    scores_b, _ = _hospital([0, 1], [1, 1], 2)  # e.g. an older fedward: scores, no counts
    merged = global_evaluation(
        CLASSIFICATION, {"a": scores_a, "b": scores_b}, {"a": counts_a, "b": {}}
    )
    assert "macro_f1" not in merged and "hospital_mean_macro_f1" in merged
    assert merged["accuracy"] == pytest.approx(0.75)


def test_deployed_ner_releases_no_entity_scores_and_none_are_made_up():
    merged = global_evaluation(
        NER,
        {"a": {"num_examples": 10.0, "sentence_accuracy": 0.5}, "b": {"num_examples": 30.0}},
        {"a": {}, "b": {}},
    )
    assert merged == {"sentence_accuracy": 0.5}
