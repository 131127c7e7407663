"""Shamir secret sharing over the Mersenne prime field GF(2**521 - 1): a 32-byte secret is
one field element."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

from fedward.common.errors import SecAggError

#: Bytes in a self-mask seed, a derived key and an X25519 key (256 bits each).
SEED_BYTES = 32
#: Shamir shares live in GF(2**521 - 1), a Mersenne prime: one element holds a 32-byte secret.
FIELD_PRIME = 2**521 - 1
#: Bytes of one Shamir share (a field element, big-endian).
SHARE_BYTES = (FIELD_PRIME.bit_length() + 7) // 8


# --- Shamir secret sharing over GF(2**521 - 1) -------------------------------------------------


def _share_point(holder: int) -> int:
    # Node ids start at 0; the secret sits at x = 0, so shift every holder by one.
    return holder + 1


def shamir_split(secret: bytes, threshold: int, holders: Sequence[int]) -> dict[int, bytes]:
    """Split a secret of up to 32 bytes into one share per holder; any `threshold` recover it.

    A random polynomial of degree threshold - 1 with the secret as constant term, evaluated at
    x = holder + 1. Fewer than `threshold` shares reveal nothing about the secret.

    Args:
        secret: At most 32 bytes (a self-mask seed or a raw X25519 private key), read as a
            big-endian integer.
        threshold: How many shares recover the secret, in 1..len(holders).
        holders: Node ids of the share holders: distinct ints >= 0.

    Returns:
        Each holder's share: a field element as `SHARE_BYTES` (66) big-endian bytes.

    Raises:
        SecAggError: a secret longer than 32 bytes, a threshold outside 1..len(holders), or
            holders that are not distinct ids >= 0.
    """
    if len(secret) > SEED_BYTES:
        raise SecAggError(f"secure aggregation: Shamir secrets are at most {SEED_BYTES} bytes")
    if not 1 <= threshold <= len(holders):
        raise SecAggError(
            f"secure aggregation: threshold {threshold} must be between 1 and the number of "
            f"share holders ({len(holders)})"
        )
    if len(set(holders)) != len(holders) or any(int(holder) < 0 for holder in holders):
        # holder -1 would sit at x = 0 and get the secret itself; a repeated holder would let
        # fewer distinct holders than the threshold pass the count above
        raise SecAggError("secure aggregation: Shamir share holders must be distinct ids >= 0")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(FIELD_PRIME) for _ in range(threshold - 1)]
    shares = {}
    for holder in holders:
        x = _share_point(holder)
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % FIELD_PRIME
        shares[holder] = y.to_bytes(SHARE_BYTES, "big")
    return shares


@lru_cache(maxsize=256)
def _lagrange_at_zero(points: tuple[int, ...]) -> tuple[int, ...]:
    # Coefficients l_i with f(0) = sum_i l_i f(x_i); cached because in one round most secrets are
    # recovered from the same set of surviving holders.
    weights = []
    for i, x_i in enumerate(points):
        numerator, denominator = 1, 1
        for j, x_j in enumerate(points):
            if i != j:
                numerator = numerator * x_j % FIELD_PRIME
                denominator = denominator * (x_j - x_i) % FIELD_PRIME
        weights.append(numerator * pow(denominator, -1, FIELD_PRIME) % FIELD_PRIME)
    return tuple(weights)


def shamir_combine(
    shares: Mapping[int, bytes], threshold: int, secret_bytes: int = SEED_BYTES
) -> bytes:
    """Recover a secret from at least `threshold` shares keyed by holder id.

    Only the shares of the `threshold` lowest holder ids are used; the others are not checked.

    Args:
        shares: The shares (`shamir_split`), keyed by holder id.
        threshold: The threshold the secret was split with.
        secret_bytes: Length of the secret (default `SEED_BYTES`, 32).

    Returns:
        The secret as `secret_bytes` big-endian bytes (a shorter secret comes back with
        leading zero bytes).

    Raises:
        SecAggError: (without any share value in the message) fewer than `threshold` shares, a
            share that is not `SHARE_BYTES` bytes or not a field element, or shares that do not
            fit together (their combination does not fit in `secret_bytes`).
    """
    if len(shares) < threshold:
        raise SecAggError(
            f"secure aggregation: {len(shares)} shares are fewer than the threshold {threshold}"
        )
    holders = sorted(shares)[:threshold]
    values = []
    for holder in holders:
        share = shares[holder]
        if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
            raise SecAggError(f"secure aggregation: the share held by node {holder} is malformed")
        value = int.from_bytes(share, "big")
        if value >= FIELD_PRIME:
            raise SecAggError(f"secure aggregation: the share held by node {holder} is malformed")
        values.append(value)
    weights = _lagrange_at_zero(tuple(_share_point(holder) for holder in holders))
    secret = sum(w * v for w, v in zip(weights, values)) % FIELD_PRIME
    if secret.bit_length() > 8 * secret_bytes:
        raise SecAggError("secure aggregation: the shares do not combine into a valid secret")
    return secret.to_bytes(secret_bytes, "big")
