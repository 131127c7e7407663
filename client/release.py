"""Evaluation metrics a hospital may release: counts, noised with the Gaussian mechanism.

Evaluation is a query on the hospital's records, as training is. Exact metrics for any adapter
the coordinator sends form an oracle: with crafted adapters and repeated requests it can count
labels or test whether a given note is in the data. So a deployed hospital releases metrics only
as a differentially private function of its validation records (record-level, like training):

- classification: the vector (examples, correct, TP_k, FP_k, FN_k for every class k). Adding or
  removing one record changes `examples` by 1, and either `correct` and TP_y by 1 (right) or
  FN_y and FP_p by 1 (wrong): L2 sensitivity sqrt(3).
- NER: a sentence can hold any number of entities, so entity counts have no bound; the vector is
  (sentences, sentences tagged exactly right): L2 sensitivity sqrt(2). Entity F1 is not
  released outside simulation.

Gaussian noise of standard deviation `noise_multiplier * sensitivity` on every count is one step
of the Gaussian mechanism with sample rate 1, which the privacy ledger composes with the DP-SGD
rounds in the same RDP accountant (`client.privacy`). Accuracy and F1 are computed from the
noised counts (post-processing costs nothing). Validation loss is not released: a per-record
loss has no bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedward.common.metrics import classification_metrics, ner_metrics_from_ids


@dataclass(frozen=True)
class Predictions:
    """What an evaluation computed on the hospital's validation split; it stays there."""

    task: str
    loss: float
    true_ids: list
    pred_ids: list
    labels: list[str]


def counts(predictions: Predictions) -> np.ndarray:
    """The count vector of the module docstring (float64)."""
    if predictions.task == "ner":
        exact = sum(
            all(t == p for t, p in zip(true, pred) if t != -100)
            for true, pred in zip(predictions.true_ids, predictions.pred_ids)
        )
        return np.array([len(predictions.true_ids), exact], dtype=np.float64)
    k = len(predictions.labels)
    true = np.asarray(predictions.true_ids, dtype=np.int64)
    pred = np.asarray(predictions.pred_ids, dtype=np.int64)
    right = true == pred
    tp = np.bincount(true[right], minlength=k)
    fn = np.bincount(true[~right], minlength=k)
    fp = np.bincount(pred[~right], minlength=k)
    return np.concatenate([[len(true), right.sum()], tp, fp, fn]).astype(np.float64)


def sensitivity(task: str) -> float:
    """L2 sensitivity of `counts` to adding or removing one record."""
    return math.sqrt(2.0) if task == "ner" else math.sqrt(3.0)


def noised(vector: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise on every count, then clamped at 0 (post-processing)."""
    return np.maximum(vector + rng.normal(0.0, std, size=vector.shape), 0.0)


def metrics_from_counts(task: str, vector: np.ndarray, num_labels: int) -> dict[str, float]:
    """The released metrics: example count, accuracy and macro-F1 (or sentence accuracy)."""
    examples = float(vector[0])
    if task == "ner":
        return {"num-examples": examples, "sentence_accuracy": _ratio(vector[1], examples)}
    tp, fp, fn = (vector[2 + i * num_labels : 2 + (i + 1) * num_labels] for i in range(3))
    denominator = 2 * tp + fp + fn
    present = denominator > 0
    f1 = np.where(present, 2 * tp / np.where(present, denominator, 1.0), 0.0)
    return {
        "num-examples": examples,
        "accuracy": _ratio(vector[1], examples),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
    }


def exact_metrics(predictions: Predictions) -> dict[str, float]:
    """Exact loss and task metrics (simulation, and the hospital's own audit log)."""
    metrics = {"loss": predictions.loss, "num-examples": float(len(predictions.true_ids))}
    if predictions.task == "ner":
        metrics.update(
            ner_metrics_from_ids(predictions.true_ids, predictions.pred_ids, predictions.labels)
        )
    else:
        metrics.update(
            classification_metrics(
                predictions.true_ids, predictions.pred_ids, len(predictions.labels)
            )
        )
    return metrics


def _ratio(part: float, whole: float) -> float:
    return float(min(1.0, part / whole)) if whole > 0 else float("nan")
