"""The coordinator's side of one SecAgg+ round: relay, decide survivors, unmask the sum.

`SecAggServerSession` never sees a hospital's update unmasked. Per stage it takes the hospitals'
replies (a dict keyed by node id; a hospital missing from it has dropped out), checks them, and
returns the requests for the next stage: also a dict keyed by node id. After the unmask stage it
reconstructs the self-mask seeds of the survivors and the mask keys of the hospitals that dropped
after sharing keys, removes every mask from the sum, and returns the dequantized weighted sum and
the total weight (`SecAggResult`).

    session = SecAggServerSession(run_id, server_round, node_ids, vector_length, ...)
    requests = session.advertise_keys_requests()
    requests = session.share_keys_requests(replies)      # replies to advertise_keys
    requests = session.masked_update_requests(replies)   # replies to share_keys
    requests = session.consistency_requests(replies)     # replies to masked_update
    requests = session.unmask_requests(replies)          # replies to consistency_check
    result = session.aggregate(replies)                  # replies to unmask

The coordinator relays each hospital's signatures (on its keys, then on the survivor set) but
does not need to check them: the hospitals do, and refuse to reveal anything otherwise. Its own
honesty is not assumed anywhere; the checks here only make an honest round fail early and
clearly. A hospital that refuses a stage (a survivor set smaller than its site's
`min_secure_aggregation_hospitals`, say: reason `secagg.cohort_too_small`) is simply missing from
the replies, like one that dropped; with fewer signers than the quorum the round fails. A masked
update arrives bit-packed (`common.secagg.pack_bits`); a malformed one is left out like a hospital
that dropped, and recovered from its neighbours' shares.

Payload keys are listed in `client.secagg`. A reply from an unknown node, for another run, round,
stage or node (replayed or misrouted), or of the wrong shape (a truncated vector, a short key,
shares for the wrong nodes) is left out like a hospital that dropped, logged and named in
`session.rejected`: one hospital's bad message does not fail the round. Too few survivors to
unmask raises `SecAggError` naming the node and stage; the round then fails and the global adapter
stays as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedward.common.errors import SecAggError
from fedward.common.secagg import (
    ADVERTISE_KEYS,
    CONSISTENCY_CHECK,
    MASKED_UPDATE,
    SHARE_KEYS,
    UNMASK,
    add_masks,
    agree_key,
    check_header,
    check_modulus,
    check_node_ids,
    consistency_quorum,
    dequantize_sum,
    header,
    mask_sign,
    pair_context,
    read_field,
    round_seed,
    secagg_graph,
    secure_threshold,
    shamir_combine,
    sum_packed,
)
from fedward.common.secagg.distributed_noise import INTEGER, WEIGHTED, WRAP_LIMIT, check_encoding
from fedward.common.secagg.quantize import MAX_MODULUS_BITS
from fedward.server.secagg_replies import (
    read_keys,
    read_masked_update,
    read_revealed,
    read_shares,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggResult:
    """What secure aggregation reveals: the sum, nothing per hospital.

    Attributes:
        weighted_sum: sum over included hospitals of n_u * delta_u (float64, dequantized);
            empty for the integer encoding.
        total_weight: sum over included hospitals of n_u (their example counts); 0 for the
            integer encoding.
        included: hospitals whose updates are in the sum (their masked update arrived).
        dropped: hospitals that started the round but whose updates are not in the sum.
        integer_sum: the integer encoding's sum (uint64, read as int64: distributed noise,
            `common/secagg/distributed_noise.py`); None for the weighted encoding.
    """

    weighted_sum: np.ndarray
    total_weight: int
    included: tuple[int, ...]
    dropped: tuple[int, ...]
    integer_sum: np.ndarray | None = None

    @property
    def average(self) -> np.ndarray:
        """The weighted FedAvg update: weighted_sum / total_weight."""
        return self.weighted_sum / self.total_weight


class SecAggServerSession:
    """The coordinator's state for one SecAgg+ round.

    Args:
        run_id: the Flower run id (every message is bound to it).
        server_round: the round number (every message is bound to it).
        node_ids: the hospitals sampled for this round (Flower node ids).
        vector_length: number of float values in a flat adapter update.
        neighbours: neighbours per hospital in the SecAgg+ graph, rounded up to even; 0
            (default) is all-to-all.
        threshold: share of a neighbourhood (a hospital and its neighbours) needed to recover a
            hospital's secrets (default 0.5); the count, at least 2 and at least a majority of
            the neighbourhood (the hospitals refuse less), is `self.threshold`.
        clip: quantization range [-clip, clip] of update values (default 1.0).
        bits: quantization bits per value (default 24).
        max_weight: largest example count a hospital may weight its update with (default
            2**20); with the hospital count and `bits` it sets the modulus (`check_modulus`).
        encoding: "weighted" (default): each hospital sends n_u * quantize(delta_u) and n_u;
            "integer": each sends an int64 vector of vector_length + 1 values (distributed
            noise's noisy gradient sum and count), modulo 2**64; clip, bits and max_weight then
            play no part.
    """

    def __init__(
        self,
        run_id: int | str,
        server_round: int,
        node_ids: list[int],
        vector_length: int,
        *,
        neighbours: int = 0,
        threshold: float = 0.5,
        clip: float = 1.0,
        bits: int = 24,
        max_weight: int = 2**20,
        encoding: str = WEIGHTED,
    ) -> None:
        self.run_id = str(run_id)
        self.server_round = server_round
        self.node_ids = check_node_ids(node_ids)
        if vector_length < 1:
            raise SecAggError(
                f"secure aggregation: vector_length must be >= 1, got {vector_length}"
            )
        self.vector_length = vector_length
        self.neighbours = neighbours
        self.clip = float(clip)
        self.bits = bits
        self.max_weight = max_weight
        self.encoding = check_encoding(encoding)
        self.modulus_bits = (
            MAX_MODULUS_BITS
            if encoding == INTEGER
            else check_modulus(len(self.node_ids), max_weight, self.clip, bits)
        )
        self.graph = secagg_graph(self.node_ids, neighbours, round_seed(self.run_id, server_round))
        degree = len(next(iter(self.graph.values()))) if self.graph else 0
        self.threshold = secure_threshold(threshold, degree + 1)
        self.quorum = consistency_quorum(self.threshold, len(self.node_ids))
        self.stage: str | None = None  # the last stage whose requests were sent
        self._asked: set[int] = set()  # who received the current stage's request
        self._share_public: dict[int, bytes] = {}
        self._mask_public: dict[int, bytes] = {}
        self._signing_public: dict[int, bytes] = {}
        self._key_signatures: dict[int, bytes] = {}
        self._sharers: set[int] = set()  # U2: sent their encrypted shares
        self._routes: dict[int, dict[int, bytes]] = {}  # receiver -> sender -> ciphertext
        self._contributors: set[int] = set()  # U3: masked update arrived
        self._sum: np.ndarray | None = None
        self._survivors: list[int] = []
        self._unmask_asked: dict[int, tuple[list[int], list[int]]] = {}
        self.rejected: dict[int, str] = {}  # node -> why its reply was left out (the last one)

    def __repr__(self) -> str:
        return (
            f"SecAggServerSession(run_id={self.run_id!r}, round={self.server_round}, "
            f"hospitals={len(self.node_ids)}, threshold={self.threshold}, stage={self.stage!r})"
        )

    # --- helpers -----------------------------------------------------------------------------

    def _neighbourhood(self, node: int) -> set[int]:
        return {node, *self.graph[node]}

    def _receive(
        self,
        replies: Mapping[int, Mapping[str, Any]],
        stage: str,
        read: Callable[[int, Mapping[str, Any]], Any] | None = None,
    ) -> dict[int, Any]:
        """The stage's replies that pass its checks, each as `read(node, payload)` returns it
        (the payload itself without `read`).

        A reply from a node that was not asked, one for another run, round, stage or node (a
        replayed or misrouted message), and one that `read` finds malformed (a truncated
        vector, a short key) is left out like a hospital that dropped: logged, kept in
        `self.rejected` with its reason, and the round goes on while the threshold holds.
        """
        if self.stage != stage:
            raise SecAggError(
                f"secure aggregation, stage {stage}: out of order, the requests last sent were "
                f"for stage {self.stage!r}"
            )
        accepted: dict[int, Any] = {}
        for node, payload in replies.items():
            try:
                if node not in self._asked:
                    raise SecAggError(
                        f"node {node}, stage {stage}: unknown node, it was not asked in this "
                        f"stage of round {self.server_round}; reply rejected"
                    )
                check_header(payload, self.run_id, self.server_round, stage, node)
                accepted[node] = payload if read is None else read(node, payload)
            except SecAggError as exc:
                self.rejected[node] = str(exc)
                logger.warning("secagg round %d: %s; left out", self.server_round, exc)
        missing = sorted(self._asked - set(accepted))
        logger.info(
            "secagg round %d, %s: %d of %d hospitals replied%s",
            self.server_round,
            stage,
            len(accepted),
            len(self._asked),
            f" (dropped: {missing})" if missing else "",
        )
        return accepted

    def _require_threshold(self, nodes: set[int], alive: set[int], stage: str, what: str) -> None:
        for node in sorted(nodes):
            holders = self._neighbourhood(node) & alive
            if len(holders) < self.threshold:
                raise SecAggError(
                    f"node {node}, stage {stage}: only {len(holders)} of its neighbourhood "
                    f"{what}, fewer than the threshold {self.threshold}; the round cannot be "
                    f"securely aggregated (too many hospitals dropped out)"
                )

    def _request(self, stage: str, node: int, **fields: Any) -> dict[str, Any]:
        return {**header(self.run_id, self.server_round, stage, node), **fields}

    # --- stage 1 -----------------------------------------------------------------------------

    def advertise_keys_requests(self) -> dict[int, dict[str, Any]]:
        """Requests that start the round: the public parameters, one per sampled hospital."""
        stage = ADVERTISE_KEYS
        if self.stage is not None:
            raise SecAggError(f"secure aggregation, stage {stage}: the round was already started")
        self.stage, self._asked = stage, set(self.node_ids)
        return {
            node: self._request(
                stage,
                node,
                node_ids=list(self.node_ids),
                neighbours=self.neighbours,
                threshold=self.threshold,
                clip=self.clip,
                bits=self.bits,
                max_weight=self.max_weight,
                modulus_bits=self.modulus_bits,
                vector_length=self.vector_length,
                encoding=self.encoding,
            )
            for node in self.node_ids
        }

    # --- stage 2 -----------------------------------------------------------------------------

    def share_keys_requests(
        self, replies: Mapping[int, Mapping[str, Any]]
    ) -> dict[int, dict[str, Any]]:
        """Collect the public keys; send each hospital those of its neighbours that replied."""
        stage = ADVERTISE_KEYS
        keys = self._receive(replies, stage, read_keys)
        for node, (share_key, mask_key, signing_key, signature) in keys.items():
            self._share_public[node], self._mask_public[node] = share_key, mask_key
            self._signing_public[node], self._key_signatures[node] = signing_key, signature
        advertised = set(keys)
        self._require_threshold(advertised, advertised, stage, "advertised keys")
        next_stage = SHARE_KEYS
        self.stage, self._asked = next_stage, advertised
        requests = {}
        for node in sorted(advertised):
            peers = sorted(set(self.graph[node]) & advertised)
            requests[node] = self._request(
                next_stage,
                node,
                neighbour_ids=peers,
                share_public_keys=[self._share_public[peer] for peer in peers],
                mask_public_keys=[self._mask_public[peer] for peer in peers],
                signing_public_keys=[self._signing_public[peer] for peer in peers],
                key_signatures=[self._key_signatures[peer] for peer in peers],
            )
        return requests

    # --- stage 3 -----------------------------------------------------------------------------

    def masked_update_requests(
        self, replies: Mapping[int, Mapping[str, Any]]
    ) -> dict[int, dict[str, Any]]:
        """Collect the encrypted shares; route to each hospital those addressed to it."""
        stage = SHARE_KEYS
        shares = self._receive(
            replies,
            stage,
            lambda node, payload: read_shares(
                node, payload, set(self.graph[node]) & set(self._share_public)
            ),
        )
        sharers = set(shares)
        routes: dict[int, dict[int, bytes]] = {node: {} for node in sharers}
        for node, sent in shares.items():
            for destination, ciphertext in sent.items():
                if destination in routes:
                    routes[destination][node] = ciphertext
        self._require_threshold(sharers, sharers, stage, "shared keys")
        self._sharers, self._routes = sharers, routes
        next_stage = MASKED_UPDATE
        self.stage, self._asked = next_stage, sharers
        return {
            node: self._request(
                next_stage,
                node,
                sources=sorted(routes[node]),
                ciphertexts=[routes[node][source] for source in sorted(routes[node])],
            )
            for node in sorted(sharers)
        }

    # --- stage 4 -----------------------------------------------------------------------------

    def consistency_requests(
        self, replies: Mapping[int, Mapping[str, Any]]
    ) -> dict[int, dict[str, Any]]:
        """Add up the masked updates; ask each contributor to sign the survivor set."""
        stage = MASKED_UPDATE
        # A malformed one is left out like a hospital that dropped: its masks are removed from
        # the shares.
        masked = self._receive(
            replies,
            stage,
            lambda node, payload: read_masked_update(
                node, payload, self.modulus_bits, self.vector_length
            ),
        )
        packed_updates = [masked[node] for node in sorted(masked)]
        contributors = set(masked)
        if not contributors:
            raise SecAggError(
                f"secure aggregation, stage {stage}: no hospital sent a masked update"
            )
        if len(contributors) < self.quorum:
            raise SecAggError(
                f"secure aggregation, stage {stage}: only {len(contributors)} hospitals sent "
                f"masked updates, fewer than the {self.quorum} signatures on the survivor set "
                f"the hospitals need before revealing shares (the threshold, and at least a "
                f"majority of the round's {len(self.node_ids)})"
            )
        needed = contributors | {
            node for node in self._sharers - contributors if set(self.graph[node]) & contributors
        }
        self._require_threshold(needed, contributors, stage, "sent masked updates")
        # Summed straight from the packed bytes (reduced modulo 2**modulus_bits): no hospital's
        # masked vector is ever unpacked on its own.
        self._sum = sum_packed(packed_updates, self.modulus_bits, self.vector_length + 1)
        self._contributors = contributors
        self._survivors = sorted(contributors)
        next_stage = CONSISTENCY_CHECK
        self.stage, self._asked = next_stage, contributors
        return {
            node: self._request(next_stage, node, survivors=list(self._survivors))
            for node in self._survivors
        }

    # --- stage 5 -----------------------------------------------------------------------------

    def unmask_requests(
        self, replies: Mapping[int, Mapping[str, Any]]
    ) -> dict[int, dict[str, Any]]:
        """Collect the signatures on the survivor set; relay them all, ask for the shares."""
        stage = CONSISTENCY_CHECK
        signatures = self._receive(
            replies,
            stage,
            lambda node, payload: read_field(payload, "survivors_signature", bytes, node, stage),
        )
        signers = sorted(signatures)
        if len(signers) < self.quorum:
            raise SecAggError(
                f"secure aggregation, stage {stage}: only {len(signers)} hospitals signed the "
                f"survivor set, fewer than the {self.quorum} each hospital needs before it "
                f"reveals a share (the threshold, and at least a majority of the round)"
            )
        needed = self._contributors | {
            node
            for node in self._sharers - self._contributors
            if set(self.graph[node]) & self._contributors
        }
        self._require_threshold(needed, set(signers), stage, "signed the survivor set")
        next_stage = UNMASK
        self.stage, self._asked = next_stage, set(signers)
        requests = {}
        for node in signers:
            peers = set(self._routes[node])  # its neighbours whose shares it holds
            self._unmask_asked[node] = (
                sorted(peers & self._contributors),
                sorted(peers - self._contributors),
            )
            requests[node] = self._request(
                next_stage,
                node,
                survivors=list(self._survivors),
                signer_ids=signers,
                signer_keys=[self._signing_public[signer] for signer in signers],
                signatures=[signatures[signer] for signer in signers],
            )
        return requests

    # --- result ------------------------------------------------------------------------------

    def aggregate(self, replies: Mapping[int, Mapping[str, Any]]) -> SecAggResult:
        """Collect the revealed shares, remove every mask, and return the unmasked sum."""
        stage = UNMASK
        revealed = self._receive(
            replies,
            stage,
            lambda node, payload: read_revealed(node, payload, *self._unmask_asked[node]),
        )
        seed_shares: dict[int, dict[int, bytes]] = {node: {} for node in self._contributors}
        key_shares: dict[int, dict[int, bytes]] = {node: {} for node in self._sharers}
        for node, (seeds, keys) in revealed.items():
            for owner, share in seeds.items():
                seed_shares[owner][node] = share
            for owner, share in keys.items():
                key_shares[owner][node] = share

        assert self._sum is not None
        # Every mask still in the sum, as (seed, sign): each survivor's self mask, and the
        # pairwise masks survivors shared with hospitals that dropped after sharing keys.
        masks = [
            (self._recover(owner, seed_shares[owner], "self-mask seed"), -1)
            for owner in sorted(self._contributors)
        ]
        for owner in sorted(self._sharers - self._contributors):
            partners = sorted(set(self.graph[owner]) & self._contributors)
            if not partners:
                continue  # no survivor masked with it: nothing to remove
            raw_key = self._recover(owner, key_shares[owner], "mask private key")
            mask_key = X25519PrivateKey.from_private_bytes(raw_key)
            for partner in partners:
                try:
                    seed = agree_key(
                        mask_key,
                        self._mask_public[partner],
                        pair_context(
                            self.run_id, self.server_round, "pairwise-mask", owner, partner
                        ),
                    )
                except ValueError:
                    raise SecAggError(
                        f"node {partner}, stage {UNMASK}: its mask public key is invalid"
                    ) from None
                # The survivor added it (sign +1) or subtracted it: do the opposite.
                masks.append((seed, -mask_sign(partner, owner)))
        total = add_masks(self._sum.copy(), masks, self.modulus_bits)
        return self._result(total)

    def _recover(self, owner: int, shares: dict[int, bytes], what: str) -> bytes:
        if len(shares) < self.threshold:
            raise SecAggError(
                f"node {owner}, stage {UNMASK}: only {len(shares)} shares of its {what} arrived, "
                f"fewer than the threshold {self.threshold}; too many hospitals dropped out"
            )
        try:
            return shamir_combine(shares, self.threshold)
        except SecAggError:
            raise SecAggError(
                f"node {owner}, stage {UNMASK}: its {what} could not be reconstructed from the "
                f"revealed shares"
            ) from None

    def _result(self, total: np.ndarray) -> SecAggResult:
        if self.encoding == INTEGER:
            # A sum left masked is uniform over 64 bits: a value past what a real sum reaches
            # (`WRAP_LIMIT`) means a mask stayed on.
            signed = total.view(np.int64)
            if signed.size and int(np.abs(signed).max()) >= WRAP_LIMIT:
                raise self._mask_left_on()
            return self._finish(np.empty(0), 0, integer_sum=total.copy())
        total_weight = int(total[-1])
        quantized_sum = total[:-1]
        levels = 2**self.bits - 1
        if total_weight > len(self._contributors) * self.max_weight or (
            quantized_sum.size and int(quantized_sum.max()) > total_weight * levels
        ):
            raise self._mask_left_on()
        if total_weight == 0:
            raise SecAggError(
                f"secure aggregation, stage {UNMASK}: the hospitals' example counts sum to 0; "
                f"there is nothing to average"
            )
        weighted_sum = dequantize_sum(quantized_sum, total_weight, self.clip, self.bits)
        return self._finish(weighted_sum, total_weight)

    def _mask_left_on(self) -> SecAggError:
        return SecAggError(
            f"secure aggregation, stage {UNMASK}: the unmasked sum is out of range, so a "
            f"mask was not removed (inconsistent shares or a malformed masked update); "
            f"round {self.server_round} cannot be aggregated"
        )

    def _finish(
        self, weighted_sum: np.ndarray, total_weight: int, integer_sum: np.ndarray | None = None
    ) -> SecAggResult:
        included = tuple(sorted(self._contributors))
        dropped = tuple(node for node in self.node_ids if node not in self._contributors)
        self.stage = "done"
        logger.info(
            "secagg round %d: unmasked the %s sum of %d hospitals (total weight %d); dropped: %s",
            self.server_round,
            self.encoding,
            len(included),
            total_weight,
            list(dropped),
        )
        return SecAggResult(weighted_sum, total_weight, included, dropped, integer_sum)
