"""A dishonest coordinator against real hospital sessions, as a test harness.

`Coordinator` plays the server as an attacker would: it starts from the honest server session's
requests, then swaps keys, tells hospitals different survivor sets, splits the cohort, or replays
a resumed round into another set of hospitals. It keeps everything the hospitals send it (masked
vectors, revealed shares, shares encrypted to keys it substituted) and `recover` tries to strip
one hospital's masks with it. The attack suites are tests/server/test_secagg_active_coordinator.py
and tests/server/test_secagg_minimum_cohort.py; the first shows that `recover` succeeds the
moment the coordinator holds both secrets of a hospital.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
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
    mask_sign,
    pair_context,
    quantize,
    shamir_combine,
    unpack_bits,
)
from fedward.server.secagg import SecAggServerSession

LENGTH = 64
RUN = "run-x"


def raw_key(key) -> bytes:
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


def signature_of(coordinator: Coordinator, node: int) -> bytes:
    return coordinator.advertised[node]["key_signature"]
