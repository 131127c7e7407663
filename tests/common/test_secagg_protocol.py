"""Whole SecAgg+ rounds: real client sessions talking to a real server session, with dropouts."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Mapping

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fedward.client.secagg import SecAggClientSession, SecAggIdentity
from fedward.common.errors import SecAggError
from fedward.common.secagg import (
    ADVERTISE_KEYS,
    CONSISTENCY_CHECK,
    MASKED_UPDATE,
    SHARE_KEYS,
    STAGES,
    UNMASK,
    agree_key,
    expand_mask,
    mask_sign,
    pair_context,
    quantization_bound,
    quantize,
    round_seed,
    unpack_bits,
)
from fedward.server.secagg import SecAggResult, SecAggServerSession

CHI_SQUARE_15_CRITICAL = 60.0  # P(chi2_15 > 60) is about 3e-7


def federation_identities(count: int) -> list[SecAggIdentity]:
    """Signing keys for `count` hospitals that all trust one another (the simulation's)."""
    return [SecAggIdentity.simulated(index, count) for index in range(count)]


class Federation:
    """Hospitals with updates and weights, one server session, and the message relay between."""

    def __init__(
        self,
        hospitals: int,
        length: int,
        *,
        seed: int = 0,
        clip: float = 1.0,
        bits: int = 24,
        neighbours: int = 0,
        threshold: float = 0.5,
    ) -> None:
        rng = np.random.default_rng(seed)
        ids = sorted({int(x) for x in rng.integers(0, 2**64, size=hospitals, dtype=np.uint64)})
        assert len(ids) == hospitals
        self.clip, self.bits = clip, bits
        self.updates = {node: rng.uniform(-1.2 * clip, 1.2 * clip, length) for node in ids}
        self.weights = {node: int(rng.integers(1, 5000)) for node in ids}
        self.server = SecAggServerSession(
            "run-1",
            3,
            ids,
            length,
            neighbours=neighbours,
            threshold=threshold,
            clip=clip,
            bits=bits,
        )
        self.clients = {
            node: SecAggClientSession(node, "run-1", 3, identity)
            for node, identity in zip(ids, federation_identities(len(ids)))
        }

    def replies(self, stage: str, requests: Mapping[int, dict], drop: Collection[int] = ()) -> dict:
        out = {}
        for node, request in requests.items():
            if node in drop:
                continue
            client = self.clients[node]
            if stage == MASKED_UPDATE:
                out[node] = client.masked_update(request, self.updates[node], self.weights[node])
            else:
                out[node] = getattr(client, stage)(request)
        return out

    def run(self, drops: Mapping[str, Collection[int]] | None = None) -> SecAggResult:
        drops = drops or {}
        requests = self.server.advertise_keys_requests()
        replies = self.replies(ADVERTISE_KEYS, requests, drops.get(ADVERTISE_KEYS, ()))
        requests = self.server.share_keys_requests(replies)
        replies = self.replies(SHARE_KEYS, requests, drops.get(SHARE_KEYS, ()))
        requests = self.server.masked_update_requests(replies)
        replies = self.replies(MASKED_UPDATE, requests, drops.get(MASKED_UPDATE, ()))
        requests = self.server.consistency_requests(replies)
        replies = self.replies(CONSISTENCY_CHECK, requests, drops.get(CONSISTENCY_CHECK, ()))
        requests = self.server.unmask_requests(replies)
        replies = self.replies(UNMASK, requests, drops.get(UNMASK, ()))
        return self.server.aggregate(replies)

    def plain_average(self, included: Collection[int]) -> np.ndarray:
        total = sum(self.weights[node] for node in included)
        clipped = {node: np.clip(self.updates[node], -self.clip, self.clip) for node in included}
        return sum(self.weights[node] * clipped[node] for node in included) / total


def assert_matches_plain_average(federation: Federation, result: SecAggResult) -> None:
    expected = federation.plain_average(result.included)
    assert result.total_weight == sum(federation.weights[node] for node in result.included)
    assert np.max(np.abs(result.average - expected)) <= quantization_bound(
        federation.clip, federation.bits
    )


# --- the sum is right ----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    hospitals=st.integers(2, 12),
    length=st.integers(1, 2000),
    seed=st.integers(0, 2**32 - 1),
    neighbours=st.sampled_from([0, 2, 4, 6]),
    threshold=st.sampled_from([0.3, 0.5, 0.75]),
    bits=st.sampled_from([8, 16, 24, 32]),
    data=st.data(),
)
def test_unmasked_average_equals_plain_weighted_average(
    hospitals, length, seed, neighbours, threshold, bits, data
):
    federation = Federation(
        hospitals, length, seed=seed, neighbours=neighbours, threshold=threshold, bits=bits
    )
    ids = sorted(federation.clients)
    # Each hospital stays to the end or drops out before replying to one of the stages.
    leavers = data.draw(
        st.lists(
            st.tuples(st.integers(0, hospitals - 1), st.sampled_from(STAGES)),
            max_size=max(1, hospitals // 3),
            unique_by=lambda leaver: leaver[0],
        )
    )
    fate = [dict(leavers).get(index) for index in range(hospitals)]
    drops = {stage: {node for node, f in zip(ids, fate) if f == stage} for stage in STAGES}
    # Sufficient for success: every hospital keeps `threshold` of its neighbourhood to the end.
    finishers = {node for node, f in zip(ids, fate) if f is None}
    graph, t = federation.server.graph, federation.server.threshold
    enough = all(len(({node, *graph[node]}) & finishers) >= t for node in ids)
    try:
        result = federation.run(drops)
    except SecAggError:
        event("too many dropouts: the round failed")
        assert not enough, "the round failed although every neighbourhood kept the threshold"
        return
    event(f"unmasked with {sum(f is not None for f in fate)} dropouts")
    started = {node for node, f in zip(ids, fate) if f not in (ADVERTISE_KEYS, SHARE_KEYS)}
    assert set(result.included) == {n for n in started if n not in drops[MASKED_UPDATE]}
    assert_matches_plain_average(federation, result)


@pytest.mark.parametrize("stage", STAGES)
def test_a_hospital_dropping_at_any_stage_is_recovered(stage):
    federation = Federation(6, 300, seed=11)
    gone = sorted(federation.clients)[2]
    result = federation.run({stage: {gone}})
    in_sum = stage in (CONSISTENCY_CHECK, UNMASK)  # its masked update arrived before it left
    assert (gone in result.included) == in_sum
    assert (gone in result.dropped) != in_sum
    assert_matches_plain_average(federation, result)


def test_drops_at_every_stage_in_one_round_with_a_sparse_graph():
    federation = Federation(12, 500, seed=5, neighbours=6, threshold=0.3)  # raised to 4 of 7
    assert federation.server.threshold == 4  # a majority of each neighbourhood
    # Hospitals 3 apart on the public ring: every neighbourhood (7 in a row) loses at most 3.
    seed = round_seed("run-1", 3)
    ring = sorted(
        federation.clients, key=lambda n: hashlib.sha256(seed + n.to_bytes(8, "big")).digest()
    )
    drops = {
        ADVERTISE_KEYS: {ring[0]},
        SHARE_KEYS: {ring[3]},
        MASKED_UPDATE: {ring[6]},
        CONSISTENCY_CHECK: set(),
        UNMASK: {ring[9]},
    }
    result = federation.run(drops)
    assert set(result.dropped) == {ring[0], ring[3], ring[6]}
    assert_matches_plain_average(federation, result)


@pytest.mark.parametrize("stage", STAGES)
def test_too_many_dropouts_fail_the_round_cleanly(stage):
    federation = Federation(5, 50, seed=2, threshold=0.8)  # threshold 4 of 5
    ids = sorted(federation.clients)
    with pytest.raises(SecAggError, match=r"stage \w+: .*threshold") as info:
        federation.run({stage: {ids[0], ids[1]}})
    assert "stage" in str(info.value)


def test_two_hospitals_cannot_lose_one():
    federation = Federation(2, 20, seed=3)
    with pytest.raises(SecAggError):
        federation.run({UNMASK: {min(federation.clients)}})


# --- what the server sees of one hospital --------------------------------------------------------


def test_server_sees_a_uniform_masked_vector_that_only_the_seeds_undo():
    federation = Federation(4, 4096, seed=9, bits=16)
    server, clients = federation.server, federation.clients
    ids = sorted(clients)
    replies = federation.replies(ADVERTISE_KEYS, server.advertise_keys_requests())
    replies = federation.replies(SHARE_KEYS, server.share_keys_requests(replies))
    requests = server.masked_update_requests(replies)
    target = ids[0]
    client = clients[target]
    # A tiny update from a small hospital: unmasked it would sit near the bottom of the range.
    update = np.full(4096, 0.01)
    weight = 3
    packed = client.masked_update(requests[target], update, weight, rng=np.random.default_rng(4))[
        "masked_update"
    ]
    plain = np.append(
        quantize(update, 1.0, 16, np.random.default_rng(4)) * np.uint64(weight), np.uint64(weight)
    )
    modulus_bits = server.modulus_bits
    assert packed.dtype == np.uint8 and packed.size == (4097 * modulus_bits + 7) // 8
    masked = unpack_bits(packed, modulus_bits, 4097)

    def chi_square(values: np.ndarray) -> float:
        counts = np.bincount((values >> np.uint64(modulus_bits - 4)).astype(np.int64), minlength=16)
        return float(((counts - len(values) / 16) ** 2 / (len(values) / 16)).sum())

    assert not np.array_equal(masked, plain)
    assert chi_square(masked) < CHI_SQUARE_15_CRITICAL
    assert chi_square(plain) > 1000 * CHI_SQUARE_15_CRITICAL

    # Knowing every pairwise seed is not enough: the self mask still hides the update ...
    without_pairwise = masked.copy()
    for other in ids[1:]:
        seed = agree_key(
            client._mask_key,
            client._peer_mask_keys[other],
            pair_context("run-1", 3, "pairwise-mask", target, other),
        )
        mask = expand_mask(seed, 4097, modulus_bits)
        without_pairwise = (
            without_pairwise - mask if mask_sign(target, other) > 0 else without_pairwise + mask
        )
    without_pairwise &= np.uint64((1 << modulus_bits) - 1)
    assert chi_square(without_pairwise) < CHI_SQUARE_15_CRITICAL
    # ... and with the hospital's self-mask seed as well, the quantized update comes out exactly.
    recovered = (without_pairwise - expand_mask(client._self_seed, 4097, modulus_bits)) & np.uint64(
        (1 << modulus_bits) - 1
    )
    assert np.array_equal(recovered, plain)


# --- secrets stay secret -------------------------------------------------------------------------


def test_secrets_never_reach_logs_or_reprs(caplog):
    caplog.set_level(logging.DEBUG)
    federation = Federation(5, 64, seed=8)
    server, clients = federation.server, federation.clients
    replies = federation.replies(ADVERTISE_KEYS, server.advertise_keys_requests())
    replies = federation.replies(SHARE_KEYS, server.share_keys_requests(replies))
    replies = federation.replies(MASKED_UPDATE, server.masked_update_requests(replies))
    replies = federation.replies(CONSISTENCY_CHECK, server.consistency_requests(replies))
    secrets: list[bytes] = []
    for client in clients.values():
        secrets += [client._self_seed, *client._own_shares]
        secrets += [client.identity.signing_key.private_bytes_raw()]
        secrets += [share for pair in client._received.values() for share in pair]
    reprs = [repr(server), *map(repr, clients.values())]
    errors = []
    requests = server.unmask_requests(replies)
    bad = dict(requests)
    victim = min(bad)
    bad[victim] = {**bad[victim], "round": 2}  # a replayed request: rejected
    try:
        federation.replies(UNMASK, bad)
    except SecAggError as exc:
        errors.append(f"{exc} {exc!r}")
    result = federation.server.aggregate(federation.replies(UNMASK, requests, drop={victim}))
    assert errors and result.total_weight > 0
    text = caplog.text + " ".join(reprs + errors + [repr(result)])
    assert "secagg round 3" in caplog.text
    for secret in secrets:
        assert (
            secret.hex() not in text and repr(secret) not in text and str(list(secret)) not in text
        )
