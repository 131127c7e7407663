"""A dishonest coordinator against real hospital sessions: it cannot unmask any one hospital.

`Coordinator` plays the server as an attacker would: it starts from the honest server session's
requests, then swaps keys, tells hospitals different survivor sets, splits the cohort, or replays
a resumed round into another set of hospitals. It keeps everything the hospitals send it (masked
vectors, revealed shares, shares encrypted to keys it substituted) and `recover` tries to strip
one hospital's masks with it. `test_the_harness_recovers_a_hospital_given_both_secrets` shows
that `recover` succeeds the moment the coordinator holds both secrets of a hospital, so every
attack test below fails if the guarantee it checks is removed.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedward.client.secagg import SecAggClientSession, SecAggIdentity
from fedward.common.errors import SecAggError
from fedward.common.secagg import (
    ADVERTISE_KEYS,
    CONSISTENCY_CHECK,
    MASKED_UPDATE,
    SHARE_BYTES,
    SHARE_KEYS,
    UNMASK,
    agree_key,
    binding,
    decrypt_share,
    expand_mask,
    key_statement,
    mask_sign,
    pair_context,
    quantization_bound,
    quantize,
    shamir_combine,
    shamir_split,
    unpack_bits,
)
from fedward.server.secagg import SecAggServerSession

LENGTH = 64
RUN = "run-x"


def _raw(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Coordinator:
    """A coordinator that relays what suits it and keeps everything it is sent."""

    def __init__(
        self,
        count: int,
        *,
        threshold: float = 0.5,
        server_round: int = 1,
        memory: Path | None = None,
        ids: list[int] | None = None,
        seed: int = 0,
        min_hospitals: int = 2,
    ) -> None:
        self.ids = ids or [100 + index for index in range(count)]
        self.round = server_round
        rng = np.random.default_rng(seed)
        self.updates = {node: rng.uniform(-0.5, 0.5, LENGTH) for node in self.ids}
        self.weights = {node: 10 + index for index, node in enumerate(self.ids)}
        self.server = SecAggServerSession(RUN, server_round, self.ids, LENGTH, threshold=threshold)
        self.clients = {}
        for index, node in enumerate(self.ids):
            identity = SecAggIdentity.simulated(index, count)
            if memory is not None:  # each hospital's own folder, as a real hospital's ledger
                identity = SecAggIdentity(
                    identity.signing_key,
                    identity.roster,
                    min_hospitals,
                    memory / f"hospital-{index}",
                )
            else:
                identity = SecAggIdentity(identity.signing_key, identity.roster, min_hospitals)
            self.clients[node] = SecAggClientSession(node, RUN, server_round, identity)
        self.refusals: dict[int, str] = {}
        self.errors: dict[int, SecAggError] = {}  # what each refusal would carry (its reason)
        self.masked: dict[int, np.ndarray] = {}
        self.seed_shares: dict[int, dict[int, bytes]] = defaultdict(dict)
        self.key_shares: dict[int, dict[int, bytes]] = defaultdict(dict)
        self.mask_public: dict[int, bytes] = {}  # what each node advertised
        self.sources: dict[int, list[int]] = {}  # whose shares each node was handed to mask with
        self.signatures: dict[int, bytes] = {}  # each node's signature on its survivor set
        # victim -> peer -> the share key the coordinator showed the victim as that peer's
        self.swapped: dict[int, dict[int, X25519PrivateKey]] = defaultdict(dict)

    def expected(self, node: int) -> np.ndarray:
        """The hospital's weighted quantized update: what unmasking it would reveal."""
        client = self.clients[node]
        quantized = quantize(
            self.updates[node],
            client.params["clip"],
            client.params["bits"],
            np.random.default_rng(node),
        )
        return quantized * np.uint64(self.weights[node])

    def ask(self, stage: str, requests: dict[int, dict]) -> dict[int, dict]:
        """Deliver requests to the hospitals; keep replies and refusals."""
        replies = {}
        for node, request in requests.items():
            client = self.clients[node]
            try:
                if stage == MASKED_UPDATE:
                    reply = client.masked_update(
                        request,
                        self.updates[node],
                        self.weights[node],
                        rng=np.random.default_rng(node),
                    )
                else:
                    reply = getattr(client, stage)(request)
            except SecAggError as exc:
                self.refusals[node] = str(exc)
                self.errors[node] = exc
                continue
            replies[node] = reply
            if stage == ADVERTISE_KEYS:
                self.mask_public[node] = reply["mask_public_key"]
            if stage == MASKED_UPDATE:
                self.sources[node] = list(request["sources"])
                bits = client.params["modulus_bits"]
                self.masked[node] = unpack_bits(reply["masked_update"], bits, LENGTH + 1)
            if stage == SHARE_KEYS:
                self._open_shares_sent_to_its_keys(node, reply)
            if stage == CONSISTENCY_CHECK:
                self.signatures[node] = reply["survivors_signature"]
            if stage == UNMASK:
                for owner, share in zip(reply["seed_share_owners"], reply["seed_shares"]):
                    self.seed_shares[owner][node] = share
                for owner, share in zip(reply["key_share_owners"], reply["key_shares"]):
                    self.key_shares[owner][node] = share
        return replies

    def _open_shares_sent_to_its_keys(self, node: int, reply: dict) -> None:
        """Shares a hospital encrypted to a key the coordinator swapped in: it reads them."""
        for destination, ciphertext in zip(reply["destinations"], reply["ciphertexts"]):
            swapped = self.swapped[node].get(destination)
            if swapped is None:
                continue
            key = agree_key(
                swapped,
                self.advertised_share_key(node),
                pair_context(RUN, self.round, "share-key", node, destination),
            )
            plaintext = decrypt_share(
                key, ciphertext, binding(RUN, self.round, SHARE_KEYS, node, destination)
            )
            self.seed_shares[node][destination] = plaintext[:SHARE_BYTES]
            self.key_shares[node][destination] = plaintext[SHARE_BYTES:]

    def advertised_share_key(self, node: int) -> bytes:
        return self.advertised[node]["share_public_key"]

    def recover(self, victim: int) -> np.ndarray | None:
        """Strip every mask from the victim's masked vector, if what was collected allows."""
        if victim not in self.masked:
            return None
        client = self.clients[victim]
        threshold = client.params["threshold"]
        try:
            self_seed = shamir_combine(self.seed_shares[victim], threshold)
            mask_key = X25519PrivateKey.from_private_bytes(
                shamir_combine(self.key_shares[victim], threshold)
            )
        except SecAggError:
            return None  # fewer shares than the threshold of one of its two secrets
        bits = client.params["modulus_bits"]
        vector = self.masked[victim] - expand_mask(self_seed, LENGTH + 1, bits)
        for peer, public in self.peer_mask_keys_seen_by(victim).items():
            seed = agree_key(
                mask_key, public, pair_context(RUN, self.round, "pairwise-mask", victim, peer)
            )
            mask = expand_mask(seed, LENGTH + 1, bits)
            vector = vector - mask if mask_sign(victim, peer) > 0 else vector + mask
        vector &= np.uint64((1 << bits) - 1)
        return vector[:-1]

    def peer_mask_keys_seen_by(self, victim: int) -> dict[int, bytes]:
        return {
            peer: key
            for peer, key in self.clients[victim]._peer_mask_keys.items()
            if peer in self.clients[victim]._received
        }

    def unmasked(self, victim: int) -> bool:
        recovered = self.recover(victim)
        return recovered is not None and np.array_equal(recovered, self.expected(victim))

    # --- the honest round's first stages ------------------------------------------------------

    def keys(self) -> dict[int, dict]:
        self.advertised = self.ask(ADVERTISE_KEYS, self.server.advertise_keys_requests())
        return self.server.share_keys_requests(self.advertised)

    def up_to_consistency(self) -> dict[int, dict]:
        shares = self.ask(SHARE_KEYS, self.keys())
        masked = self.ask(MASKED_UPDATE, self.server.masked_update_requests(shares))
        return self.server.consistency_requests(
            {node: self._repacked(node, reply) for node, reply in masked.items()}
        )

    def _repacked(self, node: int, reply: dict) -> dict:
        return reply  # the server session reads the packed vector itself


def _signature_of(coordinator: Coordinator, node: int) -> bytes:
    return coordinator.advertised[node]["key_signature"]


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
        share_keys.append(_raw(share_key))
        mask_keys.append(_raw(mask_key))
        statement = key_statement(
            RUN,
            1,
            peer,
            coordinator.clients[victim]._digest,
            _raw(share_key),
            _raw(mask_key),
        )
        if signer == "its own key":
            signing.append(_raw(attacker))
            signatures.append(attacker.sign(statement))
        elif signer == "the victim's signature":
            signing.append(coordinator.advertised[peer]["signing_public_key"])
            signatures.append(_signature_of(coordinator, peer))
        else:  # a hospital of another federation, signing properly
            stranger = Ed25519PrivateKey.generate()
            signing.append(_raw(stranger))
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
    signing[0] = _raw(phantom)
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
