"""The one-run bound (Steinke, Nasr and Jagielski 2023) against the paper's own statements:
its closed form for all-correct guesses without delta, its definition transcribed term by
term, and the properties its use relies on."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binom

from fedward.simulation.privacy_audit.bound import ceiling, epsilon_lower_bound, p_value


def _p_value_as_written(m, r, v, epsilon, delta):
    """Theorem 5.2 term by term: f(v) + 2 m delta max_i (f(v - i) - f(v)) / i."""
    q = math.exp(epsilon) / (1 + math.exp(epsilon))

    def f(w):
        return sum(binom.pmf(k, r, q) for k in range(w, r + 1))

    worst = max((f(v - i) - f(v)) / i for i in range(1, v + 1)) if v else 0.0
    return min(f(v) + 2 * m * delta * worst, 1.0)


@pytest.mark.parametrize(
    ("m", "r", "v", "epsilon", "delta"),
    [
        (100, 40, 35, 1.0, 1e-5),
        (1000, 100, 90, 2.0, 1e-3),
        (50, 50, 30, 0.5, 0.0),
        (10, 6, 0, 1.0, 1e-2),
    ],
)
def test_p_value_is_the_theorem_as_written(m, r, v, epsilon, delta):
    assert p_value(m, r, v, epsilon, delta) == pytest.approx(
        _p_value_as_written(m, r, v, epsilon, delta), rel=1e-9, abs=1e-12
    )


@pytest.mark.parametrize("guesses", [10, 100, 1000])
def test_all_correct_without_delta_is_the_papers_closed_form(guesses):
    # r right guesses out of r reject epsilon while q^r < 1 - confidence, q = e^eps / (1 + e^eps):
    # the bound is log(q / (1 - q)) at q = 0.05^(1/r).
    q = 0.05 ** (1 / guesses)
    assert epsilon_lower_bound(1000, guesses, guesses) == pytest.approx(
        math.log(q / (1 - q)), abs=1e-4
    )


def test_the_ceiling_at_a_thousand_canaries_is_about_six():
    # The (and the paper's) rule of thumb: m = 1,000, all correct, 95%.
    assert 5.7 < ceiling(1000) < 5.9
    assert ceiling(1000, delta=1e-5) < ceiling(1000)  # delta only weakens what can be shown
    assert ceiling(100) < ceiling(1000) < ceiling(10_000)


def test_chance_level_guesses_show_nothing():
    assert epsilon_lower_bound(1000, 1000, 500) == 0.0
    assert epsilon_lower_bound(1000, 1000, 520) == 0.0  # within chance at 95%
    assert epsilon_lower_bound(1000, 0, 0) == 0.0


def test_more_right_guesses_never_lower_the_bound():
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in range(100, 201, 10)]
    assert bounds == sorted(bounds)
    assert bounds[-1] > 3


def test_the_bound_is_where_the_p_value_crosses_the_level():
    bound = epsilon_lower_bound(500, 100, 90, 1e-5, 0.95)
    assert (
        p_value(500, 100, 90, bound * 0.99, 1e-5)
        < 0.05
        <= p_value(500, 100, 90, bound * 1.01, 1e-5)
    )


def test_nonsense_counts_are_refused():
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 20, 5)
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 5, 6)
