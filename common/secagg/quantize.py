"""Quantization of updates to integers, and the modulus their weighted sum never wraps."""

from __future__ import annotations

import math

import numpy as np

from fedward.common.errors import SecAggError

#: The masked vectors are numpy uint64, so the modulus is at most 2**64.
MAX_MODULUS_BITS = 64


# --- quantization and the modulus --------------------------------------------------------------


def check_modulus(num_hospitals: int, max_weight: int, clip: float, bits: int) -> int:
    """Bits of the power-of-two modulus that lets `num_hospitals` weighted updates sum exactly.

    Each coordinate of a hospital's update is at most `max_weight * (2**bits - 1)`, so the sum of
    `num_hospitals` of them (and of their example counts, the last slot) stays below
    `2**modulus_bits`. `clip` only sets the range the `bits` cover; it does not change the
    modulus, and it is checked here so a bad value fails early.

    Args:
        num_hospitals: How many hospitals the round sampled, an int >= 1.
        max_weight: The largest example count a hospital may weight its update with
            (`secagg_max_weight`), an int >= 1.
        clip: Half-width of the quantization range (`secagg_clip`): finite and > 0.
        bits: Quantization bits per value (`secagg_bits`), an int in 1..64.

    Returns:
        The modulus's bits: the bit length of num_hospitals * max_weight * (2**bits - 1),
        at most 64.

    Raises:
        SecAggError: an argument that is not of its type or range above (a bool is not an
            int), or a modulus that would need more than 64 bits (the masked vectors are
            uint64).
    """
    if isinstance(num_hospitals, bool) or not isinstance(num_hospitals, int) or num_hospitals < 1:
        raise SecAggError(
            f"secure aggregation: num_hospitals must be an int >= 1, got {num_hospitals!r}"
        )
    if isinstance(max_weight, bool) or not isinstance(max_weight, int) or max_weight < 1:
        raise SecAggError(
            f"secure aggregation: the largest example count (max weight) must be an int >= 1, "
            f"got {max_weight!r}"
        )
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_MODULUS_BITS:
        raise SecAggError(f"secure aggregation: secagg_bits must be an int in 1..64, got {bits!r}")
    if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise SecAggError(
            f"secure aggregation: secagg_clip must be a finite number > 0, got {clip!r}"
        )
    largest_sum = num_hospitals * max_weight * (2**bits - 1)
    modulus_bits = largest_sum.bit_length()
    if modulus_bits > MAX_MODULUS_BITS:
        raise SecAggError(
            f"secure aggregation: {num_hospitals} hospitals with up to {max_weight} examples each "
            f"and {bits}-bit quantization need a {modulus_bits}-bit modulus, more than the "
            f"{MAX_MODULUS_BITS} bits available; lower secagg_bits (now {bits}), sample fewer "
            f"hospitals per round, or lower secagg_max_weight (secagg_clip does not change the "
            f"modulus, only the range the bits cover)"
        )
    return modulus_bits


def quantization_step(clip: float, bits: int) -> float:
    """Width of one quantization level: the range [-clip, clip] cut into 2**bits - 1 steps.

    Args:
        clip: Half-width of the quantization range, > 0.
        bits: Quantization bits per value, >= 1.

    Returns:
        2 * clip / (2**bits - 1).
    """
    return 2.0 * clip / (2**bits - 1)


def quantization_bound(clip: float, bits: int) -> float:
    """Largest absolute error, per coordinate, of the securely aggregated weighted average.

    Stochastic rounding moves each value by less than one step, so any weighted average of the
    rounded values is within one step of the weighted average of the clipped values. A small
    term covers float64 rounding in the dequantization. Multiply by the total weight for the
    bound on the weighted sum. Values outside [-clip, clip] are clipped first; that error is not
    included (it is the point of the clipping range).

    Args:
        clip: Half-width of the quantization range, > 0.
        bits: Quantization bits per value, >= 1.

    Returns:
        One quantization step plus 32 float64 epsilons times `clip`.
    """
    return quantization_step(clip, bits) + 32 * float(np.finfo(np.float64).eps) * clip


def quantize(
    values: np.ndarray, clip: float, bits: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Clip `values` to [-clip, clip] and round them stochastically to ints in [0, 2**bits - 1].

    The rounding is unbiased: a value 30% of the way from one level to the next rounds up with
    probability 0.3. `rng` only drives the rounding (no secret depends on it).

    Args:
        values: Finite floats of any shape (not checked here; read as float64, not changed).
        clip: Half-width of the quantization range, > 0.
        bits: Quantization bits per value, >= 1.
        rng: The generator for the rounding; None means a fresh OS-seeded
            `np.random.default_rng()`.

    Returns:
        A uint64 array of the shape of `values`: level k stands for
        -clip + k * quantization_step(clip, bits).
    """
    rng = rng if rng is not None else np.random.default_rng()
    levels = 2**bits - 1
    scaled = np.clip(np.asarray(values, dtype=np.float64), -clip, clip)
    scaled += clip
    scaled *= levels / (2.0 * clip)
    lower = np.floor(scaled)
    scaled -= lower  # the fraction to the next level: the chance of rounding up
    rounded = lower.astype(np.uint64)
    rounded += rng.random(scaled.shape) < scaled
    return np.minimum(rounded, np.uint64(levels), out=rounded)  # float rounding at the top


def weighted_field_vector(
    values: np.ndarray, weight: int, clip: float, bits: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """One hospital's contribution to a weighted secure sum, before masking: `weight` times
    each quantized value (`quantize`), then `weight` itself, as uint64 of length len(values) + 1.
    Summed over hospitals and dequantized (`dequantize_sum`), the last entry is the divisor of
    the weighted average.

    Args:
        values: The hospital's flat update: a 1-D array of finite floats.
        weight: Its example count n_u, an int in 0..max_weight (not checked here; above
            max_weight the round's sum may wrap its modulus, `check_modulus`).
        clip: Half-width of the quantization range, > 0.
        bits: Quantization bits per value, >= 1.
        rng: The generator for the rounding, as in `quantize`.

    Returns:
        A uint64 array: weight * quantize(values, clip, bits, rng), then weight.
    """
    vector = np.empty(len(values) + 1, dtype=np.uint64)
    vector[:-1] = quantize(values, clip, bits, rng) * np.uint64(weight)
    vector[-1] = weight
    return vector


def dequantize_sum(
    quantized_sum: np.ndarray, total_weight: int, clip: float, bits: int
) -> np.ndarray:
    """Turn sum_u n_u * q_u into sum_u n_u * delta_u (float64); total_weight is sum_u n_u.

    Args:
        quantized_sum: The unmasked sum of the hospitals' quantized, weighted values, without
            the count slot (read as uint64).
        total_weight: The sum of their example counts (the count slot).
        clip: Half-width of the quantization range the hospitals used.
        bits: Quantization bits per value the hospitals used, >= 1.

    Returns:
        A float64 array of the shape of `quantized_sum`: the weighted sum of the clipped
        deltas, step * quantized_sum - clip * total_weight, within total_weight *
        `quantization_bound` per coordinate. Divide by total_weight for the weighted average.
    """
    step = quantization_step(clip, bits)
    return (
        np.asarray(quantized_sum, dtype=np.uint64).astype(np.float64) * step - clip * total_weight
    )
