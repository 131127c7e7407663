"""A dishonest coordinator that shrinks a round below the hospitals' minimum cohort after the
masked uploads, alone or with a colluding hospital: it unmasks nothing below the minimum, and a
round that keeps the minimum still unmasks the sum (the harness:
tests/server/secagg_coordinator.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from secagg_coordinator import LENGTH, RUN, Coordinator

from fedward.client.secagg import SecAggClientSession, SecAggIdentity
from fedward.common.errors import SecAggError
from fedward.common.secagg import (
    CONSISTENCY_CHECK,
    MASKED_UPDATE,
    SHARE_KEYS,
    UNMASK,
    agree_key,
    expand_mask,
    mask_sign,
    pair_context,
    quantization_bound,
    shamir_combine,
)

# --- a round shrunk below the hospitals' minimum cohort ------------------------------------------
#
# The consistency quorum is a majority: 2 of 3. A coordinator that declares the third of three
# hospitals dropped after every masked update arrived would unmask the sum of two, which is one
# hospital's update to the other; with one colluding hospital, the victim's update itself. These
# run at the deployed default, `min_secure_aggregation_hospitals = 3`.


def _with_minimum(coordinator: Coordinator, node: int, minimum: int) -> None:
    """Give one hospital another site minimum (a colluder's session signs whatever it is told)."""
    identity = coordinator.clients[node].identity
    coordinator.clients[node] = SecAggClientSession(
        node, RUN, coordinator.round, SecAggIdentity(identity.signing_key, identity.roster, minimum)
    )


def _upload_all_then_drop(coordinator: Coordinator, dropped: int) -> dict[int, dict]:
    """Every hospital sends its masked update; the coordinator then says `dropped` never did."""
    shares = coordinator.ask(SHARE_KEYS, coordinator.keys())
    masked = coordinator.ask(MASKED_UPDATE, coordinator.server.masked_update_requests(shares))
    assert set(masked) == set(coordinator.ids)
    return coordinator.server.consistency_requests(
        {node: reply for node, reply in masked.items() if node != dropped}
    )


def _finish(coordinator: Coordinator, requests: dict[int, dict]):
    """The rest of the round as the coordinator's server session runs it; None if it fails."""
    signed = coordinator.ask(CONSISTENCY_CHECK, requests)
    try:
        unmask = coordinator.server.unmask_requests(signed)
        return coordinator.server.aggregate(coordinator.ask(UNMASK, unmask))
    except SecAggError:
        return None


def _recover_with_colluder(
    coordinator: Coordinator,
    victim: int,
    colluder_mask_key: X25519PrivateKey,
    colluder_shares: dict[int, tuple[bytes, bytes]],
    colluder: int,
) -> np.ndarray | None:
    """Strip the victim's masks with what was revealed plus what the colluder hands over: its
    mask private key and the shares of its neighbours' secrets it holds."""
    if victim not in coordinator.masked:
        return None
    params = coordinator.clients[victim].params
    threshold, bits = params["threshold"], params["modulus_bits"]

    def rebuild(shares: dict[int, bytes], own_share: bytes) -> bytes | None:
        try:
            return shamir_combine({**shares, colluder: own_share}, threshold)
        except SecAggError:
            return None  # fewer shares than the threshold

    self_seed = rebuild(coordinator.seed_shares[victim], colluder_shares[victim][0])
    if self_seed is None:
        return None
    vector = coordinator.masked[victim] - expand_mask(self_seed, LENGTH + 1, bits)
    for peer in coordinator.sources[victim]:
        if peer == colluder:
            peer_key = colluder_mask_key
        else:
            raw = rebuild(coordinator.key_shares[peer], colluder_shares[peer][1])
            if raw is None:
                return None
            peer_key = X25519PrivateKey.from_private_bytes(raw)
        seed = agree_key(
            peer_key,
            coordinator.mask_public[victim],
            pair_context(RUN, coordinator.round, "pairwise-mask", victim, peer),
        )
        mask = expand_mask(seed, LENGTH + 1, bits)
        vector = vector - mask if mask_sign(victim, peer) > 0 else vector + mask
    vector &= np.uint64((1 << bits) - 1)
    return vector[:-1]


def _revealed_by(coordinator: Coordinator, node: int) -> int:
    """How many shares (of any kind, for any owner) `node` revealed to the coordinator."""
    return sum(
        node in holders
        for shares in (coordinator.seed_shares, coordinator.key_shares)
        for holders in shares.values()
    )


def test_a_drop_declared_after_the_masked_uploads_unmasks_nothing_below_the_minimum():
    coordinator = Coordinator(3, min_hospitals=3)
    first, second, dropped = coordinator.ids
    requests = _upload_all_then_drop(coordinator, dropped)
    assert requests[first]["survivors"] == [first, second]
    assert _finish(coordinator, requests) is None  # the round fails for the coordinator
    for node in (first, second):
        reason = coordinator.errors[node].reason
        assert reason.code == "secagg.cohort_too_small"
        assert reason.params == {"hospitals": 2, "min_secure_aggregation_hospitals": 3}
        assert "min_secure_aggregation_hospitals (3)" in coordinator.refusals[node]
        assert _revealed_by(coordinator, node) == 0
    # Asked to reveal anyway: nothing.
    unmask = {node: {**requests[node], "stage": UNMASK} for node in (first, second)}
    assert coordinator.ask(UNMASK, unmask) == {}
    assert not coordinator.seed_shares and not coordinator.key_shares
    for node in coordinator.ids:
        assert not coordinator.unmasked(node)


@pytest.mark.parametrize(
    ("minimum", "recovered"),
    [
        # What a site that accepts a cohort of two gives away, and what every site gave away
        # before the survivor set was held to the minimum (the check ran only at the start).
        (2, True),
        # The deployed default: the victim signs nothing and reveals nothing.
        (3, False),
    ],
)
def test_one_colluding_hospital_and_a_drop_after_the_upload_recover_no_update(minimum, recovered):
    coordinator = Coordinator(3, min_hospitals=3)
    victim, colluder, dropped = coordinator.ids
    _with_minimum(coordinator, victim, minimum)
    _with_minimum(coordinator, colluder, 2)  # the colluder signs any set
    requests = _upload_all_then_drop(coordinator, dropped)
    session = coordinator.clients[colluder]  # the colluder hands over its secrets
    colluder_mask_key, colluder_shares = session._mask_key, dict(session._received)
    result = _finish(coordinator, requests)
    update = _recover_with_colluder(
        coordinator, victim, colluder_mask_key, colluder_shares, colluder
    )
    if recovered:
        assert result is not None and result.included == (victim, colluder)
        assert update is not None and np.array_equal(update, coordinator.expected(victim))
        return
    assert result is None
    assert coordinator.errors[victim].reason.code == "secagg.cohort_too_small"
    assert _revealed_by(coordinator, victim) == 0
    # The coordinator relays the colluder's signature and asks the victim to reveal anyway.
    assert set(coordinator.signatures) == {colluder}
    forced = {
        **requests[victim],
        "stage": UNMASK,
        "signer_ids": [colluder],
        "signer_keys": [coordinator.advertised[colluder]["signing_public_key"]],
        "signatures": [coordinator.signatures[colluder]],
    }
    assert coordinator.ask(UNMASK, {victim: forced}) == {}
    assert _revealed_by(coordinator, victim) == 0
    assert update is None
    assert not coordinator.unmasked(victim)


def test_a_drop_declared_before_the_masked_upload_keeps_the_update_home():
    coordinator = Coordinator(3, min_hospitals=3)
    first, second, dropped = coordinator.ids
    shares = coordinator.ask(SHARE_KEYS, coordinator.keys())
    # The third hospital's shares are never relayed: the other two would mask only together.
    requests = coordinator.server.masked_update_requests(
        {node: reply for node, reply in shares.items() if node != dropped}
    )
    assert coordinator.ask(MASKED_UPDATE, requests) == {}
    assert coordinator.masked == {}
    for node in (first, second):
        reason = coordinator.errors[node].reason
        assert reason.code == "secagg.cohort_too_small" and reason.params["hospitals"] == 2


@pytest.mark.parametrize(("count", "drops"), [(3, 0), (4, 1), (5, 2)])
def test_rounds_that_keep_the_minimum_still_unmask_the_sum(count, drops):
    coordinator = Coordinator(count, min_hospitals=3, threshold=0.5)
    survivors = coordinator.ids[: count - drops]
    shares = coordinator.ask(SHARE_KEYS, coordinator.keys())
    masked = coordinator.ask(MASKED_UPDATE, coordinator.server.masked_update_requests(shares))
    requests = coordinator.server.consistency_requests(
        {node: reply for node, reply in masked.items() if node in survivors}
    )
    result = _finish(coordinator, requests)
    assert not coordinator.refusals
    assert result is not None and result.included == tuple(survivors)
    expected = sum(coordinator.weights[node] * coordinator.updates[node] for node in survivors)
    weight = sum(coordinator.weights[node] for node in survivors)
    np.testing.assert_allclose(
        result.weighted_sum, expected, atol=weight * quantization_bound(1.0, 16)
    )


def test_a_survivor_the_hospital_never_masked_with_does_not_count_toward_its_minimum():
    # Sites that demand 5 of 6. The sixth hospital's keys are never relayed, so the other five
    # mask among themselves (five: enough); then the coordinator declares the fifth dropped after
    # its upload and pads the survivor set with the sixth, which never masked with anyone. Five
    # names are listed, but only four updates would be unmasked together.
    coordinator = Coordinator(6, min_hospitals=5)
    *four, fifth, sixth = coordinator.ids
    shares = coordinator.ask(SHARE_KEYS, coordinator.keys())
    requests = coordinator.server.masked_update_requests(
        {node: reply for node, reply in shares.items() if node != sixth}
    )
    masked = coordinator.ask(MASKED_UPDATE, requests)
    assert set(masked) == {*four, fifth}
    requests = coordinator.server.consistency_requests(
        {node: reply for node, reply in masked.items() if node != fifth}
    )
    padded = sorted([*four, sixth])
    told = {node: {**requests[node], "survivors": padded} for node in four}
    signed = coordinator.ask(CONSISTENCY_CHECK, told)
    assert signed == {}
    for node in four:
        reason = coordinator.errors[node].reason
        assert reason.code == "secagg.cohort_too_small"
        assert reason.params == {"hospitals": 4, "min_secure_aggregation_hospitals": 5}
    assert not coordinator.seed_shares and not coordinator.key_shares
