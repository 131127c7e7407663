"""Partitioners: how a pooled data set is split across simulated hospitals. Pure and seeded.

Each returns, for every hospital, the indices of its examples. Every hospital gets at least two
examples (one to train on, one to validate with); a split that cannot do that raises `DataError`.
"""

from __future__ import annotations

import numpy as np

from fedward.common.errors import DataError


def iid(num_examples: int, hospitals: int, seed: int) -> list[list[int]]:
    """Shuffle, then deal into equal shares."""
    _check(num_examples, hospitals)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [sorted(part.tolist()) for part in np.array_split(order, hospitals)]


def blocks(num_examples: int, hospitals: int) -> list[list[int]]:
    """Contiguous blocks in document order (e.g. NER corpora split by site)."""
    _check(num_examples, hospitals)
    return [part.tolist() for part in np.array_split(np.arange(num_examples), hospitals)]


def dirichlet(labels: list[str], hospitals: int, alpha: float, seed: int) -> list[list[int]]:
    """Label skew: for each label, hospital shares drawn from Dirichlet(alpha).

    Smaller `alpha` means more skew. A hospital left with fewer than 2 examples by the draw is
    topped up from the largest share, so every hospital can train and keep one for validation.
    """
    _check(len(labels), hospitals)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(hospitals)]
    for label in sorted(set(labels)):
        indices = np.array([i for i, value in enumerate(labels) if value == label])
        rng.shuffle(indices)
        shares = rng.dirichlet(np.full(hospitals, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
        for hospital, chunk in enumerate(np.split(indices, cuts)):
            parts[hospital].extend(chunk.tolist())
    for part in parts:
        while len(part) < 2:
            donor = max(range(hospitals), key=lambda h: len(parts[h]))
            part.append(parts[donor].pop())
    return [sorted(part) for part in parts]


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
