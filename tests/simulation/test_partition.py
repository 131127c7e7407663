"""Tests for the partitioners that split a pooled data set across simulated hospitals."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedward.common.errors import DataError
from fedward.simulation import partition


def _assert_covers_exactly_once(parts: list[list[int]], num_examples: int) -> None:
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(num_examples)), "every index exactly once"


def _labels(num_examples: int, num_labels: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"label-{i}" for i in rng.integers(0, num_labels, num_examples)]


def _skew(labels: list[str], parts: list[list[int]]) -> float:
    """Mean total-variation distance between each hospital's label mix and the pooled mix."""
    pooled = Counter(labels)
    distances = []
    for part in parts:
        mine = Counter(labels[i] for i in part)
        distances.append(
            0.5 * sum(abs(mine[k] / len(part) - pooled[k] / len(labels)) for k in pooled)
        )
    return float(np.mean(distances))


@settings(max_examples=60, deadline=None)
@given(hospitals=st.integers(1, 12), extra=st.integers(0, 200), seed=st.integers(0, 2**32 - 1))
def test_iid_and_blocks_cover_every_index_once_in_near_equal_shares(hospitals, extra, seed):
    num_examples = 2 * hospitals + extra
    for parts in (
        partition.iid(num_examples, hospitals, seed),
        partition.blocks(num_examples, hospitals),
    ):
        assert len(parts) == hospitals
        _assert_covers_exactly_once(parts, num_examples)
        sizes = [len(part) for part in parts]
        assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(
    hospitals=st.integers(1, 8),
    extra=st.integers(0, 150),
    num_labels=st.integers(1, 6),
    alpha=st.floats(0.01, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_covers_every_index_once_and_every_hospital_can_train(
    hospitals, extra, num_labels, alpha, seed
):
    labels = _labels(2 * hospitals + extra, num_labels, seed)
    parts = partition.dirichlet(labels, hospitals, alpha, seed)
    assert len(parts) == hospitals
    _assert_covers_exactly_once(parts, len(labels))
    assert all(len(part) >= 2 for part in parts)


@settings(max_examples=50, deadline=None)
@given(
    hospitals=st.integers(2, 6),
    patients=st.integers(30, 120),
    alpha=st.floats(0.05, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_and_iid_deal_each_patient_whole_to_one_hospital(
    hospitals, patients, alpha, seed
):
    rng = np.random.default_rng(seed)
    owner = [f"p{i}" for i in rng.integers(0, patients, size=4 * patients)]
    labels = [f"label-{int(name[1:]) % 3}" for name in owner]  # a patient's notes share a label
    for parts in (
        partition.dirichlet(labels, hospitals, alpha, seed, patients=owner),
        partition.iid(len(owner), hospitals, seed, patients=owner),
    ):
        _assert_covers_exactly_once(parts, len(owner))
        seen_at = [{owner[i] for i in part} for part in parts]
        assert sum(len(names) for names in seen_at) == len(set(owner))  # nobody at two
    assert all(len(part) >= 2 for part in partition.dirichlet(labels, hospitals, alpha, seed))


def test_blocks_keep_document_order():
    assert partition.blocks(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]


def test_same_seed_same_split_other_seed_other_split():
    labels = _labels(300, 4, seed=1)
    assert partition.iid(300, 3, seed=5) == partition.iid(300, 3, seed=5)
    assert partition.iid(300, 3, seed=5) != partition.iid(300, 3, seed=6)
    assert partition.dirichlet(labels, 3, 0.5, seed=5) == partition.dirichlet(
        labels, 3, 0.5, seed=5
    )
    assert partition.dirichlet(labels, 3, 0.5, seed=5) != partition.dirichlet(
        labels, 3, 0.5, seed=6
    )


def test_iid_shares_are_shuffled_not_contiguous():
    parts = partition.iid(100, 2, seed=0)
    assert parts[0] != list(range(50))


def test_small_alpha_skews_labels_large_alpha_does_not():
    labels = _labels(2000, 5, seed=3)
    skewed = np.mean(
        [_skew(labels, partition.dirichlet(labels, 4, 0.1, seed)) for seed in range(5)]
    )
    even = np.mean(
        [_skew(labels, partition.dirichlet(labels, 4, 1000.0, seed)) for seed in range(5)]
    )
    iid = np.mean([_skew(labels, partition.iid(len(labels), 4, seed)) for seed in range(5)])
    assert skewed > 0.3
    assert even < 0.05 and iid < 0.05


def test_by_column_gives_one_hospital_per_value_in_sorted_order():
    groups = ["south", "north", "south", "east", "north", "east"]
    parts = partition.by_column(groups, 3)
    assert parts == [[3, 5], [1, 4], [0, 2]]  # east, north, south
    _assert_covers_exactly_once(parts, len(groups))


def test_by_column_with_the_wrong_hospital_count_says_what_to_pass():
    with pytest.raises(
        DataError, match="3 distinct values .* but there are 2 hospitals; pass --hospitals 3"
    ):
        partition.by_column(["a", "b", "c", "a"], 2)


def test_by_column_refuses_a_value_with_a_single_example():
    with pytest.raises(DataError, match="'b' have fewer than 2 examples"):
        partition.by_column(["a", "b", "a", "c", "c"], 3)


@pytest.mark.parametrize(
    "split",
    [
        lambda: partition.iid(5, 3, seed=0),
        lambda: partition.blocks(5, 3),
        lambda: partition.dirichlet(["a"] * 5, 3, 0.5, seed=0),
    ],
)
def test_too_few_examples_for_the_hospitals_is_a_data_error(split):
    with pytest.raises(DataError, match="5 examples cannot be split across 3 hospitals"):
        split()
