"""Checks of one SecAgg+ round's requests that depend only on what they are given: the round's
public parameters (stage 1), the neighbours' signed keys (stage 2), this hospital's update
(stage 3) and the survivors' signatures (stage 5). The session (client/secagg/session.py) holds
the round's state and calls them; each failed check is a `SecAggError` naming the node and the
stage (`refusal`), or for a cohort below the site's minimum the closed reason
`secagg.cohort_too_small` (`too_few`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedward.client.secagg.identity import SecAggIdentity
from fedward.common.errors import SecAggError
from fedward.common.protocol.reasons import Reason
from fedward.common.secagg import (
    SHARE_BYTES,
    SHARE_KEYS,
    UNMASK,
    agree_key,
    binding,
    check_modulus,
    check_node_ids,
    check_threshold,
    decrypt_share,
    key_statement,
    majority,
    pair_context,
    read_field,
    read_list,
    read_node_keyed,
    round_seed,
    secagg_graph,
    survivor_statement,
    verify_signature,
)
from fedward.common.secagg.distributed_noise import INTEGER
from fedward.common.secagg.quantize import MAX_MODULUS_BITS


def refusal(node_id: int, stage: str, what: str) -> SecAggError:
    """A refusal of node `node_id` at `stage`: `what` was wrong."""
    return SecAggError(f"node {node_id}, stage {stage}: {what}")


def too_few(node_id: int, stage: str, members: int, minimum: int, what: str) -> SecAggError:
    """The refusal for a cohort of `members` below the site policy's `minimum`. The message (for
    the hospital's log, where the client app writes it) tells the whole story; only the code,
    the count and the policy's minimum travel: numbers of the protocol and the policy, never of
    the data."""
    reason = Reason(
        "secagg.cohort_too_small",
        {"hospitals": members, "min_secure_aggregation_hospitals": minimum},
    )
    return SecAggError(f"node {node_id}, stage {stage}: {what}", reason=reason)


def read_round_params(
    request: Mapping[str, Any], encoding: str, node_id: int, stage: str
) -> dict[str, Any]:
    """The round's public parameters as the request states them, typed; an encoding other
    than this hospital's own `encoding` (from its admitted run spec) is refused."""
    params = {
        "node_ids": read_list(request, "node_ids", int, node_id, stage),
        "neighbours": read_field(request, "neighbours", int, node_id, stage),
        "threshold": read_field(request, "threshold", int, node_id, stage),
        "clip": float(read_field(request, "clip", float, node_id, stage)),
        "bits": read_field(request, "bits", int, node_id, stage),
        "max_weight": read_field(request, "max_weight", int, node_id, stage),
        "modulus_bits": read_field(request, "modulus_bits", int, node_id, stage),
        "vector_length": read_field(request, "vector_length", int, node_id, stage),
        "encoding": read_field(request, "encoding", str, node_id, stage),
    }
    if params["encoding"] != encoding:
        raise refusal(
            node_id,
            stage,
            f"the coordinator asks for the {params['encoding']!r} encoding, but this "
            f"hospital's run spec makes it send {encoding!r} vectors; refused",
        )
    return params


def check_round_params(
    params: dict[str, Any],
    run_id: str,
    server_round: int,
    node_id: int,
    min_hospitals: int,
    stage: str,
) -> list[int]:
    """Node `node_id`'s neighbours in the round's graph, once the parameters are safe for it: a
    cohort of at least its site's `min_hospitals`, a majority threshold, the modulus the weights
    and bits need, a non-empty vector. `params["node_ids"]` becomes the checked, sorted list."""
    threshold, bits = params["threshold"], params["bits"]
    max_weight, modulus_bits = params["max_weight"], params["modulus_bits"]
    try:
        nodes = check_node_ids(params["node_ids"])
        graph = secagg_graph(nodes, params["neighbours"], round_seed(run_id, server_round))
        if node_id not in graph:
            raise SecAggError("this hospital is not among the round's node_ids")
        neighbours = graph[node_id]
        check_threshold(threshold, len(neighbours) + 1)
        expected_bits = (
            MAX_MODULUS_BITS
            if params["encoding"] == INTEGER
            else check_modulus(len(nodes), max_weight, params["clip"], bits)
        )
    except SecAggError as exc:
        raise refusal(node_id, stage, str(exc)) from None
    params["node_ids"] = nodes
    if len(neighbours) + 1 < min_hospitals:
        raise too_few(
            node_id,
            stage,
            len(neighbours) + 1,
            min_hospitals,
            f"the round has {len(nodes)} hospitals and this hospital masks with "
            f"{len(neighbours)} neighbours, fewer than this site's "
            f"min_secure_aggregation_hospitals ({min_hospitals}) with itself; "
            "refused before training",
        )
    if threshold < majority(len(neighbours) + 1):
        raise refusal(
            node_id,
            stage,
            f"threshold {threshold} is not a majority of the {len(neighbours) + 1} "
            "hospitals that hold this hospital's shares; with a minority threshold the "
            "coordinator could rebuild both of its secrets from two groups; refused",
        )
    if modulus_bits != expected_bits:
        raise refusal(
            node_id,
            stage,
            f"modulus_bits {modulus_bits} does not match the {expected_bits} bits that "
            f"{len(nodes)} hospitals, max weight {max_weight} and {bits} bits need",
        )
    if params["vector_length"] < 1:
        raise refusal(node_id, stage, f"vector_length must be >= 1, got {params['vector_length']}")
    return neighbours


def check_update(
    update: np.ndarray,
    weight: int,
    params: dict[str, Any],
    encoding: str,
    node_id: int,
    stage: str,
) -> tuple[np.ndarray, int]:
    """The update as a 1-D finite vector of the round's length (integers, with the count
    coordinate, under the integer encoding) and its weight as an int within max_weight."""
    vector_length = params["vector_length"]
    values = np.asarray(update)
    if encoding == INTEGER:
        vector_length += 1  # the count coordinate travels inside the vector
        if not np.issubdtype(values.dtype, np.integer):
            raise refusal(node_id, stage, f"update has dtype {values.dtype}, expected int64")
    if values.ndim != 1 or values.shape[0] != vector_length:
        raise refusal(
            node_id, stage, f"update has shape {values.shape}, expected ({vector_length},)"
        )
    if not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(values.dtype, np.integer):
        raise refusal(node_id, stage, f"update has dtype {values.dtype}, expected floats")
    if not np.all(np.isfinite(values)):
        raise refusal(node_id, stage, "update has NaN or infinite values; check local training")
    max_weight = params["max_weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)):
        raise refusal(
            node_id, stage, f"weight must be an int example count, got {type(weight).__name__}"
        )
    if not 0 <= int(weight) <= max_weight:
        raise refusal(
            node_id,
            stage,
            f"weight (example count) {int(weight)} is outside 0..{max_weight}; raise "
            f"secagg_max_weight",
        )
    return values, int(weight)


def verify_neighbour_keys(
    request: Mapping[str, Any],
    share_keys: dict[int, bytes],
    mask_keys: dict[int, bytes],
    identity: SecAggIdentity,
    bound_to: tuple[str, int, bytes],
    node_id: int,
) -> dict[int, bytes]:
    """Every neighbour's keys signed by a distinct hospital on the roster, or refuse; the
    neighbours' signing keys. `bound_to`: the run, round and digest of the round's parameters
    that every signature is bound to."""
    stage = SHARE_KEYS
    run_id, server_round, digest = bound_to
    signing = read_node_keyed(request, "neighbour_ids", "signing_public_keys", node_id, stage)
    signatures = read_node_keyed(request, "neighbour_ids", "key_signatures", node_id, stage)
    seen = {identity.public_key}
    for neighbour in sorted(share_keys):
        public = signing[neighbour]
        if public not in identity.roster:
            raise refusal(
                node_id,
                stage,
                f"node {neighbour}'s keys are signed by a key that is not on this site's "
                "secagg_roster; refusing the round (no share is revealed)",
            )
        if public in seen:
            raise refusal(
                node_id,
                stage,
                f"node {neighbour} claims the signing key of {identity.roster[public]}, "
                "which another node of the round already has; refusing the round",
            )
        seen.add(public)
        statement = key_statement(
            run_id,
            server_round,
            neighbour,
            digest,
            share_keys[neighbour],
            mask_keys[neighbour],
        )
        if not verify_signature(public, signatures[neighbour], statement):
            raise refusal(
                node_id,
                stage,
                f"node {neighbour}'s keys do not carry a valid signature of "
                f"{identity.roster[public]} for this run, round, node and round "
                "parameters (substituted keys, or a different round shown to it); refusing "
                "the round (no share is revealed)",
            )
    return dict(signing)


def verify_survivor_signatures(
    request: Mapping[str, Any],
    survivors: list[int],
    quorum: int,
    identity: SecAggIdentity,
    peer_signing_keys: dict[int, bytes],
    bound_to: tuple[str, int, bytes],
    node_id: int,
) -> None:
    """At least `quorum` distinct roster hospitals signed the `survivors` this hospital signed:
    each a survivor, with the signing key this hospital checked for it. `bound_to`: the run,
    round and digest of the round's parameters that every signature is bound to."""
    stage = UNMASK
    run_id, server_round, digest = bound_to
    signer_keys = read_node_keyed(request, "signer_ids", "signer_keys", node_id, stage)
    signatures = read_node_keyed(request, "signer_ids", "signatures", node_id, stage)
    seen: set[bytes] = set()
    for signer in sorted(signer_keys):
        public = signer_keys[signer]
        known = identity.public_key if signer == node_id else peer_signing_keys.get(signer, public)
        statement = survivor_statement(run_id, server_round, signer, digest, survivors)
        if (
            signer not in survivors
            or public != known
            or public not in identity.roster
            or public in seen
            or not verify_signature(public, signatures[signer], statement)
        ):
            raise refusal(
                node_id,
                stage,
                f"the signature of node {signer} on the survivor set is not valid (not a "
                "survivor, not on the roster, a repeated hospital, or signed for another "
                "set): the hospitals were not told the same survivors; refusing to reveal",
            )
        seen.add(public)
    if len(seen) < quorum:
        raise refusal(
            node_id,
            stage,
            f"only {len(seen)} hospitals signed the survivor set, fewer than the {quorum} "
            "needed; refusing to reveal",
        )


def check_share_senders(
    received: Mapping[int, bytes],
    neighbours: Collection[int],
    threshold: int,
    min_hospitals: int,
    node_id: int,
    stage: str,
) -> None:
    """Shares only from the `neighbours` it shared with, from enough of them for the `threshold`
    and for this site's minimum cohort (`min_hospitals`)."""
    strangers = sorted(set(received) - set(neighbours))
    if strangers:
        raise refusal(
            node_id,
            stage,
            f"shares from nodes {strangers}, which are not neighbours it shared with",
        )
    if len(received) + 1 < threshold:
        raise refusal(
            node_id,
            stage,
            f"only {len(received)} neighbours sent shares, fewer than the threshold "
            f"{threshold} minus this hospital",
        )
    if len(received) + 1 < min_hospitals:
        raise too_few(
            node_id,
            stage,
            len(received) + 1,
            min_hospitals,
            f"only {len(received)} neighbours sent shares, so this hospital's update would "
            f"be masked among {len(received) + 1} hospitals, fewer than this site's "
            f"min_secure_aggregation_hospitals ({min_hospitals}); the masked "
            "update is not sent",
        )


def check_minimum_cohort(
    survivors: set[int], masked_with: Collection[int], min_hospitals: int, node_id: int, stage: str
) -> None:
    """Sign and reveal only for a survivor set of at least the site's minimum cohort
    (`min_hospitals`); `masked_with`: the neighbours whose shares this hospital holds.

    Counted are this hospital and the survivors it masked its update with (neighbours whose
    roster-signed keys it checked and whose shares it holds): those are the hospitals whose
    updates any unmasking of its own must add in. A survivor it never shared masks with (a
    node said to have dropped earlier, or padded in by the coordinator) does not count:
    with it, a round of three could still unmask two updates, one hospital's to the other.
    """
    members = len(survivors & set(masked_with)) + 1
    if members < min_hospitals:
        raise too_few(
            node_id,
            stage,
            members,
            min_hospitals,
            f"the survivor set holds {members} hospitals that this hospital masked its "
            f"update with (itself included), fewer than this site's "
            f"min_secure_aggregation_hospitals ({min_hospitals}); refusing to "
            "sign it or reveal any share (the coordinator would learn the sum of too few "
            "updates)",
        )


def check_enough_neighbours(
    survivors: set[int], masked_with: Collection[int], threshold: int, node_id: int, stage: str
) -> None:
    """Enough of the neighbours this hospital masked with survived for the threshold."""
    alive = survivors & set(masked_with)
    if len(alive) + 1 < threshold:
        raise refusal(
            node_id,
            stage,
            f"only {len(alive)} neighbours survived, fewer than the threshold "
            f"{threshold} minus this hospital; refusing to unmask",
        )


def check_reveal(
    revealed: Mapping[str, str],
    survivors: list[int],
    dropped: list[int],
    signing_keys: Mapping[int, bytes],
    node_id: int,
    stage: str,
) -> dict[str, str]:
    """What this hospital will have revealed after this unmask: for each neighbour (by its
    signing key, hex) "seed" if it survived, "key" if it dropped, on top of `revealed`, what
    earlier sessions of the round revealed. `SecAggError` when a neighbour would get the other
    share than before: both shares of one neighbour unmask its update."""
    after = dict(revealed)
    for node, kind in [(n, "seed") for n in survivors] + [(n, "key") for n in dropped]:
        peer = signing_keys[node].hex()
        if after.get(peer, kind) != kind:
            raise refusal(
                node_id,
                stage,
                f"this hospital already revealed the other share of node {node}'s hospital "
                "in this round; revealing both would unmask it; refused",
            )
        after[peer] = kind
    return after


def check_survivors(
    survivors: list[int], node_ids: list[int], quorum: int, node_id: int, stage: str
) -> None:
    """A survivor set that can be true: no node twice, this hospital in it (its masked update
    was sent), only nodes of the round (`node_ids`), and at least `quorum` of them."""
    if len(set(survivors)) != len(survivors):
        raise refusal(node_id, stage, "'survivors' lists a node twice")
    if node_id not in survivors:
        raise refusal(
            node_id, stage, "this hospital sent its masked update but is not among the survivors"
        )
    strangers = sorted(set(survivors) - set(node_ids))
    if strangers:
        raise refusal(node_id, stage, f"nodes {strangers} in 'survivors' are not in the round")
    if len(survivors) < quorum:
        raise refusal(
            node_id,
            stage,
            f"only {len(survivors)} survivors, fewer than the {quorum} this hospital needs "
            "to sign the set; refusing to unmask",
        )


def open_shares(
    received: Mapping[int, bytes],
    share_key: X25519PrivateKey,
    peer_share_keys: Mapping[int, bytes],
    round_of: tuple[str, int],
    node_id: int,
    stage: str,
) -> dict[int, tuple[bytes, bytes]]:
    """Each neighbour's shares for this hospital (of its self-mask seed and of its mask key),
    decrypted; one that does not authenticate for this run, round and receiver is refused.
    `round_of`: the run and the round."""
    run_id, server_round = round_of
    opened = {}
    for source, ciphertext in received.items():
        try:
            key = agree_key(
                share_key,
                peer_share_keys[source],
                pair_context(run_id, server_round, "share-key", node_id, source),
            )
        except ValueError:
            raise refusal(node_id, stage, f"node {source}'s share public key is invalid") from None
        try:
            plaintext = decrypt_share(
                key, ciphertext, binding(run_id, server_round, SHARE_KEYS, source, node_id)
            )
        except SecAggError:
            raise refusal(
                node_id,
                stage,
                f"the share from node {source} does not authenticate for this run, round "
                f"and receiver (replayed, misrouted or altered); rejected",
            ) from None
        if len(plaintext) != 2 * SHARE_BYTES:
            raise refusal(node_id, stage, f"the share from node {source} has the wrong size")
        opened[source] = (plaintext[:SHARE_BYTES], plaintext[SHARE_BYTES:])
    return opened
