"""Partitioners: how a pooled data set is split across simulated hospitals. Pure and seeded.

Each returns, for every hospital, the indices of its examples. Every hospital gets at least two
examples (one to train on, one to validate with); a split that cannot do that raises `DataError`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from fedward.common.errors import DataError


def iid(
    num_examples: int, hospitals: int, seed: int, patients: list[str | None] | None = None
) -> list[list[int]]:
    """Shuffle, then deal into equal shares (of patients, each whole, where `patients` names
    them)."""
    _check(num_examples, hospitals)
    units = _units(num_examples, patients)
    order = np.random.default_rng(seed).permutation(len(units))
    return [
        sorted(i for unit in part.tolist() for i in units[unit])
        for part in np.array_split(order, hospitals)
    ]


def blocks(num_examples: int, hospitals: int) -> list[list[int]]:
    """Contiguous blocks in document order (e.g. NER corpora split by site)."""
    _check(num_examples, hospitals)
    return [part.tolist() for part in np.array_split(np.arange(num_examples), hospitals)]


def dirichlet(
    labels: list[str],
    hospitals: int,
    alpha: float,
    seed: int,
    patients: list[str | None] | None = None,
) -> list[list[int]]:
    """Label skew: for each label, hospital shares drawn from Dirichlet(alpha).

    Smaller `alpha` means more skew. Where `patients` names each example's patient, a patient
    is dealt whole to one hospital (by its most frequent label): a patient seen at two
    hospitals would be two patients to their accountants, each spending the full epsilon on
    them. A hospital left with fewer than 2 examples by the draw is topped up from the largest
    share, so every hospital can train and keep one for validation.
    """
    _check(len(labels), hospitals)
    units = _units(len(labels), patients)
    unit_labels = [Counter(labels[i] for i in unit).most_common(1)[0][0] for unit in units]
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(hospitals)]
    for label in sorted(set(unit_labels)):
        indices = np.array([u for u, value in enumerate(unit_labels) if value == label])
        rng.shuffle(indices)
        shares = rng.dirichlet(np.full(hospitals, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
        for hospital, chunk in enumerate(np.split(indices, cuts)):
            parts[hospital].extend(chunk.tolist())
    size = [0] * hospitals
    for hospital, part in enumerate(parts):
        size[hospital] = sum(len(units[u]) for u in part)
    for hospital, part in enumerate(parts):
        while size[hospital] < 2:
            donor = max(range(hospitals), key=lambda h: (len(parts[h]) > 1, size[h]))
            if len(parts[donor]) < 2:
                raise DataError(
                    f"{len(units)} patients cannot be dealt whole to {hospitals} hospitals "
                    "(each needs at least 2 notes); use fewer hospitals or more patients"
                )
            unit = parts[donor].pop()
            part.append(unit)
            size[donor] -= len(units[unit])
            size[hospital] += len(units[unit])
    return [sorted(i for u in part for i in units[u]) for part in parts]


def _units(num_examples: int, patients: list[str | None] | None) -> list[list[int]]:
    """The examples grouped by patient (in order of first appearance); an example without a
    patient is a unit of its own."""
    if patients is None:
        return [[i] for i in range(num_examples)]
    units: dict[object, list[int]] = {}
    for i, patient in enumerate(patients):
        units.setdefault(patient if patient is not None else ("record", i), []).append(i)
    return list(units.values())


def by_column(groups: list[str], hospitals: int) -> list[list[int]]:
    """One hospital per distinct value of a column (values in sorted order)."""
    values = sorted(set(groups))
    if len(values) != hospitals:
        raise DataError(
            f"partition by column: the column has {len(values)} distinct values "
            f"({', '.join(values[:5])}{'...' if len(values) > 5 else ''}) but there are "
            f"{hospitals} hospitals; pass --hospitals {len(values)}"
        )
    index = {value: position for position, value in enumerate(values)}
    parts: list[list[int]] = [[] for _ in range(hospitals)]
    for i, group in enumerate(groups):
        parts[index[group]].append(i)
    too_small = [value for value, part in zip(values, parts) if len(part) < 2]
    if too_small:
        raise DataError(
            f"partition by column: value(s) {', '.join(repr(v) for v in too_small[:5])} have "
            "fewer than 2 examples (each hospital needs at least 2); merge them or add examples"
        )
    return parts


def _check(num_examples: int, hospitals: int) -> None:
    if num_examples < 2 * hospitals:
        raise DataError(
            f"{num_examples} examples cannot be split across {hospitals} hospitals "
            "(each needs at least 2); use fewer hospitals or more data"
        )
