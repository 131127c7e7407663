"""A hospital's side of one SecAgg+ round: five stages, one method each.

`SecAggClientSession` keeps the hospital's secrets for one round (two X25519 key pairs, the
self-mask seed, the shares its neighbours sent it) and turns each request from the coordinator
into a reply. Requests and replies are flat dicts of int, float, str, bytes, lists of those and
(for the masked update) one 1-D uint64 numpy array, so they fit Flower ConfigRecords and
ArrayRecords. Payload keys, per stage (every payload also has run_id, round, stage, node_id):

- advertise_keys: request node_ids, neighbours, threshold, clip, bits, max_weight,
  modulus_bits, vector_length; reply share_public_key, mask_public_key.
- share_keys: request neighbour_ids, share_public_keys, mask_public_keys;
  reply destinations, ciphertexts.
- masked_update: request sources, ciphertexts; reply masked_update (uint8: the vector_length + 1
  masked values bit-packed at modulus_bits each, ready for the wire).
- consistency_check: request survivors; reply survivors_signature.
- unmask: request survivors, signer_ids, signer_keys, signatures; reply seed_share_owners,
  seed_shares, key_share_owners, key_shares.

Against an active coordinator. The advertise_keys reply also carries signing_public_key and
key_signature: the hospital's long-term Ed25519 key signs both public keys, bound to run, round,
node and the round's parameters; the share_keys request relays each neighbour's
signing_public_keys and key_signatures, and a neighbour whose key is not signed by a hospital on
this site's roster ends the round for this hospital before any share leaves. Before unmasking,
each survivor signs the survivor set it was told (consistency_check); a hospital reveals shares
only for a set that it signed itself and that `consistency_quorum` roster hospitals signed too.
It derives which neighbours survived and which dropped from that signed set, never from a list
the coordinator makes up per hospital, and reveals for each neighbour either the self-mask seed
share or the mask-key share, never both. The consistency quorum is only a majority (2 of 3), so
the survivor set must also hold the site's own minimum cohort (`min_secure_aggregation_hospitals`,
counting itself and the neighbours it masked with): otherwise a coordinator that declares the
third of three hospitals dropped after the masked uploads would unmask the sum of two, which is
one hospital's update to the other. Below the minimum the hospital withholds its masked update,
its signature and every share, and refuses with `secagg.cohort_too_small`.

With a `memory_dir` (a real hospital: its ledger folder) what it committed to in a round -- who
took part, who survived, what it revealed -- is kept on disk, so a resumed round that replays the
same update into a different set of hospitals, or asks for the other share of a neighbour, is
refused.

The arithmetic lives in `common.secagg`; this class only holds state and checks messages.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedward.client.secagg.identity import SecAggIdentity, raw_private, raw_public
from fedward.client.secagg.persistence import (
    load_memory,
    memory_path,
    restore_session,
    save_memory,
    session_to_bytes,
    state_from_bytes,
)
from fedward.client.secagg.round_checks import (
    check_enough_neighbours,
    check_minimum_cohort,
    check_reveal,
    check_round_params,
    check_share_senders,
    check_survivors,
    check_update,
    open_shares,
    read_round_params,
    refusal,
    verify_neighbour_keys,
    verify_survivor_signatures,
)
from fedward.common.errors import SecAggError
from fedward.common.secagg import (
    ADVERTISE_KEYS,
    CONSISTENCY_CHECK,
    MASKED_UPDATE,
    SEED_BYTES,
    SHARE_KEYS,
    UNMASK,
    add_masks,
    agree_key,
    binding,
    check_header,
    consistency_quorum,
    encrypt_share,
    header,
    key_statement,
    mask_sign,
    pack_bits,
    pair_context,
    params_digest,
    read_list,
    read_node_keyed,
    shamir_split,
    survivor_statement,
    weighted_field_vector,
)
from fedward.common.secagg.distributed_noise import INTEGER, WEIGHTED, check_encoding, to_field

logger = logging.getLogger(__name__)


class SecAggClientSession:
    """One hospital's state across the four SecAgg+ stages of one round.

    Args:
        node_id: this hospital's Flower node id.
        run_id: the Flower run id (every message is bound to it).
        server_round: the round number (every message is bound to it).
        identity: the hospital's signing key, roster and minimum cohort (`SecAggIdentity`).

    Call `advertise_keys`, `share_keys`, `masked_update`, `consistency_check`, `unmask` in that
    order, each with the coordinator's request for that stage; each returns the reply. A request
    for another run, round, stage or node, or one that does not fit what came before, raises
    `SecAggError` naming this node and the stage. Secrets never appear in `repr`, logs or error
    messages.
    """

    def __init__(
        self,
        node_id: int,
        run_id: int | str,
        server_round: int,
        identity: SecAggIdentity,
        encoding: str = WEIGHTED,
    ) -> None:
        self.node_id = node_id
        # What this hospital's own run spec says the round carries; a coordinator asking for
        # the other encoding is refused at advertise_keys.
        self.encoding = check_encoding(encoding)
        self.run_id = str(run_id)
        self.server_round = server_round
        self.identity = identity
        self.stage: str | None = None  # the last stage completed
        self.params: dict[str, Any] = {}  # public round parameters from advertise_keys
        self._digest = b""  # SHA-256 of params: what every signature is bound to
        self._neighbours: tuple[int, ...] = ()
        self._share_key: X25519PrivateKey | None = None
        self._mask_key: X25519PrivateKey | None = None
        self._self_seed: bytes | None = None
        self._peer_share_keys: dict[int, bytes] = {}
        self._peer_mask_keys: dict[int, bytes] = {}
        self._peer_signing_keys: dict[int, bytes] = {}  # verified against the roster
        self._own_shares: tuple[bytes, bytes] | None = None  # (seed share, key share) we hold
        self._received: dict[int, tuple[bytes, bytes]] = {}  # neighbour -> its shares for us
        self._survivors: list[int] | None = None  # the survivor set this hospital signed
        self._memory_path = memory_path(identity, self.run_id, server_round)
        self._memory = load_memory(self._memory_path, server_round)

    def __repr__(self) -> str:
        return (
            f"SecAggClientSession(node_id={self.node_id}, run_id={self.run_id!r}, "
            f"round={self.server_round}, stage={self.stage!r})"
        )

    # --- helpers -----------------------------------------------------------------------------

    def _fail(self, stage: str, what: str) -> SecAggError:
        return refusal(self.node_id, stage, what)

    def _begin(self, request: Mapping[str, Any], stage: str, previous: str | None) -> None:
        if self.stage != previous:
            raise self._fail(
                stage, f"out of order: the last stage this hospital completed is {self.stage!r}"
            )
        check_header(request, self.run_id, self.server_round, stage, self.node_id)

    def _bound_to(self) -> tuple[str, int, bytes]:
        """What every signature of the round is bound to: run, round, parameters' digest."""
        return self.run_id, self.server_round, self._digest

    def _identities(self, nodes: list[int] | set[int]) -> list[str]:
        """Public signing keys (hex, sorted) of this hospital and the given neighbours."""
        own = self.identity.public_key
        return sorted({own.hex(), *(self._peer_signing_keys[node].hex() for node in nodes)})

    def _commit(self, stage: str, key: str, value: Any) -> None:
        """Hold this round to `value` across sessions: refuse if an earlier one differs."""
        earlier = self._memory.get(key)
        if earlier is not None and earlier != value:
            raise self._fail(
                stage,
                f"an earlier session of this round used a different {key} set; a resumed or "
                "replayed round must have exactly the same hospitals, so it is refused (the "
                "difference of two sums would reveal a hospital's update)",
            )
        if earlier is None:
            self._memory[key] = value
            self._save_memory(stage)

    def _save_memory(self, stage: str) -> None:
        if self._memory_path is None:
            return
        try:
            save_memory(self._memory_path, self._memory)
        except OSError as exc:
            logger.error("node %d: cannot write %s: %s", self.node_id, self._memory_path, exc)
            raise self._fail(
                stage, "this hospital cannot record its commitments for the round; refused"
            ) from None

    # --- stage 1 -----------------------------------------------------------------------------

    def advertise_keys(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Check the round's public parameters, make two X25519 key pairs, send the public keys.

        One key pair encrypts the Shamir shares sent to neighbours, the other derives the
        pairwise masks. Both are fresh for this round.
        """
        stage = ADVERTISE_KEYS
        self._begin(request, stage, None)
        params = read_round_params(request, self.encoding, self.node_id, stage)
        self._neighbours = check_round_params(
            params,
            self.run_id,
            self.server_round,
            self.node_id,
            self.identity.min_hospitals,
            stage,
        )
        self.params = params
        self._digest = params_digest(self.params)
        self._share_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        share_public, mask_public = raw_public(self._share_key), raw_public(self._mask_key)
        statement = key_statement(
            self.run_id, self.server_round, self.node_id, self._digest, share_public, mask_public
        )
        self.stage = stage
        logger.debug(
            "node %d, secagg round %d: keys advertised (%d neighbours)",
            self.node_id,
            self.server_round,
            len(self._neighbours),
        )
        return {
            **header(self.run_id, self.server_round, stage, self.node_id),
            "share_public_key": share_public,
            "mask_public_key": mask_public,
            "signing_public_key": self.identity.public_key,
            "key_signature": self.identity.signing_key.sign(statement),
        }

    # --- stage 2 -----------------------------------------------------------------------------

    def share_keys(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Share the self-mask seed and the mask private key with the neighbours that are still in.

        Makes a fresh 256-bit self-mask seed, splits it and the mask private key into Shamir
        shares (one per neighbour and one kept here), and encrypts each neighbour's pair of
        shares with ChaCha20-Poly1305 under a key agreed with that neighbour; the coordinator
        relays the ciphertexts but cannot read them.
        """
        stage = SHARE_KEYS
        self._begin(request, stage, ADVERTISE_KEYS)
        share_keys = read_node_keyed(
            request, "neighbour_ids", "share_public_keys", self.node_id, stage
        )
        mask_keys = read_node_keyed(
            request, "neighbour_ids", "mask_public_keys", self.node_id, stage
        )
        strangers = sorted(set(share_keys) - set(self._neighbours))
        if strangers:
            raise self._fail(stage, f"nodes {strangers} are not this hospital's neighbours")
        advertised = list(share_keys.values()) + list(mask_keys.values())
        if any(len(key) != SEED_BYTES for key in advertised):
            raise self._fail(stage, "a neighbour's public key is not a 32-byte X25519 key")
        if len(set(advertised)) != len(advertised):
            raise self._fail(stage, "two advertised public keys are equal; refusing to share")
        self._peer_signing_keys = verify_neighbour_keys(
            request, share_keys, mask_keys, self.identity, self._bound_to(), self.node_id
        )
        threshold = self.params["threshold"]
        if len(share_keys) + 1 < threshold:
            raise self._fail(
                stage,
                f"only {len(share_keys)} neighbours are left, fewer than the threshold "
                f"{threshold} minus this hospital",
            )
        assert self._share_key is not None and self._mask_key is not None
        self._peer_share_keys, self._peer_mask_keys = share_keys, mask_keys
        self._self_seed = os.urandom(SEED_BYTES)
        holders = [self.node_id, *sorted(share_keys)]
        seed_shares = shamir_split(self._self_seed, threshold, holders)
        key_shares = shamir_split(raw_private(self._mask_key), threshold, holders)
        self._own_shares = (seed_shares[self.node_id], key_shares[self.node_id])
        destinations, ciphertexts = [], []
        for neighbour in sorted(share_keys):
            try:
                key = agree_key(
                    self._share_key,
                    share_keys[neighbour],
                    pair_context(
                        self.run_id, self.server_round, "share-key", self.node_id, neighbour
                    ),
                )
            except ValueError:
                raise self._fail(stage, f"node {neighbour}'s share public key is invalid") from None
            plaintext = seed_shares[neighbour] + key_shares[neighbour]
            bound = binding(self.run_id, self.server_round, stage, self.node_id, neighbour)
            destinations.append(neighbour)
            ciphertexts.append(encrypt_share(key, plaintext, bound))
        self.stage = stage
        logger.debug(
            "node %d, secagg round %d: shares sent to %d neighbours",
            self.node_id,
            self.server_round,
            len(destinations),
        )
        return {
            **header(self.run_id, self.server_round, stage, self.node_id),
            "destinations": destinations,
            "ciphertexts": ciphertexts,
        }

    # --- stage 3 -----------------------------------------------------------------------------

    def masked_update(
        self,
        request: Mapping[str, Any],
        update: np.ndarray,
        weight: int,
        rng: np.random.Generator | None = None,
    ) -> dict[str, Any]:
        """Quantize, weight and mask this hospital's update.

        Args:
            request: the coordinator's masked_update request (the neighbours' encrypted shares).
            update: the flat float adapter delta (new - global), length `vector_length`.
            weight: this hospital's example count n_u (0 <= n_u <= max_weight).
            rng: drives stochastic rounding only; defaults to a fresh OS-seeded generator.

        The reply's `masked_update` is uint64 of length vector_length + 1: n_u * quantize(delta)
        then n_u, plus the self mask and the signed pairwise masks, modulo 2**modulus_bits.
        """
        stage = MASKED_UPDATE
        self._begin(request, stage, SHARE_KEYS)
        received = read_node_keyed(request, "sources", "ciphertexts", self.node_id, stage)
        check_share_senders(
            received,
            self._peer_share_keys,
            self.params["threshold"],
            self.identity.min_hospitals,
            self.node_id,
            stage,
        )
        values, weight = check_update(
            update, weight, self.params, self.encoding, self.node_id, stage
        )
        assert self._share_key is not None and self._mask_key is not None
        assert self._self_seed is not None
        # A resumed round resends the update it released: only among the very same hospitals.
        self._commit(stage, "participants", self._identities(set(received)))
        self._received.update(
            open_shares(
                received,
                self._share_key,
                self._peer_share_keys,
                (self.run_id, self.server_round),
                self.node_id,
                stage,
            )
        )
        masked = self._masked_vector(stage, values, weight, sorted(received), rng)
        self.stage = stage
        logger.debug(
            "node %d, secagg round %d: masked update of %d values sent",
            self.node_id,
            self.server_round,
            len(values),
        )
        modulus_bits = self.params["modulus_bits"]
        return {
            **header(self.run_id, self.server_round, stage, self.node_id),
            # Uniform modulo 2**modulus_bits: that many bits per value go on the wire, not 64.
            "masked_update": pack_bits(masked, modulus_bits),
        }

    def _masked_vector(
        self,
        stage: str,
        values: np.ndarray,
        weight: int,
        neighbours: list[int],
        rng: np.random.Generator | None,
    ) -> np.ndarray:
        """n_u * quantize(values) then n_u (or, integer encoding, the values as they are) in
        the field, plus the self mask and the signed pairwise mask of each neighbour."""
        assert self._mask_key is not None and self._self_seed is not None
        clip, modulus_bits = self.params["clip"], self.params["modulus_bits"]
        if self.encoding == INTEGER:
            masked = to_field(values).copy()  # already noised and counted (client/privacy)
        else:
            clipped = int(np.count_nonzero(np.abs(values) > clip))
            if clipped:
                logger.info(
                    "node %d, secagg round %d: %d of %d update values clipped to +-%g",
                    self.node_id,
                    self.server_round,
                    clipped,
                    len(values),
                    clip,
                )
            masked = weighted_field_vector(values, weight, clip, self.params["bits"], rng)
        masks = [(self._self_seed, 1)]  # (seed, sign): added or subtracted below
        for source in neighbours:
            try:
                seed = agree_key(
                    self._mask_key,
                    self._peer_mask_keys[source],
                    pair_context(
                        self.run_id, self.server_round, "pairwise-mask", self.node_id, source
                    ),
                )
            except ValueError:
                raise self._fail(stage, f"node {source}'s mask public key is invalid") from None
            masks.append((seed, mask_sign(self.node_id, source)))
        add_masks(masked, masks, modulus_bits)
        return masked

    # --- stage 4 -----------------------------------------------------------------------------

    def consistency_check(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Sign the survivor set the coordinator announced, after checking it can be true.

        The set must hold this hospital (its masked update was sent), only nodes of the round,
        at least `consistency_quorum` hospitals, and enough of its neighbours to reach the
        threshold. A hospital signs one survivor set per round, ever (`_commit`).
        """
        stage = CONSISTENCY_CHECK
        self._begin(request, stage, MASKED_UPDATE)
        survivors = read_list(request, "survivors", int, self.node_id, stage)
        check_survivors(survivors, self.params["node_ids"], self._quorum(), self.node_id, stage)
        threshold, minimum = self.params["threshold"], self.identity.min_hospitals
        check_enough_neighbours(set(survivors), self._received, threshold, self.node_id, stage)
        check_minimum_cohort(set(survivors), self._received, minimum, self.node_id, stage)
        self._commit(stage, "survivors", self._identities(set(survivors) & set(self._received)))
        self._survivors = sorted(survivors)
        statement = survivor_statement(
            self.run_id, self.server_round, self.node_id, self._digest, self._survivors
        )
        self.stage = stage
        return {
            **header(self.run_id, self.server_round, stage, self.node_id),
            "survivors_signature": self.identity.signing_key.sign(statement),
        }

    def _quorum(self) -> int:
        return consistency_quorum(self.params["threshold"], len(self.params["node_ids"]))

    # --- stage 5 -----------------------------------------------------------------------------

    def unmask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Reveal, for each neighbour, the share the coordinator needs and nothing more.

        Only once `consistency_quorum` distinct roster hospitals have signed the survivor set
        this hospital signed. For a neighbour in that set (this hospital included) the share of
        its self-mask seed; for one that shared keys but is not in it, the share of its mask
        private key. Never both for the same neighbour, in this session or any earlier one.
        """
        stage = UNMASK
        self._begin(request, stage, CONSISTENCY_CHECK)
        survivors = read_list(request, "survivors", int, self.node_id, stage)
        if sorted(survivors) != self._survivors:
            raise self._fail(
                stage,
                "the survivor set differs from the one this hospital signed; refusing to reveal",
            )
        assert self._survivors is not None
        verify_survivor_signatures(
            request,
            self._survivors,
            self._quorum(),
            self.identity,
            self._peer_signing_keys,
            self._bound_to(),
            self.node_id,
        )
        minimum = self.identity.min_hospitals
        check_minimum_cohort(set(survivors), self._received, minimum, self.node_id, stage)
        alive = set(survivors) - {self.node_id}
        neighbours_alive = sorted(alive & set(self._received))
        dropped = sorted(set(self._received) - alive)
        revealed = check_reveal(
            self._memory.get("revealed", {}),
            neighbours_alive,
            dropped,
            self._peer_signing_keys,
            self.node_id,
            stage,
        )
        if revealed != self._memory.get("revealed"):
            self._memory["revealed"] = revealed
            self._save_memory(stage)
        assert self._own_shares is not None
        seed_owners = [self.node_id, *neighbours_alive]
        seed_shares = [self._own_shares[0]] + [self._received[node][0] for node in neighbours_alive]
        key_owners = dropped
        key_shares = [self._received[node][1] for node in key_owners]
        self.stage = stage
        self._forget()
        logger.debug(
            "node %d, secagg round %d: revealed %d seed shares and %d key shares",
            self.node_id,
            self.server_round,
            len(seed_owners),
            len(key_owners),
        )
        return {
            **header(self.run_id, self.server_round, stage, self.node_id),
            "seed_share_owners": seed_owners,
            "seed_shares": seed_shares,
            "key_share_owners": key_owners,
            "key_shares": key_shares,
        }

    # --- persistence between messages --------------------------------------------------------

    def to_state(self) -> bytes:
        """This session as bytes for the node's own state between stages (never sent anywhere).

        Flower may serve consecutive stages from different worker processes, so the session
        lives in the node's `Context.state`, which stays on the hospital's side.
        """
        return session_to_bytes(self)

    @classmethod
    def from_state(cls, blob: bytes) -> SecAggClientSession:
        """Rebuild a session saved with `to_state` (by this same node)."""
        identity, state = state_from_bytes(blob)
        session = cls(
            state["node_id"], state["run_id"], state["server_round"], identity, state["encoding"]
        )
        restore_session(session, state)
        return session

    def _forget(self) -> None:
        """Drop this round's secrets once they are no longer needed."""
        self._share_key = self._mask_key = None
        self._self_seed = None
        self._own_shares = None
        self._received = {}
