"""The arithmetic of a round on the coordinator's side, pure and tested alone.

FedAvg is split in two so that secure aggregation can replace the first half: the weighted *sum*
of updates (plain here, unmasked from SecAgg+ otherwise) and the *average* applied to the global
adapter. Paper: McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data".
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedward.common.errors import ModelError, SecAggError
from fedward.common.metrics import summed_counts
from fedward.common.model import ArraySpec, check_adapter_arrays
from fedward.common.secagg.distributed_noise import decode_sum
from fedward.common.tasks import Task

Arrays = dict[str, np.ndarray]


def validate_update(spec: list[ArraySpec], update: Arrays, clip: float) -> None:
    """Raise `ModelError` unless `update` has the run's names/shapes/dtypes, is finite and in range.

    Hospitals clip their own updates to [-clip, clip]; a value outside means a broken or
    misbehaving hospital, and its update is dropped.
    """
    check_adapter_arrays(spec, update)
    for name, values in update.items():
        if not np.all(np.isfinite(values)):
            raise ModelError(f"update tensor '{name}' has NaN or infinite values")
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        if peak > clip * (1 + 1e-6):
            raise ModelError(
                f"update tensor '{name}' has a value {peak:.3g} outside [-{clip}, {clip}]"
            )


def weighted_sum(updates: list[tuple[Arrays, float]]) -> tuple[Arrays, float]:
    """Sum of weight * update over hospitals, and the sum of weights (float64 accumulation)."""
    if not updates:
        raise ValueError("weighted_sum needs at least one update")
    names = list(updates[0][0])
    total = {name: np.zeros(updates[0][0][name].shape, dtype=np.float64) for name in names}
    total_weight = 0.0
    for update, weight in updates:
        for name in names:
            total[name] += weight * update[name].astype(np.float64)
        total_weight += weight
    return total, total_weight


def apply_average(global_arrays: Arrays, summed: Arrays, total_weight: float) -> Arrays:
    """New global adapter: global + summed / total_weight, in the global's dtypes."""
    if total_weight <= 0:
        raise ValueError("total weight must be positive")
    return {
        name: (global_arrays[name].astype(np.float64) + summed[name] / total_weight).astype(
            global_arrays[name].dtype
        )
        for name in global_arrays
    }


#: The noisy count the step divides by is at least this: noise cannot make it blow up the step.
MIN_NOISY_COUNT = 1.0


def server_step(
    global_arrays: Arrays, integer_sum: np.ndarray, max_grad_norm: float, learning_rate: float
) -> Arrays:
    """Distributed noise's step (DP-FedSGD): global - learning_rate * noisy gradient sum / noisy
    count, both read from the unmasked integer sum (`decode_sum`). Post-processing of the noisy
    sum: it spends nothing. `SecAggError` when the sum does not fit the adapter."""
    gradient_sum, count = decode_sum(integer_sum, max_grad_norm)
    size = sum(array.size for array in global_arrays.values())
    if gradient_sum.size != size:
        raise SecAggError(
            f"distributed noise: the unmasked sum has {gradient_sum.size} gradient values, the "
            f"adapter {size}"
        )
    mean = gradient_sum / max(count, MIN_NOISY_COUNT)
    offset, new = 0, {}
    for name, array in global_arrays.items():
        step = mean[offset : offset + array.size].reshape(array.shape)
        new[name] = (array.astype(np.float64) - learning_rate * step).astype(array.dtype)
        offset += array.size
    return new


def weighted_mean(values: list[tuple[float, float]]) -> float:
    """Weighted mean of (value, weight) pairs, NaN values skipped; NaN when nothing is left."""
    kept = [(v, w) for v, w in values if w > 0 and np.isfinite(v)]
    if not kept:
        return float("nan")
    return float(sum(v * w for v, w in kept) / sum(w for _, w in kept))


def global_evaluation(
    task: Task,
    scores: Mapping[str, Mapping[str, float]],
    counts: Mapping[str, Mapping[str, float]],
) -> dict[str, float]:
    """The global model's metrics from every hospital's evaluation.

    Args:
        task: The run's task; its `pooled_scores` are computed from counts, not averaged.
        scores: Each hospital's metrics (`num_examples`, accuracy, its own macro-F1...).
        counts: Each hospital's `tp:`/`fp:`/`fn:` entries (common.metrics), possibly none.

    Returns:
        The example-weighted mean of each metric (for loss and accuracy that is their value
        over all hospitals' rows), except the task's `pooled_scores` (macro-F1; entity P/R/F1
        and their per-type forms), which are computed from the counts summed over hospitals:
        the score of the global model on all validation rows at once. The example-weighted mean
        of the hospitals' own primary score is kept beside it as `hospital_mean_<score>` (how
        well the model does on a hospital's own label mix). When some hospital sent scores but
        no counts the pooled scores are left out rather than replaced by the mean.
    """
    keys = sorted({key for metrics in scores.values() for key in metrics} - {"num_examples"})
    merged = {
        key: weighted_mean(
            [(m.get(key, float("nan")), m.get("num_examples", 0.0)) for m in scores.values()]
        )
        for key in keys
    }
    pooled = [key for key in keys if _is_pooled(key, task.pooled_scores)]
    if not pooled:
        return merged
    primary = task.primary_metric
    if primary in merged:
        merged[f"hospital_mean_{primary}"] = merged[primary]
    for key in pooled:
        del merged[key]
    if all(counts.get(name) for name in scores):
        merged.update(task.pooled_metrics(summed_counts(counts[name] for name in scores)))
    return merged


def _is_pooled(key: str, pooled_scores: tuple[str, ...]) -> bool:
    return any(key == score or key.startswith(f"{score}_") for score in pooled_scores)
