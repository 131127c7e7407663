"""A dishonest coordinator against real hospital sessions: it cannot unmask any one hospital.

`Coordinator` (tests/server/secagg_coordinator.py) plays the server as an attacker would: it
starts from the honest server session's requests, then swaps keys, tells hospitals different
survivor sets, splits the cohort, or replays a resumed round into another set of hospitals. It
keeps everything the hospitals send it (masked vectors, revealed shares, shares encrypted to keys
it substituted) and `recover` tries to strip one hospital's masks with it.
`test_the_harness_recovers_a_hospital_given_both_secrets` shows that `recover` succeeds the
moment the coordinator holds both secrets of a hospital, so every attack test below (and in
test_secagg_minimum_cohort.py) fails if the guarantee it checks is removed.
"""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from secagg_coordinator import LENGTH, RUN, Coordinator, raw_key, signature_of

from fedward.client.secagg import SecAggClientSession, SecAggIdentity
from fedward.common.errors import SecAggError
from fedward.common.secagg import (
    ADVERTISE_KEYS,
    CONSISTENCY_CHECK,
    MASKED_UPDATE,
    SHARE_KEYS,
    UNMASK,
    key_statement,
    quantization_bound,
    shamir_split,
)
from fedward.server.secagg import SecAggServerSession

# --- the harness itself --------------------------------------------------------------------------


def test_the_harness_recovers_a_hospital_given_both_secrets():
    coordinator = Coordinator(4)
    requests = coordinator.up_to_consistency()
    victim = coordinator.ids[0]
    client = coordinator.clients[victim]
    # Hand the attacker shares of both of the victim's secrets, as a broken protocol would.
    holders, threshold = coordinator.ids[:3], client.params["threshold"]
    raw_mask_key = client._mask_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    coordinator.seed_shares[victim] = shamir_split(client._self_seed, threshold, holders)
    coordinator.key_shares[victim] = shamir_split(raw_mask_key, threshold, holders)
    assert coordinator.unmasked(victim)
    # The honest round still ends with the sum only.
    signed = coordinator.ask(CONSISTENCY_CHECK, requests)
    result = coordinator.server.aggregate(
        coordinator.ask(UNMASK, coordinator.server.unmask_requests(signed))
    )
    assert result.included == tuple(coordinator.ids)


# --- substituted keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("signer", ["its own key", "the victim's signature", "a stranger"])
def test_keys_swapped_in_by_the_coordinator_are_refused_before_any_share_leaves(signer):
    coordinator = Coordinator(4, threshold=0.75)
    requests = coordinator.keys()
    victim = coordinator.ids[0]
    attacker = Ed25519PrivateKey.generate()
    # Toward the victim, every neighbour's keys are the coordinator's own.
    request = dict(requests[victim])
    share_keys, mask_keys, signing, signatures = [], [], [], []
    for peer in request["neighbour_ids"]:
        share_key, mask_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        coordinator.swapped[victim][peer] = share_key
        share_keys.append(raw_key(share_key))
        mask_keys.append(raw_key(mask_key))
        statement = key_statement(
            RUN,
            1,
            peer,
            coordinator.clients[victim]._digest,
            raw_key(share_key),
            raw_key(mask_key),
        )
        if signer == "its own key":
            signing.append(raw_key(attacker))
            signatures.append(attacker.sign(statement))
        elif signer == "the victim's signature":
            signing.append(coordinator.advertised[peer]["signing_public_key"])
            signatures.append(signature_of(coordinator, peer))
        else:  # a hospital of another federation, signing properly
            stranger = Ed25519PrivateKey.generate()
            signing.append(raw_key(stranger))
            signatures.append(stranger.sign(statement))
    request.update(
        share_public_keys=share_keys,
        mask_public_keys=mask_keys,
        signing_public_keys=signing,
        key_signatures=signatures,
    )
    requests[victim] = request
    replies = coordinator.ask(SHARE_KEYS, requests)
    assert victim not in replies
    assert "refusing the round (no share is revealed)" in coordinator.refusals[victim]
    assert not coordinator.seed_shares[victim] and not coordinator.key_shares[victim]
    assert not coordinator.unmasked(victim)


def test_one_hospitals_signing_key_cannot_stand_for_two_nodes():
    coordinator = Coordinator(4)
    requests = coordinator.keys()
    victim, first, second = coordinator.ids[0], coordinator.ids[1], coordinator.ids[2]
    request = dict(requests[victim])
    order = request["neighbour_ids"]
    signing = list(request["signing_public_keys"])
    signing[order.index(second)] = signing[order.index(first)]
    requests[victim] = {**request, "signing_public_keys": signing}
    assert victim not in coordinator.ask(SHARE_KEYS, requests)
    assert "already has" in coordinator.refusals[victim]


# --- different dropout stories -------------------------------------------------------------------


def test_a_minority_threshold_is_refused_before_training():
    coordinator = Coordinator(4)
    requests = coordinator.server.advertise_keys_requests()
    # The coordinator asks for 2 of 4, so two disjoint pairs could each rebuild one secret.
    lowered = {node: {**request, "threshold": 2} for node, request in requests.items()}
    assert coordinator.ask(ADVERTISE_KEYS, lowered) == {}
    assert all("not a majority" in reason for reason in coordinator.refusals.values())


def test_telling_hospitals_different_survivor_sets_unmasks_no_one():
    # The attack that worked with 4 hospitals at threshold 0.5: half are told the victim
    # survived (they reveal its self-mask seed), half that it dropped (its mask key).
    coordinator = Coordinator(4)
    requests = coordinator.up_to_consistency()
    victim, a, b, c = coordinator.ids
    stories = {victim: [victim, a, b, c], a: [victim, a, b, c], b: [a, b, c], c: [a, b, c]}
    told = {node: {**requests[node], "survivors": stories[node]} for node in stories}
    signed = coordinator.ask(CONSISTENCY_CHECK, told)
    assert set(signed) == {victim, a, b, c}  # each signs the set it was told, once
    # Relay to each group the signatures on its own story, and also the others' as if theirs.
    unmask = {}
    for node in stories:
        signers = sorted(signed)
        unmask[node] = {
            **requests[node],
            "stage": UNMASK,
            "survivors": stories[node],
            "signer_ids": signers,
            "signer_keys": [coordinator.advertised[s]["signing_public_key"] for s in signers],
            "signatures": [signed[s]["survivors_signature"] for s in signers],
        }
    assert coordinator.ask(UNMASK, unmask) == {}
    # Only the signatures on its own story: two of four, short of the quorum of three.
    for node in stories:
        same = sorted(s for s in stories if stories[s] == stories[node])
        unmask[node] = {
            **unmask[node],
            "signer_ids": same,
            "signer_keys": [coordinator.advertised[s]["signing_public_key"] for s in same],
            "signatures": [signed[s]["survivors_signature"] for s in same],
        }
    assert coordinator.ask(UNMASK, unmask) == {}
    assert "fewer than the 3 needed" in coordinator.refusals[victim]
    for node in coordinator.ids:
        assert not coordinator.unmasked(node)


def test_a_survivor_set_without_the_hospital_or_below_the_quorum_is_not_signed():
    coordinator = Coordinator(5)
    requests = coordinator.up_to_consistency()
    victim = coordinator.ids[0]
    others = coordinator.ids[1:]
    told = {node: {**requests[node], "survivors": others} for node in others}
    told[victim] = {**requests[victim], "survivors": others}
    signed = coordinator.ask(CONSISTENCY_CHECK, told)
    assert victim not in signed and "not among the survivors" in coordinator.refusals[victim]
    # The victim's masked update is in no sum the others will help unmask, and it said nothing.
    assert not coordinator.unmasked(victim)


# --- a split cohort ------------------------------------------------------------------------------


def test_a_victim_shown_a_smaller_cohort_than_its_neighbours_refuses():
    coordinator = Coordinator(6)
    requests = coordinator.server.advertise_keys_requests()
    victim, a, b = coordinator.ids[:3]
    # The victim is told the round is just {victim, a, b} (threshold 2 of 3) ...
    small = SecAggServerSession(RUN, 1, [victim, a, b], LENGTH).advertise_keys_requests()
    requests[victim] = small[victim]
    coordinator.advertised = coordinator.ask(ADVERTISE_KEYS, requests)
    # ... and handed a and b's keys, which they signed for the round of six.
    shares_request = coordinator.server.share_keys_requests(coordinator.advertised)[victim]
    keep = [i for i, peer in enumerate(shares_request["neighbour_ids"]) if peer in (a, b)]
    narrowed = {
        key: [value[i] for i in keep] if isinstance(value, list) else value
        for key, value in shares_request.items()
    }
    assert coordinator.ask(SHARE_KEYS, {victim: narrowed}) == {}
    assert "different round shown to it" in coordinator.refusals[victim]
    assert not coordinator.unmasked(victim)


def test_a_cohort_padded_with_nodes_off_the_roster_is_refused():
    coordinator = Coordinator(3)
    requests = coordinator.keys()
    victim = coordinator.ids[0]
    phantom = Ed25519PrivateKey.generate()  # the coordinator's sybil
    request = dict(requests[victim])
    signing = list(request["signing_public_keys"])
    signing[0] = raw_key(phantom)
    requests[victim] = {**request, "signing_public_keys": signing}
    assert victim not in coordinator.ask(SHARE_KEYS, requests)
    assert "not on this site's secagg_roster" in coordinator.refusals[victim]


def test_a_round_smaller_than_the_sites_minimum_is_refused_before_training():
    coordinator = Coordinator(3)
    victim = coordinator.ids[0]
    strict = coordinator.clients[victim].identity
    coordinator.clients[victim] = SecAggClientSession(
        victim, RUN, 1, SecAggIdentity(strict.signing_key, strict.roster, 4)
    )
    requests = coordinator.server.advertise_keys_requests()
    assert victim not in coordinator.ask(ADVERTISE_KEYS, requests)
    assert "min_secure_aggregation_hospitals (4)" in coordinator.refusals[victim]


# --- a resumed round replayed into another set ---------------------------------------------------


def _complete(coordinator: Coordinator, ignore_masked_from=()) -> np.ndarray | None:
    """Run the round; the coordinator may pretend some masked updates never arrived."""
    shares = coordinator.ask(SHARE_KEYS, coordinator.keys())
    masked = coordinator.ask(MASKED_UPDATE, coordinator.server.masked_update_requests(shares))
    try:
        requests = coordinator.server.consistency_requests(
            {node: reply for node, reply in masked.items() if node not in ignore_masked_from}
        )
        signed = coordinator.ask(CONSISTENCY_CHECK, requests)
        unmask = coordinator.server.unmask_requests(signed)
        return coordinator.server.aggregate(coordinator.ask(UNMASK, unmask)).weighted_sum
    except SecAggError:
        return None


def test_a_resumed_round_with_the_same_hospitals_gives_the_same_sum(tmp_path):
    first = _complete(Coordinator(4, memory=tmp_path))
    # After a restart the hospitals come back with new node ids; the replay is the same set.
    again = Coordinator(4, memory=tmp_path, ids=[900, 901, 902, 903])
    second = _complete(again)
    assert first is not None and second is not None and not again.refusals
    weight = sum(again.weights.values())
    np.testing.assert_allclose(first, second, atol=2 * weight * quantization_bound(1.0, 16))


def test_a_replay_into_fewer_hospitals_is_refused_so_the_difference_reveals_nothing(tmp_path):
    first = Coordinator(4, memory=tmp_path)
    assert _complete(first) is not None
    # Resumed: the same updates again, but the coordinator leaves the fourth hospital out, so
    # that the first sum minus the second would be its update.
    second = Coordinator(3, memory=tmp_path)
    for index, node in enumerate(second.ids):
        identity = first.clients[first.ids[index]].identity
        second.clients[node] = SecAggClientSession(node, RUN, 1, identity)
        second.updates[node] = first.updates[first.ids[index]]
    assert _complete(second) is None
    assert set(second.refusals) == set(second.ids)
    assert all("different participants set" in r for r in second.refusals.values())
    assert second.masked == {}  # no replayed update was sent into the smaller set


def test_a_replay_whose_survivors_differ_is_not_unmasked(tmp_path):
    assert _complete(Coordinator(4, memory=tmp_path)) is not None
    again = Coordinator(4, memory=tmp_path)
    victim = again.ids[3]
    # Same hospitals, but this time the coordinator says the victim's update never arrived.
    assert _complete(again, ignore_masked_from=(victim,)) is None
    for node in again.ids[:3]:
        assert "different survivors set" in again.refusals[node]
    assert not again.seed_shares and not again.key_shares
    assert not again.unmasked(victim)
