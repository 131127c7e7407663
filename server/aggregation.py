"""The arithmetic of a round on the coordinator's side, pure and tested alone.

FedAvg is split in two so that secure aggregation can replace the first half: the weighted *sum*
of updates (plain here, unmasked from SecAgg+ otherwise) and the *average* applied to the global
adapter. Paper: McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data".
"""

from __future__ import annotations

import numpy as np

from fedward.common.errors import ModelError
from fedward.common.model import ArraySpec, check_adapter_arrays

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


def weighted_mean(values: list[tuple[float, float]]) -> float:
    """Weighted mean of (value, weight) pairs, NaN values skipped; NaN when nothing is left."""
    kept = [(v, w) for v, w in values if w > 0 and np.isfinite(v)]
    if not kept:
        return float("nan")
    return float(sum(v * w for v, w in kept) / sum(w for _, w in kept))
