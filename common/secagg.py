"""Secure-aggregation (SecAgg+) primitives that the hospitals and the coordinator must agree on.

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS
2020), built on SecAgg (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017). A hospital sends

    y_u = n_u * quantize(delta_u) + PRG(b_u) + sum_v sign(u, v) * PRG(s_uv)   (mod M)

followed by one more element, its example count n_u, masked the same way. The pairwise masks
PRG(s_uv) cancel in the sum over hospitals; the self masks PRG(b_u) and the pairwise masks of
hospitals that dropped out are removed by the coordinator from Shamir shares that the surviving
neighbours reveal. Only the sum is ever unmasked.

Against an active coordinator (Bonawitz et al. 2017, section 6; Bell et al. 2020): every hospital
signs its advertised keys with its long-term Ed25519 key, bound to run, round, node and the
round's public parameters (`key_statement`), and its peers check the signature against the
federation roster they accepted out of band, so the coordinator cannot swap in keys of its own.
Before anything is unmasked, every survivor signs the survivor set it was told
(`survivor_statement`); a hospital reveals shares only after it sees `consistency_quorum` valid
signatures on that same set, so two hospitals can never be told different dropout stories. That
quorum is a majority only (2 when 3 take part), so it says nothing about how few updates are
unmasked together: each hospital also holds the survivor set to its own site minimum
(`min_secure_aggregation_hospitals`, see `client.secagg`). The reconstruction threshold is at
least a majority of a neighbourhood (`secure_threshold`), so no two disjoint groups of hospitals
can each rebuild one secret of the same hospital.

Everything here is pure (no I/O, no state): quantization, the modulus check, the neighbour graph,
the thresholds, Shamir secret sharing, key agreement, share encryption and mask expansion. The
primitives come from `cryptography`: X25519 key agreement, HKDF-SHA256, ChaCha20-Poly1305 for the
shares in transit, AES-256-CTR as the mask PRG (hardware-accelerated, several times faster than
the ChaCha20 keystream here) and Ed25519 for signatures; seeds are 256 bits. Shamir sharing is
written here over the Mersenne prime field 2**521 - 1, so a 32-byte secret is one field element.

Quantization and weighting. A delta value is clipped to [-clip, clip] and stochastically rounded to
an integer q in [0, 2**bits - 1] (unbiased). The hospital multiplies q by its example count n_u;
the coordinator recovers sum_u n_u * q_u and sum_u n_u (the count slot), and the weighted sum of
deltas is step * sum_u n_u * q_u - clip * sum_u n_u with step = 2 * clip / (2**bits - 1). The
modulus is the smallest power of two above num_hospitals * max_weight * (2**bits - 1), so the sum
can never wrap; it must fit in 64 bits (`check_modulus`). The error of the weighted average is
below one quantization step per coordinate (`quantization_bound`).
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedward.common.errors import SecAggError

# The five stages of a SecAgg+ round, in order. Every message names its stage.
ADVERTISE_KEYS = "advertise_keys"
SHARE_KEYS = "share_keys"
MASKED_UPDATE = "masked_update"
CONSISTENCY_CHECK = "consistency_check"
UNMASK = "unmask"
STAGES = (ADVERTISE_KEYS, SHARE_KEYS, MASKED_UPDATE, CONSISTENCY_CHECK, UNMASK)

#: Bytes in a self-mask seed, a derived key and an X25519 key (256 bits each).
SEED_BYTES = 32
#: Shamir shares live in GF(2**521 - 1), a Mersenne prime: one element holds a 32-byte secret.
FIELD_PRIME = 2**521 - 1
#: Bytes of one Shamir share (a field element, big-endian).
SHARE_BYTES = (FIELD_PRIME.bit_length() + 7) // 8
#: Node ids are Flower node ids: unsigned 64-bit integers.
MAX_NODE_ID = 2**64 - 1
#: The masked vectors are numpy uint64, so the modulus is at most 2**64.
MAX_MODULUS_BITS = 64

_NONCE_BYTES = 12  # ChaCha20-Poly1305
_PRG_NONCE = bytes(16)  # every PRG seed is used for exactly one mask, so a fixed nonce is safe


# --- quantization and the modulus --------------------------------------------------------------


def check_modulus(num_hospitals: int, max_weight: int, clip: float, bits: int) -> int:
    """Bits of the power-of-two modulus that lets `num_hospitals` weighted updates sum exactly.

    Each coordinate of a hospital's update is at most `max_weight * (2**bits - 1)`, so the sum of
    `num_hospitals` of them (and of their example counts, the last slot) stays below
    `2**modulus_bits`. `clip` only sets the range the `bits` cover; it does not change the
    modulus, and it is checked here so a bad value fails early. Raises `SecAggError` when the
    modulus would need more than 64 bits (the masked vectors are uint64).
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
    """Width of one quantization level: the range [-clip, clip] cut into 2**bits - 1 steps."""
    return 2.0 * clip / (2**bits - 1)


def quantization_bound(clip: float, bits: int) -> float:
    """Largest absolute error, per coordinate, of the securely aggregated weighted average.

    Stochastic rounding moves each value by less than one step, so any weighted average of the
    rounded values is within one step of the weighted average of the clipped values. A small
    term covers float64 rounding in the dequantization. Multiply by the total weight for the
    bound on the weighted sum. Values outside [-clip, clip] are clipped first; that error is not
    included (it is the point of the clipping range).
    """
    return quantization_step(clip, bits) + 32 * float(np.finfo(np.float64).eps) * clip


def quantize(
    values: np.ndarray, clip: float, bits: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Clip `values` to [-clip, clip] and round them stochastically to ints in [0, 2**bits - 1].

    The rounding is unbiased: a value 30% of the way from one level to the next rounds up with
    probability 0.3. `rng` only drives the rounding (no secret depends on it).
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


def dequantize_sum(
    quantized_sum: np.ndarray, total_weight: int, clip: float, bits: int
) -> np.ndarray:
    """Turn sum_u n_u * q_u into sum_u n_u * delta_u (float64); total_weight is sum_u n_u."""
    step = quantization_step(clip, bits)
    return (
        np.asarray(quantized_sum, dtype=np.uint64).astype(np.float64) * step - clip * total_weight
    )


# --- the SecAgg+ graph and thresholds ----------------------------------------------------------


def round_seed(run_id: int | str, server_round: int) -> bytes:
    """Public seed of one round's neighbour graph; every party derives it from run id and round."""
    return hashlib.sha256(
        f"fedward-secagg-graph|run={run_id}|round={server_round}".encode()
    ).digest()


def secagg_graph(
    node_ids: Sequence[int], neighbours: int, public_seed: bytes
) -> dict[int, tuple[int, ...]]:
    """Each node's neighbours (itself excluded) in the round's SecAgg+ graph.

    `neighbours == 0`, or at least `len(node_ids) - 1`, means all-to-all (SecAgg). Otherwise the
    graph is a Harary graph on a public random ring (Bell et al. 2020): the nodes are ordered by
    SHA-256(public_seed, node id) and each is joined to the `k / 2` nodes on either side, where
    `k` is `neighbours` rounded up to even. The graph is symmetric and every node has the same
    degree. The ordering uses only SHA-256, so all parties agree whatever their numpy version.
    """
    nodes = check_node_ids(node_ids)
    if neighbours < 0:
        raise SecAggError(f"secure aggregation: secagg_neighbours must be >= 0, got {neighbours}")
    count = len(nodes)
    degree = neighbours + (neighbours % 2)
    if neighbours == 0 or degree >= count - 1:
        return {node: tuple(other for other in nodes if other != node) for node in nodes}
    ring = sorted(
        nodes, key=lambda node: hashlib.sha256(public_seed + node.to_bytes(8, "big")).digest()
    )
    graph: dict[int, tuple[int, ...]] = {}
    for position, node in enumerate(ring):
        near = {ring[(position + offset) % count] for offset in range(1, degree // 2 + 1)}
        near |= {ring[(position - offset) % count] for offset in range(1, degree // 2 + 1)}
        graph[node] = tuple(sorted(near))
    return graph


def check_node_ids(node_ids: Sequence[int]) -> list[int]:
    """Sorted node ids, after checking they are distinct unsigned 64-bit ints."""
    nodes = list(node_ids)
    for node in nodes:
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node <= MAX_NODE_ID:
            raise SecAggError(
                f"secure aggregation: node id {node!r} is not an unsigned 64-bit int "
                "(a Flower node id)"
            )
    if len(set(nodes)) != len(nodes):
        raise SecAggError("secure aggregation: the round's node ids contain duplicates")
    return sorted(nodes)


def threshold_from_fraction(fraction: float, neighbourhood_size: int) -> int:
    """Reconstruction threshold t for a neighbourhood (a node and its neighbours) of this size.

    t = ceil(fraction * size), at least 2 and at most the size; `secagg_threshold` is the
    fraction. A node's secrets are recovered while at least t of its neighbourhood survive.
    """
    if not 0 < fraction <= 1:
        raise SecAggError(f"secure aggregation: secagg_threshold must be in (0, 1], got {fraction}")
    if neighbourhood_size < 2:
        raise SecAggError(
            "secure aggregation needs at least 2 hospitals per round; sample more hospitals "
            "or turn secure_aggregation off"
        )
    wanted = math.ceil(round(fraction * neighbourhood_size, 9))
    return min(neighbourhood_size, max(2, wanted))


def check_threshold(threshold: int, neighbourhood_size: int) -> None:
    """Raise `SecAggError` unless 2 <= threshold <= neighbourhood_size."""
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise SecAggError(f"secure aggregation: threshold must be an int, got {threshold!r}")
    if not 2 <= threshold <= neighbourhood_size:
        raise SecAggError(
            f"secure aggregation: threshold {threshold} must be between 2 and the neighbourhood "
            f"size {neighbourhood_size}; raise secagg_neighbours or lower secagg_threshold"
        )


def majority(count: int) -> int:
    """Fewest members that are more than half of `count`."""
    return count // 2 + 1


def secure_threshold(fraction: float, neighbourhood_size: int) -> int:
    """`threshold_from_fraction`, raised to a majority of the neighbourhood when it is below.

    With a majority threshold, the hospitals that reveal a node's self-mask seed share and those
    that reveal its mask-key share must overlap; a hospital never reveals both for one node, so
    the coordinator cannot rebuild both secrets of one hospital however it splits the cohort.
    """
    return max(threshold_from_fraction(fraction, neighbourhood_size), majority(neighbourhood_size))


def consistency_quorum(threshold: int, cohort_size: int) -> int:
    """Valid signatures on one survivor set that a hospital needs before it reveals any share.

    At least the reconstruction threshold and a majority of the round's cohort: two different
    survivor sets cannot both reach a cohort majority unless some hospital signed both, which an
    honest hospital never does. It bounds disagreement, not the size of the sum: 2 of 3 reach it,
    so the hospitals check the survivor set against their own minimum cohort as well.
    """
    return max(threshold, majority(cohort_size))


def mask_sign(node_id: int, other_id: int) -> int:
    """+1 if `node_id` adds the pairwise mask it shares with `other_id`, -1 if it subtracts it."""
    return 1 if node_id < other_id else -1


# --- Shamir secret sharing over GF(2**521 - 1) -------------------------------------------------


def _share_point(holder: int) -> int:
    # Node ids start at 0; the secret sits at x = 0, so shift every holder by one.
    return holder + 1


def shamir_split(secret: bytes, threshold: int, holders: Sequence[int]) -> dict[int, bytes]:
    """Split a secret of up to 32 bytes into one share per holder; any `threshold` recover it.

    A random polynomial of degree threshold - 1 with the secret as constant term, evaluated at
    x = holder + 1. Fewer than `threshold` shares reveal nothing about the secret.
    """
    if len(secret) > SEED_BYTES:
        raise SecAggError(f"secure aggregation: Shamir secrets are at most {SEED_BYTES} bytes")
    if not 1 <= threshold <= len(holders):
        raise SecAggError(
            f"secure aggregation: threshold {threshold} must be between 1 and the number of "
            f"share holders ({len(holders)})"
        )
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

    Raises `SecAggError` (without any share value in the message) when there are too few shares,
    a share is malformed, or the shares do not fit together.
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


# --- key agreement, share encryption, binding --------------------------------------------------


def binding(
    run_id: int | str, server_round: int, stage: str, source: int, destination: int
) -> bytes:
    """What a message is bound to: run, round, stage, sender and receiver (AEAD associated data)."""
    return (
        f"fedward-secagg/v1|run={run_id}|round={server_round}|stage={stage}"
        f"|from={source}|to={destination}"
    ).encode()


def agree_key(private_key: X25519PrivateKey, peer_public_key: bytes, context: bytes) -> bytes:
    """32-byte key shared by two nodes: X25519 between them, then HKDF-SHA256 bound to `context`.

    Raises `ValueError` for a malformed or degenerate public key; callers name node and stage.
    """
    peer = X25519PublicKey.from_public_bytes(peer_public_key)
    shared = private_key.exchange(peer)
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=context).derive(
        shared
    )


def pair_context(run_id: int | str, server_round: int, purpose: str, a: int, b: int) -> bytes:
    """HKDF context for the key two nodes share: the same whichever of them derives it."""
    low, high = min(a, b), max(a, b)
    return binding(run_id, server_round, purpose, low, high)


def encrypt_share(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ChaCha20-Poly1305 under a fresh random nonce; returns nonce || ciphertext || tag."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def decrypt_share(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Inverse of `encrypt_share`; `SecAggError` if the ciphertext or its binding is wrong."""
    if len(ciphertext) < _NONCE_BYTES + 16:
        raise SecAggError("secure aggregation: encrypted share is too short")
    try:
        return ChaCha20Poly1305(key).decrypt(
            ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], associated_data
        )
    except InvalidTag:
        raise SecAggError(
            "secure aggregation: encrypted share does not authenticate (it was altered, or it "
            "belongs to another run, round, stage, sender or receiver)"
        ) from None


# --- signatures: authenticated keys and the consistency check ----------------------------------


def params_digest(params: Mapping[str, Any]) -> bytes:
    """SHA-256 of a round's public parameters (the advertise_keys request, less the header).

    Signed with the keys and with the survivor set, so a hospital only trusts peers that were
    shown the very same cohort, threshold and modulus: a coordinator that shows different
    hospitals different rounds is caught at the first signature.
    """
    canonical = "|".join(f"{key}={params[key]!r}" for key in sorted(params))
    return hashlib.sha256(f"fedward-secagg-params|{canonical}".encode()).digest()


def key_statement(
    run_id: int | str,
    server_round: int,
    node_id: int,
    digest: bytes,
    share_public_key: bytes,
    mask_public_key: bytes,
) -> bytes:
    """What a hospital signs when it advertises its two public keys."""
    return b"|".join(
        [
            binding(run_id, server_round, ADVERTISE_KEYS, node_id, node_id),
            digest,
            share_public_key,
            mask_public_key,
        ]
    )


def survivor_statement(
    run_id: int | str, server_round: int, node_id: int, digest: bytes, survivors: Sequence[int]
) -> bytes:
    """What a survivor signs in the consistency check: the survivor set it was told."""
    members = ",".join(str(node) for node in sorted(survivors))
    return b"|".join(
        [
            binding(run_id, server_round, CONSISTENCY_CHECK, node_id, node_id),
            digest,
            f"survivors={members}".encode(),
        ]
    )


def verify_signature(public_key: bytes, signature: bytes, statement: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `statement` by `public_key`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, statement)
    except (InvalidSignature, ValueError):
        return False
    return True


# --- masks ---------------------------------------------------------------------------------------


def expand_mask(seed: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """`length` uniform values in [0, 2**modulus_bits) from a 32-byte seed (AES-256-CTR).

    The keystream is read as little-endian uint64 and reduced by bit masking, which keeps it
    uniform because the modulus is a power of two. One cipher call, no Python loop over elements.
    """
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"secure aggregation: mask seeds are {SEED_BYTES} bytes")
    mask = np.empty(length, dtype="<u8")
    if length == 0:
        return mask.astype(np.uint64)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_PRG_NONCE)).encryptor()
    # Encrypting zeros yields the bare keystream, written straight into the array's memory.
    written = encryptor.update_into(_zeros(8 * length), mask.view(np.uint8))
    if written != 8 * length:
        raise SecAggError("secure aggregation: the mask PRG returned a short keystream")
    mask = mask.astype(np.uint64, copy=False)
    return reduce_modulus(mask, modulus_bits)


_ZEROS = np.zeros(0, dtype=np.uint8)


def _zeros(size: int) -> np.ndarray:
    """A read-only buffer of `size` zero bytes, kept between calls (the PRG's plaintext)."""
    global _ZEROS
    if _ZEROS.size < size:
        _ZEROS = np.zeros(size, dtype=np.uint8)
        _ZEROS.flags.writeable = False
    return _ZEROS[:size]


#: Mask values generated at a time by `add_masks`: 512 KiB of keystream, so the buffer and the
#: slice of the vector it is added to stay in the processor's cache.
_MASK_CHUNK = 1 << 16


def add_masks(
    values: np.ndarray, masks: Sequence[tuple[bytes, int]], modulus_bits: int
) -> np.ndarray:
    """Add sign * `expand_mask(seed, ...)` to uint64 `values` for each (seed, sign), in place.

    The same arithmetic as adding or subtracting each expanded mask, modulo 2**modulus_bits,
    without building any mask in full: each seed's AES-256-CTR keystream is generated a chunk at
    a time into one reused buffer and added (sign +1) or subtracted (sign -1) straight away. The
    keystream is not reduced first (the power-of-two modulus makes that the same), so the result
    is reduced once, at the end (`reduce_modulus`).
    """
    for seed, sign in masks:
        if len(seed) != SEED_BYTES:
            raise SecAggError(f"secure aggregation: mask seeds are {SEED_BYTES} bytes")
        if sign not in (1, -1):
            raise SecAggError(
                f"secure aggregation: a mask is added (+1) or subtracted (-1), not {sign!r}"
            )
    streams = [
        (Cipher(algorithms.AES(seed), modes.CTR(_PRG_NONCE)).encryptor(), sign)
        for seed, sign in masks
    ]
    buffer = np.empty(min(_MASK_CHUNK, values.size), dtype="<u8")
    for first in range(0, values.size, _MASK_CHUNK):
        part = values[first : first + _MASK_CHUNK]
        keystream = buffer[: part.size]
        for encryptor, sign in streams:
            # Encrypting zeros yields the bare keystream: the next part.size mask values.
            written = encryptor.update_into(_zeros(8 * part.size), keystream.view(np.uint8))
            if written != 8 * part.size:
                raise SecAggError("secure aggregation: the mask PRG returned a short keystream")
            (np.add if sign > 0 else np.subtract)(part, keystream, out=part)
    return reduce_modulus(values, modulus_bits)


def reduce_modulus(values: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Reduce uint64 values (already wrapped mod 2**64) modulo 2**modulus_bits, in place."""
    if modulus_bits < 64:
        values &= np.uint64((1 << modulus_bits) - 1)
    return values


# --- payload checks shared by both sides ---------------------------------------------------------


def header(run_id: int | str, server_round: int, stage: str, node_id: int) -> dict[str, Any]:
    """The fields every SecAgg payload starts with (node_id: sender of a reply, receiver of a
    request)."""
    return {"run_id": str(run_id), "round": server_round, "stage": stage, "node_id": node_id}


def check_header(
    payload: Mapping[str, Any], run_id: int | str, server_round: int, stage: str, node_id: int
) -> None:
    """Raise `SecAggError` unless `payload` belongs to this run, round, stage and node."""
    if not isinstance(payload, Mapping):
        raise SecAggError(f"node {node_id}, stage {stage}: payload is not a mapping")
    got = (
        payload.get("run_id"),
        payload.get("round"),
        payload.get("stage"),
        payload.get("node_id"),
    )
    want = (str(run_id), server_round, stage, node_id)
    if got != want:
        raise SecAggError(
            f"node {node_id}, stage {stage}: message is for run {got[0]!r}, round {got[1]!r}, "
            f"stage {got[2]!r}, node {got[3]!r}, but this is run {want[0]!r}, round {want[1]}, "
            f"stage {want[2]!r}, node {want[3]} (a replayed or misrouted message); it was rejected"
        )


def read_field(payload: Mapping[str, Any], key: str, kind: type, node_id: int, stage: str) -> Any:
    """`payload[key]`, checked to be a `kind` (int, float, str, bytes)."""
    if key not in payload:
        raise SecAggError(f"node {node_id}, stage {stage}: payload has no '{key}'")
    value = payload[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise SecAggError(
            f"node {node_id}, stage {stage}: '{key}' must be {kind.__name__}, "
            f"got {type(value).__name__}"
        )
    return value


def read_list(
    payload: Mapping[str, Any], key: str, kind: type, node_id: int, stage: str
) -> list[Any]:
    """`payload[key]` as a list whose items are all `kind` (int or bytes)."""
    if key not in payload:
        raise SecAggError(f"node {node_id}, stage {stage}: payload has no '{key}'")
    value = payload[key]
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise SecAggError(f"node {node_id}, stage {stage}: '{key}' must be a list")
    for item in value:
        if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
            raise SecAggError(
                f"node {node_id}, stage {stage}: '{key}' must hold {kind.__name__} values, "
                f"got {type(item).__name__}"
            )
    return list(value)


def read_node_keyed(
    payload: Mapping[str, Any], ids_key: str, values_key: str, node_id: int, stage: str
) -> dict[int, bytes]:
    """Two parallel lists (node ids, bytes) as a dict; rejects duplicates and length mismatches."""
    ids = read_list(payload, ids_key, int, node_id, stage)
    values = read_list(payload, values_key, bytes, node_id, stage)
    if len(ids) != len(values):
        raise SecAggError(
            f"node {node_id}, stage {stage}: '{ids_key}' has {len(ids)} entries but "
            f"'{values_key}' has {len(values)}"
        )
    if len(set(ids)) != len(ids):
        raise SecAggError(f"node {node_id}, stage {stage}: '{ids_key}' lists a node twice")
    return dict(zip(ids, values))


# --- packing masked vectors for the wire -------------------------------------------------------


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint64 values below 2**bits into a uint8 array of ceil(len * bits / 8) bytes.

    Masked values are uniform modulo 2**modulus_bits, so sending `modulus_bits` per value
    instead of 64 is what keeps a masked upload close to the size of a plain float32 update.
    Value i occupies bits [i * bits, (i + 1) * bits) of the little-endian bit stream. Values are
    written in eight interleaved passes (i mod 8): within one pass they are `bits` bytes apart,
    so each is one unaligned 64-bit OR into a strided view, with no per-bit expansion.
    """
    values = np.ascontiguousarray(values, dtype="<u8")
    if bits < 1 or bits > 64:
        raise SecAggError(f"secure aggregation: cannot pack {bits}-bit values")
    count = values.size
    size = (count * bits + 7) // 8
    if bits < 8 or bits > 56:
        return _pack_bits_slow(values, bits)
    out = np.zeros(size + 8, dtype=np.uint8)  # 8 spare bytes for the last 64-bit window
    shifted = np.empty(_PACK_CHUNK // 8, dtype="<u8")  # one buffer for every pass
    for values_of_pass, window, shift in _windows(values, out, bits):
        moved = shifted[: window.size]
        np.left_shift(values_of_pass, shift, out=moved)
        np.bitwise_or(window, moved, out=window)
    return out[:size]


#: Values packed or unpacked at a time: a multiple of 8 (each chunk starts on a byte boundary),
#: small enough that a chunk's eight strided passes stay in the processor's cache.
_PACK_CHUNK = 8 * 4096


def _windows(values: np.ndarray, packed: np.ndarray, bits: int):
    """The passes of packing `values` into (or unpacking them from) `packed`, chunk by chunk:
    (every 8th value of the chunk, the strided 64-bit view of `packed` that holds them, the shift
    of those values within it). Value i of a pass starts `bits` bytes after value i - 1."""
    for first in range(0, values.size, _PACK_CHUNK):
        block = values[first : first + _PACK_CHUNK]
        base = first * bits // 8
        for phase in range(min(8, block.size)):
            start, shift = divmod(phase * bits, 8)
            window = np.ndarray(
                ((block.size - phase + 7) // 8,),
                dtype="<u8",
                buffer=packed,
                offset=base + start,
                strides=(bits,),
            )
            yield block[phase::8], window, np.uint64(shift)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` uint64 values of `bits` bits each."""
    packed = np.asarray(packed, dtype=np.uint8)
    needed = (count * bits + 7) // 8
    if packed.ndim != 1 or packed.size != needed:
        raise SecAggError(
            f"secure aggregation: packed vector has {packed.size} bytes, expected {needed} "
            f"for {count} values of {bits} bits"
        )
    if bits < 8 or bits > 56:
        return _unpack_bits_slow(packed, bits, count)
    padded = np.zeros(needed + 8, dtype=np.uint8)
    padded[:needed] = packed
    out = np.empty(count, dtype=np.uint64)
    low = np.uint64((1 << bits) - 1)
    for values, window, shift in _windows(out, padded, bits):
        np.right_shift(window, shift, out=values)  # shift and mask in place: no temporaries
        np.bitwise_and(values, low, out=values)
    return out


def sum_packed(packed_vectors: Sequence[np.ndarray], bits: int, count: int) -> np.ndarray:
    """The sum, modulo 2**bits, of vectors packed by `pack_bits`: `count` uint64 values.

    What the coordinator needs from the masked updates, without unpacking any of them into a
    vector of its own. The packed bytes are read through the same 64-bit windows as
    `unpack_bits`, but the bits above a value (the start of the next one) are not masked off:
    they only reach bits at or above `bits` of the sum, which the final reduction drops. The
    window of every 8th value ("phase") of a chunk is added to a contiguous row of an
    accumulator that stays in cache for all the vectors; one transpose per chunk puts the sums
    back in order.
    """
    size = (count * bits + 7) // 8
    packed_vectors = [np.ascontiguousarray(packed) for packed in packed_vectors]
    for index, packed in enumerate(packed_vectors):
        if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != size:
            raise SecAggError(
                f"secure aggregation: packed vector {index} has {packed.size} bytes, expected "
                f"{size} for {count} values of {bits} bits"
            )
    if bits < 8 or bits > 56:
        total = np.zeros(count, dtype=np.uint64)
        for packed in packed_vectors:
            total += unpack_bits(packed, bits, count)
        return reduce_modulus(total, bits)
    groups = (count + 7) // 8  # 8 values take `bits` bytes
    total = np.empty(8 * groups, dtype=np.uint64)
    by_group = total.reshape(groups, 8)
    phases = [divmod(phase * bits, 8) for phase in range(8)]  # (byte, shift) within a group
    # Groups whose last window ends inside the packed bytes; the rest are read from a copy.
    inside = min(groups, max(0, (size - 8 - phases[7][0]) // bits + 1))
    chunk = _SUM_CHUNK // 8
    rows = np.empty((8, min(chunk, groups)), dtype=np.uint64)
    shifted = np.empty(rows.shape[1], dtype=np.uint64)

    def add_groups(sources: Sequence[np.ndarray], offset: int, first: int, last: int) -> None:
        sums = rows[:, : last - first]
        sums.fill(0)
        moved = shifted[: last - first]
        for packed in sources:
            for phase, (start, shift) in enumerate(phases):
                window = np.ndarray(
                    (last - first,),
                    dtype="<u8",
                    buffer=packed,
                    offset=offset + start,
                    strides=(bits,),
                )
                if shift:
                    np.right_shift(window, np.uint64(shift), out=moved)
                    np.add(sums[phase], moved, out=sums[phase])
                else:
                    np.add(sums[phase], window, out=sums[phase])
        by_group[first:last] = sums.T

    for first in range(0, inside, chunk):
        last = min(inside, first + chunk)
        add_groups(packed_vectors, first * bits, first, last)
    if inside < groups:  # the last few groups: their windows would run past the end
        tails = []
        for packed in packed_vectors:
            tail = np.zeros((groups - inside) * bits + 8, dtype=np.uint8)
            tail[: size - inside * bits] = packed[inside * bits :]
            tails.append(tail)
        add_groups(tails, 0, inside, groups)
    return reduce_modulus(total[:count], bits)


#: Values summed at a time by `sum_packed`: the accumulator (8 bytes a value) stays in cache.
_SUM_CHUNK = 8 * 8192


def _pack_bits_slow(values: np.ndarray, bits: int) -> np.ndarray:
    # Bit by bit, for widths where a value plus its shift may not fit one 64-bit window.
    as_bits = np.unpackbits(values.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    return np.packbits(as_bits[:, :bits].ravel(), bitorder="little")


def _unpack_bits_slow(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    as_bits = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits)
    full = np.zeros((count, 64), dtype=np.uint8)
    full[:, :bits] = as_bits
    return np.packbits(full, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)
