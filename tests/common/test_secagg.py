"""The SecAgg+ primitives: quantization, modulus, graph, thresholds, Shamir, keys, masks."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from fedward.common.errors import SecAggError
from fedward.common.secagg import (
    SEED_BYTES,
    add_masks,
    agree_key,
    binding,
    check_modulus,
    check_threshold,
    decrypt_share,
    dequantize_sum,
    encrypt_share,
    expand_mask,
    mask_sign,
    pack_bits,
    quantization_bound,
    quantize,
    round_seed,
    secagg_graph,
    shamir_combine,
    shamir_split,
    sum_packed,
    threshold_from_fraction,
    weighted_field_vector,
)

# Chi-square with 15 degrees of freedom exceeds 60 with probability about 3e-7.
CHI_SQUARE_15_CRITICAL = 60.0


def chi_square_high_bits(values: np.ndarray, modulus_bits: int) -> float:
    """Chi-square statistic of the top 4 bits of values in [0, 2**modulus_bits) against uniform."""
    bins = (values >> np.uint64(modulus_bits - 4)).astype(np.int64)
    counts = np.bincount(bins, minlength=16)
    expected = len(values) / 16
    return float(((counts - expected) ** 2 / expected).sum())


# --- quantization ------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.integers(1, 3000),
    clip=st.floats(0.01, 100.0),
    bits=st.sampled_from([8, 12, 16, 24, 32, 40]),
    weights=st.lists(st.integers(1, 10_000), min_size=1, max_size=12),
)
def test_weighted_average_of_quantized_values_is_within_the_bound(seed, size, clip, bits, weights):
    rng = np.random.default_rng(seed)
    deltas = [rng.uniform(-clip, clip, size) for _ in weights]
    summed = sum(weighted_field_vector(d, w, clip, bits, rng) for w, d in zip(weights, deltas))
    total = sum(weights)
    assert summed[-1] == total  # the divisor travels in the sum
    average = dequantize_sum(summed[:-1], total, clip, bits) / total
    expected = sum(w * d for w, d in zip(weights, deltas)) / total
    assert np.max(np.abs(average - expected)) <= quantization_bound(clip, bits)


def test_quantize_clips_to_the_range_and_stays_in_the_levels():
    values = np.array([-5.0, -1.0, 0.0, 1.0, 7.0])
    q = quantize(values, clip=1.0, bits=8, rng=np.random.default_rng(0))
    assert q.dtype == np.uint64
    assert q[0] == 0 and q[1] == 0 and q[3] == 255 and q[4] == 255
    back = dequantize_sum(q, 1, 1.0, 8)
    assert back[0] == pytest.approx(-1.0) and back[4] == pytest.approx(1.0)


def test_stochastic_rounding_is_unbiased():
    # 0.3 of a step above a level: rounded up about 30% of the time, so the mean stays put.
    clip, bits = 1.0, 8
    step = 2 * clip / (2**bits - 1)
    value = -clip + 100.3 * step
    q = quantize(np.full(200_000, value), clip, bits, np.random.default_rng(1))
    assert set(np.unique(q)) == {100, 101}
    assert dequantize_sum(q, 1, clip, bits).mean() == pytest.approx(value, abs=0.005 * step)


def test_quantization_bound_shrinks_with_bits_and_grows_with_clip():
    assert quantization_bound(1.0, 16) < quantization_bound(1.0, 8)
    assert quantization_bound(2.0, 16) == pytest.approx(2 * quantization_bound(1.0, 16))
    assert quantization_bound(1.0, 24) == pytest.approx(2 / (2**24 - 1), rel=1e-6)


# --- modulus -------------------------------------------------------------------------------------


def test_modulus_has_room_for_every_hospitals_largest_value():
    bits = check_modulus(num_hospitals=10, max_weight=1000, clip=1.0, bits=24)
    assert 2**bits > 10 * 1000 * (2**24 - 1)
    assert 2 ** (bits - 1) <= 10 * 1000 * (2**24 - 1)


def test_modulus_overflow_is_refused_with_advice():
    with pytest.raises(SecAggError, match="lower secagg_bits") as info:
        check_modulus(num_hospitals=1000, max_weight=2**20, clip=1.0, bits=40)
    assert "64" in str(info.value) and "1000 hospitals" in str(info.value)
    assert check_modulus(num_hospitals=10, max_weight=2**20, clip=1.0, bits=40) == 64


@pytest.mark.parametrize(
    "args",
    [
        (0, 10, 1.0, 24),
        (3, 0, 1.0, 24),
        (3, 10, 0.0, 24),
        (3, 10, float("nan"), 24),
        (3, 10, 1.0, 0),
    ],
)
def test_modulus_check_rejects_nonsense(args):
    with pytest.raises(SecAggError):
        check_modulus(*args)


# --- graph and thresholds ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    nodes=st.sets(st.integers(0, 2**64 - 1), min_size=2, max_size=40),
    neighbours=st.integers(0, 12),
    server_round=st.integers(1, 1000),
)
def test_graph_is_symmetric_and_regular(nodes, neighbours, server_round):
    graph = secagg_graph(sorted(nodes), neighbours, round_seed("run", server_round))
    assert set(graph) == nodes
    degrees = {len(near) for near in graph.values()}
    assert len(degrees) == 1
    degree = degrees.pop()
    if neighbours == 0 or neighbours + neighbours % 2 >= len(nodes) - 1:
        assert degree == len(nodes) - 1
    else:
        assert degree == neighbours + neighbours % 2
    for node, near in graph.items():
        assert node not in near
        assert all(node in graph[other] for other in near)


def test_graph_is_public_and_changes_each_round():
    nodes = list(range(50))
    first = secagg_graph(nodes, 4, round_seed("run-7", 1))
    assert first == secagg_graph(list(reversed(nodes)), 4, round_seed("run-7", 1))
    assert first != secagg_graph(nodes, 4, round_seed("run-7", 2))


def test_graph_rejects_duplicate_or_negative_ids():
    with pytest.raises(SecAggError):
        secagg_graph([1, 1, 2], 0, b"seed")
    with pytest.raises(SecAggError):
        secagg_graph([-1, 2], 0, b"seed")


@pytest.mark.parametrize(
    ("fraction", "size", "expected"),
    [
        (0.5, 10, 5),
        (0.3, 10, 3),
        (0.01, 10, 2),
        (1.0, 7, 7),
        (0.5, 2, 2),
        (0.51, 3, 2),
        (0.67, 3, 3),
    ],
)
def test_threshold_from_fraction(fraction, size, expected):
    assert threshold_from_fraction(fraction, size) == expected


def test_threshold_needs_two_hospitals():
    with pytest.raises(SecAggError, match="at least 2 hospitals"):
        threshold_from_fraction(0.5, 1)
    with pytest.raises(SecAggError):
        check_threshold(1, 5)
    with pytest.raises(SecAggError):
        check_threshold(6, 5)
    check_threshold(5, 5)


def test_mask_signs_are_opposite():
    assert mask_sign(3, 9) == -mask_sign(9, 3) == 1


# --- Shamir secret sharing ----------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    holders=st.sets(st.integers(0, 2**64 - 1), min_size=2, max_size=9),
    data=st.data(),
)
def test_any_threshold_shares_recover_the_secret(secret, holders, data):
    holders = sorted(holders)
    threshold = data.draw(st.integers(2, len(holders)))
    shares = shamir_split(secret, threshold, holders)
    subset = data.draw(st.lists(st.sampled_from(holders), min_size=threshold, unique=True))
    assert shamir_combine({h: shares[h] for h in subset}, threshold) == secret


def test_fewer_shares_than_the_threshold_do_not_give_the_secret():
    secret = os.urandom(32)
    shares = shamir_split(secret, 3, [10, 20, 30, 40])
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        shamir_combine({10: shares[10], 20: shares[20]}, 3)
    # Interpolating two shares as if the threshold were 2 gives some other value.
    for pair in itertools.combinations([10, 20, 30, 40], 2):
        try:
            assert shamir_combine({h: shares[h] for h in pair}, 2) != secret
        except SecAggError:
            pass  # the value did not even fit 32 bytes


@pytest.mark.parametrize("holders", [[-1, 1, 2], [1, 1, 2]])
def test_a_share_is_never_made_at_the_secret_or_twice_for_one_holder(holders):
    """Holder -1 would be evaluated at x = 0, where the polynomial is the secret; a repeated
    holder would count twice towards the threshold with one share."""
    secret = os.urandom(32)
    with pytest.raises(SecAggError, match="distinct ids >= 0"):
        shamir_split(secret, 3, holders)


def test_malformed_share_is_rejected_without_showing_it():
    shares = shamir_split(os.urandom(32), 2, [1, 2])
    shares[2] = shares[2][:-1]
    with pytest.raises(SecAggError, match="node 2") as info:
        shamir_combine(shares, 2)
    assert shares[1].hex() not in str(info.value)


# --- key agreement, share encryption and masks ---------------------------------------------------


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_both_sides_agree_on_a_key_bound_to_its_context():
    alice, bob = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    context = binding("run", 1, "share-key", 1, 2)
    key = agree_key(alice, _public(bob), context)
    assert key == agree_key(bob, _public(alice), context)
    assert len(key) == SEED_BYTES
    assert key != agree_key(alice, _public(bob), binding("run", 2, "share-key", 1, 2))


def test_encrypted_share_opens_only_with_its_binding():
    key = os.urandom(32)
    aad = binding("run", 4, "share_keys", 1, 2)
    ciphertext = encrypt_share(key, b"two shares", aad)
    assert decrypt_share(key, ciphertext, aad) == b"two shares"
    for wrong in (
        binding("run", 5, "share_keys", 1, 2),  # replay into another round
        binding("run", 4, "unmask", 1, 2),  # another stage
        binding("run", 4, "share_keys", 1, 3),  # another receiver
        binding("other", 4, "share_keys", 1, 2),  # another run
    ):
        with pytest.raises(SecAggError, match="does not authenticate"):
            decrypt_share(key, ciphertext, wrong)
    tampered = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
    with pytest.raises(SecAggError):
        decrypt_share(key, tampered, aad)


def test_mask_is_deterministic_in_range_and_uniform():
    seed = os.urandom(32)
    mask = expand_mask(seed, 4096, 37)
    assert mask.dtype == np.uint64 and mask.shape == (4096,)
    assert np.array_equal(mask, expand_mask(seed, 4096, 37))
    assert int(mask.max()) < 2**37
    assert chi_square_high_bits(mask, 37) < CHI_SQUARE_15_CRITICAL
    assert not np.array_equal(mask, expand_mask(os.urandom(32), 4096, 37))
    # The 64-bit modulus keeps the whole word; a prefix of a longer mask is the shorter mask.
    assert np.array_equal(expand_mask(seed, 10, 64)[:5], expand_mask(seed, 5, 64))


def test_mask_seed_must_be_256_bits():
    with pytest.raises(SecAggError):
        expand_mask(os.urandom(16), 10, 32)


def test_masks_added_chunk_by_chunk_equal_the_expanded_masks():
    # Longer than one keystream chunk, so the masks are generated in several pieces.
    length = 3 * 65536 + 5
    seeds = [os.urandom(32) for _ in range(3)]
    signs = [1, -1, -1]
    for modulus_bits in (37, 64):
        start = np.random.default_rng(1).integers(0, 2**modulus_bits - 1, length, dtype=np.uint64)
        expected = start.copy()
        for seed, sign in zip(seeds, signs):
            mask = expand_mask(seed, length, modulus_bits)
            expected = expected + mask if sign > 0 else expected - mask
        expected &= np.uint64(2**modulus_bits - 1)
        got = add_masks(start.copy(), list(zip(seeds, signs)), modulus_bits)
        assert np.array_equal(got, expected)
    with pytest.raises(SecAggError):
        add_masks(np.zeros(4, dtype=np.uint64), [(os.urandom(16), 1)], 32)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    bits=st.integers(1, 64),
    count=st.integers(0, 300),
    vectors=st.integers(1, 5),
)
def test_sum_of_packed_vectors_is_the_sum_of_their_values(seed, bits, count, vectors):
    rng = np.random.default_rng(seed)
    values = [
        rng.integers(0, 2**bits - 1, count, dtype=np.uint64, endpoint=True) for _ in range(vectors)
    ]
    expected = [sum(int(v[i]) for v in values) % 2**bits for i in range(count)]
    got = sum_packed([pack_bits(v, bits) for v in values], bits, count)
    assert got.dtype == np.uint64 and got.tolist() == expected


def test_sum_of_packed_vectors_across_chunks_and_a_ragged_tail():
    rng = np.random.default_rng(2)
    count = 2 * 65536 + 13  # two full chunks and a few values that end mid-byte
    for bits in (8, 36, 37, 56):
        values = [rng.integers(0, 2**bits, count, dtype=np.uint64) for _ in range(4)]
        expected = values[0] + values[1] + values[2] + values[3]
        expected &= np.uint64(2**bits - 1)
        packed = [np.frombuffer(pack_bits(v, bits).tobytes(), dtype=np.uint8) for v in values]
        assert np.array_equal(sum_packed(packed, bits, count), expected)


def test_sum_of_packed_vectors_rejects_a_vector_of_the_wrong_size():
    packed = [pack_bits(np.arange(10, dtype=np.uint64), 36)] * 2
    with pytest.raises(SecAggError, match="packed vector 1 has 44 bytes, expected 45"):
        sum_packed([packed[0], packed[1][:-1]], 36, 10)
