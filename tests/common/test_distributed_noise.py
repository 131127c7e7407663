"""Distributed noise's arithmetic: the discrete Gaussian, a unit's sensitivity, the field."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedward.common.errors import SecAggError
from fedward.common.secagg.distributed_noise import (
    check_no_wrap,
    check_noise_scale,
    clip_units,
    count_units,
    decode_sum,
    encode_units,
    local_noise_std,
    sample_discrete_gaussian,
    sensitivity,
    sum_tau,
    to_field,
)


@pytest.mark.parametrize("std", [0.8, 3.0, 40.0, 2500.0])
def test_discrete_gaussian_draws_integers_centred_with_the_asked_variance(std):
    draws = sample_discrete_gaussian(std, 200_000, np.random.default_rng(7))
    assert draws.dtype == np.int64
    assert abs(draws.mean()) < 5 * std / math.sqrt(draws.size)
    # N_Z(0, s^2) has variance within a hair of s^2 for s >= 1 (and below it for small s).
    assert draws.var() == pytest.approx(std**2, rel=0.02 if std >= 1 else 0.1)
    # Its tail is Gaussian: beyond 5 standard deviations (3e-7 expected) nothing is drawn.
    assert np.count_nonzero(np.abs(draws) > 5 * std + 1) <= 1


def test_discrete_gaussian_matches_its_probability_mass():
    std = 1.5
    draws = sample_discrete_gaussian(std, 300_000, np.random.default_rng(3))
    support = np.arange(-8, 9)
    mass = np.exp(-(support**2) / (2 * std**2))
    mass /= mass.sum()
    observed = np.array([np.count_nonzero(draws == k) for k in support]) / draws.size
    assert np.max(np.abs(observed - mass)) < 0.004


@settings(max_examples=30, deadline=None)
@given(
    dimension=st.integers(1, 3000),
    units=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_one_units_integer_vector_never_exceeds_the_sensitivity(dimension, units, seed):
    rng = np.random.default_rng(seed)
    gradients = rng.normal(size=(units, dimension))
    gradients /= np.linalg.norm(gradients, axis=1, keepdims=True)  # norm exactly the clip
    for row in gradients:
        vector = encode_units(row[None, :], 1.0, rng)
        assert np.linalg.norm(vector.astype(np.float64)) <= sensitivity(dimension)
    # A neighbouring data set differs by one unit's vector: the sum moves by at most that.
    total = encode_units(gradients, 1.0, rng)
    assert total[-1] == units * count_units(dimension)


def test_rounding_at_random_is_unbiased():
    rng = np.random.default_rng(0)
    gradient = np.full((1, 4), 0.3 / clip_units(4))  # 0.3 of an integer unit per coordinate
    sums = np.stack([encode_units(gradient, 1.0, rng)[:-1] for _ in range(20_000)])
    assert sums.mean() == pytest.approx(0.3, abs=0.01)


def test_the_field_sum_reads_back_as_the_signed_sum_of_the_vectors():
    rng = np.random.default_rng(1)
    dimension = 50
    vectors = [rng.integers(-(2**40), 2**40, size=dimension + 1) for _ in range(7)]
    total = np.zeros(dimension + 1, dtype=np.uint64)
    for vector in vectors:
        total += to_field(vector)  # modulo 2^64, as the masks are added
    gradient_sum, count = decode_sum(total, max_grad_norm=2.0)
    exact = np.sum(vectors, axis=0)
    np.testing.assert_allclose(gradient_sum, exact[:-1] * 2.0 / clip_units(dimension))
    assert count == pytest.approx(exact[-1] / count_units(dimension))


def test_shares_too_small_to_add_up_to_a_discrete_gaussian_are_refused():
    assert sum_tau(3000.0, 10) == 0.0
    check_noise_scale(local_noise_std(0.5, 1925, 10), 10)  # every real plan is far above
    with pytest.raises(SecAggError, match="too small"):
        check_noise_scale(0.6, 10)
    with pytest.raises(SecAggError, match="sample fewer units"):
        check_no_wrap(10**12, 1925, 1e4, 10)
