"""Distributed DP noise in SecAgg+'s integer field: the arithmetic hospitals and coordinator share.

With `noise = "distributed"` (issue 39) a hospital does not add the whole DP noise to its update.
Each round it sends one noisy, clipped gradient sum, in integers, masked; the coordinator unmasks
only the sum over the round's hospitals and takes the step (DP-FedSGD). Each hospital adds a
1/t share of the noise variance, so the sum carries the full noise when at least t of the
hospitals in it are honest (Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism
for Federated Learning with Secure Aggregation", ICML 2021).

A unit (a patient, or a record) contributes its clipped gradient g (norm at most C), scaled to
`clip_units` U = ceil(64 sqrt(d)) integer units per C and rounded at random, coordinate by
coordinate, up or down (unbiased); and `count_units` c in one more coordinate, so the coordinator
can divide the sum by a noisy count of the units in it instead of a count the hospital would
have to reveal. Rounding moves each coordinate by less than one, so a unit's integer vector has
norm at most `sensitivity` = sqrt((U + sqrt(d))^2 + c^2): the sensitivity the noise is
calibrated to (rounding costs at most 1/64 of it, the count coordinate 3%).

The noise is the discrete Gaussian N_Z(0, s^2) with s = z * sensitivity / sqrt(t) per
coordinate (`local_noise_std`), sampled exactly as Canonne, Kamath and Steinke ("The Discrete
Gaussian for Differential Privacy", NeurIPS 2020, Algorithm 3) do, from discrete Laplace draws.
The sum of k such draws is not exactly a discrete Gaussian, but it is within `sum_tau` of
N_Z(0, k s^2) (Kairouz et al., Theorem 1); at our scales (s in the thousands) tau is below
1e-300, and the plan refuses a scale where it is not negligible. docs/privacy.md gives the
argument and the epsilon a patient gets when fewer than t hospitals are honest.

The field is Z modulo 2^64 (uint64 masks): a negative integer travels as its two's complement,
and the coordinator reads the sum back as int64. Wrapping around would only spoil the model, not
privacy (it is post-processing of the noisy sum); `check_no_wrap` refuses a round that could.
"""

from __future__ import annotations

import math

import numpy as np

from fedward.common.errors import SecAggError

#: Integer units per sqrt(dimension) that a clipped gradient's norm C maps to: rounding adds at
#: most sqrt(d), 1/64 of the signal's scale.
UNITS_PER_ROOT_DIMENSION = 64
#: The count coordinate is this fraction of the clip scale U (it adds (1/4)^2 to the sensitivity
#: squared; the noisy count's error, in units, is 4 times the noise multiplier).
COUNT_FRACTION = 0.25
#: Largest tau (Kairouz et al.) the plan accepts: the sum of the shares is then N_Z(0, t s^2).
MAX_TAU = 1e-12
#: The sum must stay inside this magnitude (int64 with a margin of 2^8 for the noise's tail).
WRAP_LIMIT = 2**54


#: What a SecAgg+ round's vectors hold: n_u * quantize(delta_u) and n_u (weighted, FedAvg), or
#: a signed integer vector modulo 2^64 (integer: distributed noise's noisy sum and count).
WEIGHTED = "weighted"
INTEGER = "integer"


def check_encoding(encoding: str) -> str:
    """`encoding` if it is one of the two, else `SecAggError`."""
    if encoding not in (WEIGHTED, INTEGER):
        raise SecAggError(
            f"secure aggregation: encoding must be {WEIGHTED!r} or {INTEGER!r}, got {encoding!r}"
        )
    return encoding


def clip_units(dimension: int) -> int:
    """Integer units a gradient of norm `max_grad_norm` is scaled to: ceil(64 sqrt(d))."""
    return math.ceil(UNITS_PER_ROOT_DIMENSION * math.sqrt(dimension))


def count_units(dimension: int) -> int:
    """What one unit adds to the count coordinate (a quarter of `clip_units`)."""
    return max(1, round(COUNT_FRACTION * clip_units(dimension)))


def sensitivity(dimension: int) -> float:
    """Largest norm of one unit's integer vector: sqrt((U + sqrt(d))^2 + c^2)."""
    return math.hypot(clip_units(dimension) + math.sqrt(dimension), count_units(dimension))


def local_noise_std(noise_multiplier: float, dimension: int, trusted_hospitals: int) -> float:
    """Standard deviation of one hospital's share of the noise, per coordinate: t shares add up
    to noise_multiplier times the sensitivity."""
    return noise_multiplier * sensitivity(dimension) / math.sqrt(trusted_hospitals)


def sum_tau(std: float, hospitals: int) -> float:
    """Kairouz et al.'s tau for the sum of `hospitals` discrete Gaussians of `std` each:
    10 * sum_{k=1}^{n-1} exp(-2 pi^2 std^2 k / (k + 1)). Zero for a single hospital."""
    return 10.0 * sum(math.exp(-2 * math.pi**2 * std**2 * k / (k + 1)) for k in range(1, hospitals))


def check_noise_scale(std: float, hospitals: int) -> None:
    """`SecAggError` unless the shares' sum is a discrete Gaussian up to a negligible tau."""
    tau = sum_tau(std, hospitals)
    if not tau <= MAX_TAU:
        raise SecAggError(
            f"distributed noise: a share's standard deviation {std:.3g} is too small for the "
            f"sum of {hospitals} shares to be a discrete Gaussian (tau {tau:.3g} > {MAX_TAU:g}); "
            "raise the noise multiplier"
        )


def sample_discrete_gaussian(
    std: float, size: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """`size` draws of the discrete Gaussian N_Z(0, std^2), as int64.

    Canonne, Kamath and Steinke's rejection sampler: draw Y from the discrete Laplace with scale
    t = floor(std) + 1 and keep it with probability exp(-(|Y| - std^2/t)^2 / (2 std^2)). The
    discrete Laplace is a difference of two geometric draws. Vectorized: the rejected ones are
    drawn again until none is left (about 1.6 tries each on average).
    """
    if not std > 0:
        raise ValueError(f"the discrete Gaussian needs std > 0, got {std!r}")
    rng = rng if rng is not None else np.random.default_rng()
    scale = math.floor(std) + 1
    out = np.empty(size, dtype=np.int64)
    pending = np.arange(size)
    while pending.size:
        p = -math.expm1(-1.0 / scale)  # success probability of each geometric draw
        laplace = rng.geometric(p, pending.size) - rng.geometric(p, pending.size)
        accept = rng.random(pending.size) < np.exp(
            -((np.abs(laplace) - std**2 / scale) ** 2) / (2 * std**2)
        )
        out[pending[accept]] = laplace[accept]
        pending = pending[~accept]
    return out


def round_at_random(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each value rounded down or up to an integer, up with probability its fraction (unbiased);
    int64. Every coordinate moves by less than one."""
    lower = np.floor(values)
    return (lower + (rng.random(values.shape) < values - lower)).astype(np.int64)


def encode_units(clipped: np.ndarray, max_grad_norm: float, rng: np.random.Generator) -> np.ndarray:
    """The integer vector a batch of units adds to the sum: each row of `clipped` (one unit's
    gradient, norm at most `max_grad_norm`) scaled to `clip_units`, rounded at random and added
    up, then the count coordinate (`count_units` per unit). int64, length d + 1."""
    units, dimension = clipped.shape
    scaled = np.asarray(clipped, dtype=np.float64) * (clip_units(dimension) / max_grad_norm)
    total = np.zeros(dimension + 1, dtype=np.int64)
    total[:-1] = round_at_random(scaled, rng).sum(axis=0)
    total[-1] = units * count_units(dimension)
    return total


def check_no_wrap(units: int, dimension: int, std: float, hospitals: int) -> None:
    """`SecAggError` when `hospitals` sums of up to `units` units each, and their noise, could
    leave int64 (the coordinator's reading of the field)."""
    largest = hospitals * (units * sensitivity(dimension) + 64 * std)
    if largest >= WRAP_LIMIT:
        raise SecAggError(
            f"distributed noise: {hospitals} hospitals of up to {units} units could sum to "
            f"{largest:.3g} integer units, past {WRAP_LIMIT:.3g}; sample fewer units per round"
        )


def to_field(vector: np.ndarray) -> np.ndarray:
    """An int64 vector as elements of Z modulo 2^64 (two's complement), ready to be masked."""
    return np.asarray(vector, dtype=np.int64).view(np.uint64)


def decode_sum(total: np.ndarray, max_grad_norm: float) -> tuple[np.ndarray, float]:
    """The unmasked sum (uint64, length d + 1) as the noisy gradient sum in the gradient's own
    scale (float64, length d) and the noisy count of units in it."""
    signed = np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64)
    dimension = signed.size - 1
    gradient_sum = signed[:-1] * (max_grad_norm / clip_units(dimension))
    return gradient_sum, float(signed[-1] / count_units(dimension))
