"""The one-run epsilon lower bound of Steinke, Nasr and Jagielski (NeurIPS 2023, "Privacy
auditing with one (1) training run", arXiv 2305.08846).

m canaries are each put into the training data with probability 1/2, independently. An auditor
who sees the trained model guesses "in" or "out" for r of them (abstaining on the rest) and is
right v times. Their Theorem 5.2: if training is (epsilon, delta)-DP, then

    P[V >= v] <= f(v) + 2 m delta max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(w) = P[Binomial(r, q) >= w],   q = e^epsilon / (1 + e^epsilon),

so an epsilon whose right-hand side is below 1 - confidence is rejected, and the largest
rejected epsilon is a lower bound on the true one, at that confidence. With delta = 0 the bound
is the epsilon of randomized response whose accuracy over r guesses would make v correct
guesses that unlikely. It depends on the data only through (m, r, v).

The bound has a ceiling: even r = m guesses all right reject only epsilon below about
log(q / (1 - q)) with q = (1 - confidence)^(1/m), about 6 at m = 1,000 and 95%. An audit whose
ceiling is below the accounted epsilon cannot show the accounting wrong, whatever it measures;
`ceiling` says where it is.

Pure arithmetic on SciPy's binomial distribution; `tests/simulation/test_privacy_audit_bound.py`
checks it against the paper's closed forms and a direct transcription of its definition.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.stats import binom

#: Beyond this epsilon the search stops: q is 1 to double precision, no count can reject it.
EPSILON_SEARCH_LIMIT = 100.0


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of at least `correct` right guesses out of `guesses` if training were
    (`epsilon`, `delta`)-DP, bounded as in Theorem 5.2 (capped at 1).

    Args:
        canaries: m, the canaries each included with probability 1/2.
        guesses: r, the canaries the auditor guessed on (the others it abstained on).
        correct: v, the right guesses.
        epsilon: The epsilon of the null hypothesis.
        delta: The delta of the null hypothesis.

    Returns:
        The p-value of the observed count under the hypothesis.

    Example:
        >>> round(p_value(1000, 100, 100, 5.0, 0.0), 3)  # randomized response at epsilon 5
        0.511
    """
    _check_counts(canaries, guesses, correct)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"epsilon must be >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(correct - 1, guesses, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0 or correct == 0:
        return min(tail, 1.0)
    # f(v - i) - f(v) = P[v - i <= Binomial(r, q) < v], for i = 1..v: sums of the pmf below v.
    below = binom.pmf(np.arange(correct - 1, -1, -1), guesses, q).cumsum()
    worst = float(np.max(below / np.arange(1, correct + 1)))
    return min(tail + 2 * canaries * delta * worst, 1.0)


def epsilon_lower_bound(
    canaries: int, guesses: int, correct: int, delta: float = 0.0, confidence: float = 0.95
) -> float:
    """The largest epsilon that `correct` right guesses out of `guesses` reject at `confidence`:
    training is not (epsilon, delta)-DP for any smaller epsilon, with that confidence.

    0 when the guesses are no better than chance can explain.

    Args:
        canaries: m, the canaries each included with probability 1/2.
        guesses: r, the guesses made (abstentions left out).
        correct: v, the right guesses.
        delta: The delta the accounting claims.
        confidence: One minus the chance that the bound is wrong for a correct training.

    Returns:
        The empirical lower bound on epsilon.

    Example:
        >>> round(epsilon_lower_bound(1000, 1000, 1000), 2)  # every canary guessed right
        5.81
    """
    _check_counts(canaries, guesses, correct)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    level = 1.0 - confidence

    def excess(epsilon: float) -> float:
        return p_value(canaries, guesses, correct, epsilon, delta) - level

    if excess(0.0) >= 0:
        return 0.0
    if excess(EPSILON_SEARCH_LIMIT) < 0:
        return EPSILON_SEARCH_LIMIT
    return float(brentq(excess, 0.0, EPSILON_SEARCH_LIMIT, xtol=1e-6))


def ceiling(canaries: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """The most an audit with `canaries` canaries can show: every one guessed, every guess
    right. A lower bound below the accounted epsilon means little when this is too."""
    return epsilon_lower_bound(canaries, canaries, canaries, delta, confidence)


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(
            f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}"
        )
