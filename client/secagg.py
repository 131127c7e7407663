"""A hospital's side of one SecAgg+ round: four stages, one method each.

`SecAggClientSession` keeps the hospital's secrets for one round (two X25519 key pairs, the
self-mask seed, the shares its neighbours sent it) and turns each request from the coordinator
into a reply. Requests and replies are flat dicts of int, float, str, bytes, lists of those and
(for the masked update) one 1-D uint64 numpy array, so they fit Flower ConfigRecords and
ArrayRecords. Payload keys, per stage (every payload also has run_id, round, stage, node_id):

- advertise_keys: request node_ids, neighbours, threshold, clip, bits, max_weight,
  modulus_bits, vector_length; reply share_public_key, mask_public_key.
- share_keys: request neighbour_ids, share_public_keys, mask_public_keys;
  reply destinations, ciphertexts.
- masked_update: request sources, ciphertexts; reply masked_update (uint64, vector_length + 1).
- unmask: request survivors, dropped; reply seed_share_owners, seed_shares, key_share_owners,
  key_shares.

The arithmetic lives in `common.secagg`; this class only holds state and checks messages.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedward.common.errors import SecAggError
from fedward.common.secagg import (
    ADVERTISE_KEYS,
    MASKED_UPDATE,
    SEED_BYTES,
    SHARE_BYTES,
    SHARE_KEYS,
    UNMASK,
    agree_key,
    binding,
    check_header,
    check_modulus,
    check_node_ids,
    check_threshold,
    decrypt_share,
    encrypt_share,
    expand_mask,
    header,
    mask_sign,
    pair_context,
    quantize,
    read_field,
    read_list,
    read_node_keyed,
    reduce_modulus,
    round_seed,
    secagg_graph,
    shamir_split,
)

logger = logging.getLogger(__name__)


def _raw_public(private_key: X25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _raw_private(private_key: X25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


class SecAggClientSession:
    """One hospital's state across the four SecAgg+ stages of one round.

    Args:
        node_id: this hospital's Flower node id.
        run_id: the Flower run id (every message is bound to it).
        server_round: the round number (every message is bound to it).

    Call `advertise_keys`, `share_keys`, `masked_update`, `unmask` in that order, each with the
    coordinator's request for that stage; each returns the reply. A request for another run,
    round, stage or node, or one that does not fit what came before, raises `SecAggError`
    naming this node and the stage. Secrets never appear in `repr`, logs or error messages.
    """

    def __init__(self, node_id: int, run_id: int | str, server_round: int) -> None:
        self.node_id = node_id
        self.run_id = str(run_id)
        self.server_round = server_round
        self.stage: str | None = None  # the last stage completed
        self.params: dict[str, Any] = {}  # public round parameters from advertise_keys
        self._neighbours: tuple[int, ...] = ()
        self._share_key: X25519PrivateKey | None = None
        self._mask_key: X25519PrivateKey | None = None
        self._self_seed: bytes | None = None
        self._peer_share_keys: dict[int, bytes] = {}
        self._peer_mask_keys: dict[int, bytes] = {}
        self._own_shares: tuple[bytes, bytes] | None = None  # (seed share, key share) we hold
        self._received: dict[int, tuple[bytes, bytes]] = {}  # neighbour -> its shares for us

    def __repr__(self) -> str:
        return (
            f"SecAggClientSession(node_id={self.node_id}, run_id={self.run_id!r}, "
            f"round={self.server_round}, stage={self.stage!r})"
        )

    # --- helpers -----------------------------------------------------------------------------

    def _fail(self, stage: str, what: str) -> SecAggError:
        return SecAggError(f"node {self.node_id}, stage {stage}: {what}")

    def _begin(self, request: Mapping[str, Any], stage: str, previous: str | None) -> None:
        if self.stage != previous:
            raise self._fail(
                stage, f"out of order: the last stage this hospital completed is {self.stage!r}"
            )
        check_header(request, self.run_id, self.server_round, stage, self.node_id)

    def _bind(self, stage: str, source: int, destination: int) -> bytes:
        return binding(self.run_id, self.server_round, stage, source, destination)

    # --- stage 1 -----------------------------------------------------------------------------

    def advertise_keys(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Check the round's public parameters, make two X25519 key pairs, send the public keys.

        One key pair encrypts the Shamir shares sent to neighbours, the other derives the
        pairwise masks. Both are fresh for this round.
        """
        stage = ADVERTISE_KEYS
        self._begin(request, stage, None)
        node_ids = read_list(request, "node_ids", int, self.node_id, stage)
        neighbours = read_field(request, "neighbours", int, self.node_id, stage)
        threshold = read_field(request, "threshold", int, self.node_id, stage)
        clip = float(read_field(request, "clip", float, self.node_id, stage))
        bits = read_field(request, "bits", int, self.node_id, stage)
        max_weight = read_field(request, "max_weight", int, self.node_id, stage)
        modulus_bits = read_field(request, "modulus_bits", int, self.node_id, stage)
        vector_length = read_field(request, "vector_length", int, self.node_id, stage)
        try:
            nodes = check_node_ids(node_ids)
            graph = secagg_graph(nodes, neighbours, round_seed(self.run_id, self.server_round))
            if self.node_id not in graph:
                raise SecAggError("this hospital is not among the round's node_ids")
            self._neighbours = graph[self.node_id]
            check_threshold(threshold, len(self._neighbours) + 1)
            expected_bits = check_modulus(len(nodes), max_weight, clip, bits)
        except SecAggError as exc:
            raise self._fail(stage, str(exc)) from None
        if modulus_bits != expected_bits:
            raise self._fail(
                stage,
                f"modulus_bits {modulus_bits} does not match the {expected_bits} bits that "
                f"{len(nodes)} hospitals, max weight {max_weight} and {bits} bits need",
            )
        if vector_length < 1:
            raise self._fail(stage, f"vector_length must be >= 1, got {vector_length}")
        self.params = {
            "node_ids": nodes,
            "neighbours": neighbours,
            "threshold": threshold,
            "clip": clip,
            "bits": bits,
            "max_weight": max_weight,
            "modulus_bits": modulus_bits,
            "vector_length": vector_length,
        }
        self._share_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self.stage = stage
        logger.debug(
            "node %d, secagg round %d: keys advertised (%d neighbours)",
            self.node_id,
            self.server_round,
            len(self._neighbours),
        )
        return {
            **header(self.run_id, self.server_round, stage, self.node_id),
            "share_public_key": _raw_public(self._share_key),
            "mask_public_key": _raw_public(self._mask_key),
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
        key_shares = shamir_split(_raw_private(self._mask_key), threshold, holders)
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
            destinations.append(neighbour)
            ciphertexts.append(
                encrypt_share(key, plaintext, self._bind(stage, self.node_id, neighbour))
            )
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
        strangers = sorted(set(received) - set(self._peer_share_keys))
        if strangers:
            raise self._fail(
                stage, f"shares from nodes {strangers}, which are not neighbours it shared with"
            )
        threshold = self.params["threshold"]
        if len(received) + 1 < threshold:
            raise self._fail(
                stage,
                f"only {len(received)} neighbours sent shares, fewer than the threshold "
                f"{threshold} minus this hospital",
            )
        vector_length = self.params["vector_length"]
        values = np.asarray(update)
        if values.ndim != 1 or values.shape[0] != vector_length:
            raise self._fail(stage, f"update has shape {values.shape}, expected ({vector_length},)")
        if not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(
            values.dtype, np.integer
        ):
            raise self._fail(stage, f"update has dtype {values.dtype}, expected floats")
        if not np.all(np.isfinite(values)):
            raise self._fail(stage, "update has NaN or infinite values; check local training")
        max_weight = self.params["max_weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)):
            raise self._fail(
                stage, f"weight must be an int example count, got {type(weight).__name__}"
            )
        if not 0 <= int(weight) <= max_weight:
            raise self._fail(
                stage,
                f"weight (example count) {int(weight)} is outside 0..{max_weight}; raise "
                f"secagg_max_weight",
            )
        weight = int(weight)
        assert self._share_key is not None and self._mask_key is not None
        assert self._self_seed is not None
        for source, ciphertext in received.items():
            try:
                key = agree_key(
                    self._share_key,
                    self._peer_share_keys[source],
                    pair_context(self.run_id, self.server_round, "share-key", self.node_id, source),
                )
            except ValueError:
                raise self._fail(stage, f"node {source}'s share public key is invalid") from None
            try:
                plaintext = decrypt_share(
                    key, ciphertext, self._bind(SHARE_KEYS, source, self.node_id)
                )
            except SecAggError:
                raise self._fail(
                    stage,
                    f"the share from node {source} does not authenticate for this run, round "
                    f"and receiver (replayed, misrouted or altered); rejected",
                ) from None
            if len(plaintext) != 2 * SHARE_BYTES:
                raise self._fail(stage, f"the share from node {source} has the wrong size")
            self._received[source] = (plaintext[:SHARE_BYTES], plaintext[SHARE_BYTES:])

        clip, bits = self.params["clip"], self.params["bits"]
        modulus_bits = self.params["modulus_bits"]
        clipped = int(np.count_nonzero(np.abs(values) > clip))
        if clipped:
            logger.info(
                "node %d, secagg round %d: %d of %d update values clipped to +-%g",
                self.node_id,
                self.server_round,
                clipped,
                vector_length,
                clip,
            )
        masked = np.empty(vector_length + 1, dtype=np.uint64)
        masked[:-1] = quantize(values, clip, bits, rng) * np.uint64(weight)
        masked[-1] = weight
        masked += expand_mask(self._self_seed, vector_length + 1, modulus_bits)
        for source in sorted(received):
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
            pairwise = expand_mask(seed, vector_length + 1, modulus_bits)
            if mask_sign(self.node_id, source) > 0:
                masked += pairwise
            else:
                masked -= pairwise
        reduce_modulus(masked, modulus_bits)
        self.stage = stage
        logger.debug(
            "node %d, secagg round %d: masked update of %d values sent",
            self.node_id,
            self.server_round,
            vector_length,
        )
        return {
            **header(self.run_id, self.server_round, stage, self.node_id),
            "masked_update": masked,
        }

    # --- stage 4 -----------------------------------------------------------------------------

    def unmask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Reveal, for each neighbour, the share the coordinator needs and nothing more.

        For a neighbour whose masked update arrived (a survivor, this hospital included) the
        share of its self-mask seed; for one that dropped after sharing keys, the share of its
        mask private key. Never both for the same neighbour.
        """
        stage = UNMASK
        self._begin(request, stage, MASKED_UPDATE)
        survivors = read_list(request, "survivors", int, self.node_id, stage)
        dropped = read_list(request, "dropped", int, self.node_id, stage)
        if len(set(survivors)) != len(survivors) or len(set(dropped)) != len(dropped):
            raise self._fail(stage, "'survivors' or 'dropped' lists a node twice")
        both = sorted(set(survivors) & set(dropped))
        if both:
            raise self._fail(
                stage, f"nodes {both} are listed as both survivors and dropped; refusing to reveal"
            )
        survivors = [node for node in survivors if node != self.node_id]
        unknown = sorted(set(survivors + dropped) - set(self._received))
        if unknown:
            raise self._fail(stage, f"it holds no shares from nodes {unknown}")
        threshold = self.params["threshold"]
        if len(survivors) + 1 < threshold:
            raise self._fail(
                stage,
                f"only {len(survivors)} neighbours survived, fewer than the threshold "
                f"{threshold} minus this hospital; refusing to unmask",
            )
        assert self._own_shares is not None
        seed_owners = [self.node_id, *sorted(survivors)]
        seed_shares = [self._own_shares[0]] + [
            self._received[node][0] for node in sorted(survivors)
        ]
        key_owners = sorted(dropped)
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
        keys = {
            "share_key": None if self._share_key is None else _raw_private(self._share_key),
            "mask_key": None if self._mask_key is None else _raw_private(self._mask_key),
        }
        state = {
            "node_id": self.node_id,
            "run_id": self.run_id,
            "server_round": self.server_round,
            "stage": self.stage,
            "params": self.params,
            "neighbours": self._neighbours,
            "self_seed": self._self_seed,
            "peer_share_keys": self._peer_share_keys,
            "peer_mask_keys": self._peer_mask_keys,
            "own_shares": self._own_shares,
            "received": self._received,
            **keys,
        }
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def from_state(cls, blob: bytes) -> SecAggClientSession:
        """Rebuild a session saved with `to_state` (by this same node)."""
        state = pickle.loads(blob)
        session = cls(state["node_id"], state["run_id"], state["server_round"])
        session.stage = state["stage"]
        session.params = state["params"]
        session._neighbours = tuple(state["neighbours"])
        session._self_seed = state["self_seed"]
        session._peer_share_keys = state["peer_share_keys"]
        session._peer_mask_keys = state["peer_mask_keys"]
        session._own_shares = state["own_shares"]
        session._received = state["received"]
        for name in ("share_key", "mask_key"):
            raw = state[name]
            setattr(
                session,
                f"_{name}",
                None if raw is None else X25519PrivateKey.from_private_bytes(raw),
            )
        return session

    def _forget(self) -> None:
        """Drop this round's secrets once they are no longer needed."""
        self._share_key = self._mask_key = None
        self._self_seed = None
        self._own_shares = None
        self._received = {}
