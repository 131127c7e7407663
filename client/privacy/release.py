"""Evaluation metrics a hospital may release: counts, noised with the Gaussian mechanism.

Evaluation is a query on the hospital's records, as training is. Exact metrics for any adapter
the coordinator sends form an oracle: with crafted adapters and repeated requests it can count
labels or test whether a given note is in the data. So a deployed hospital releases metrics only
as a differentially private function of its validation records (record-level, like training):

- classification: the vector (examples, correct, TP_k, FP_k, FN_k for every class k), L2
  sensitivity sqrt(3);
- NER: (sentences, sentences tagged exactly right), L2 sensitivity sqrt(2); entity F1 is not
  released outside simulation.

Each task says how (`release_counts`, `release_sensitivity`, `metrics_from_counts` in
common/tasks/).

Gaussian noise of standard deviation `noise_multiplier * sensitivity` on every count is one step
of the Gaussian mechanism with sample rate 1, which the privacy ledger composes with the DP-SGD
rounds in the same RDP accountant (`client.privacy`). Accuracy and F1 are computed from the
noised counts (post-processing costs nothing). Validation loss is not released: a per-record
loss has no bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedward.common.tasks import Task


@dataclass(frozen=True)
class Predictions:
    """What an evaluation computed on the hospital's validation split; it stays there."""

    task: Task  # the run's (`spec.task.definition`)
    loss: float
    true_ids: list
    pred_ids: list
    labels: list[str]


def counts(predictions: Predictions) -> np.ndarray:
    """The task's count vector of an evaluation (its `release_counts`, float64)."""
    task = predictions.task
    return task.release_counts(predictions.true_ids, predictions.pred_ids, len(predictions.labels))


def sensitivity(task: Task) -> float:
    """L2 sensitivity of `counts` to adding or removing one record."""
    return task.release_sensitivity


def noised(vector: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise on every count, then clamped at 0 (post-processing)."""
    return np.maximum(vector + rng.normal(0.0, std, size=vector.shape), 0.0)


def metrics_from_counts(task: Task, vector: np.ndarray, num_labels: int) -> dict[str, float]:
    """The released metrics, computed from (noised) counts: post-processing costs nothing."""
    return task.metrics_from_counts(vector, num_labels)


def exact_metrics(predictions: Predictions) -> dict[str, float]:
    """Exact loss and task metrics (simulation, and the hospital's own audit log)."""
    metrics = {"loss": predictions.loss, "num-examples": float(len(predictions.true_ids))}
    task = predictions.task
    metrics.update(task.metrics(predictions.true_ids, predictions.pred_ids, predictions.labels))
    return metrics
