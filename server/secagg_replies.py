"""What the coordinator accepts of each hospital's SecAgg+ reply: one reader per stage.

Each reader checks one reply's payload (fields, types, sizes, the nodes it names) and returns
what the session keeps of it, or raises `SecAggError` naming the node and the stage. The session
(`server/secagg.py`) leaves a reply that fails out of the round, like a hospital that dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedward.common.errors import SecAggError
from fedward.common.secagg import (
    ADVERTISE_KEYS,
    MASKED_UPDATE,
    SEED_BYTES,
    SHARE_BYTES,
    SHARE_KEYS,
    UNMASK,
    read_field,
    read_node_keyed,
)


def read_keys(node: int, payload: Mapping[str, Any]) -> tuple[bytes, bytes, bytes, bytes]:
    """The node's share, mask and signing public keys and its signature on them."""
    stage = ADVERTISE_KEYS
    share_key = read_field(payload, "share_public_key", bytes, node, stage)
    mask_key = read_field(payload, "mask_public_key", bytes, node, stage)
    signing_key = read_field(payload, "signing_public_key", bytes, node, stage)
    signature = read_field(payload, "key_signature", bytes, node, stage)
    if len(share_key) != SEED_BYTES or len(mask_key) != SEED_BYTES:
        raise SecAggError(f"node {node}, stage {stage}: public keys must be 32 bytes")
    return share_key, mask_key, signing_key, signature


def read_shares(node: int, payload: Mapping[str, Any], expected: set[int]) -> dict[int, bytes]:
    """The node's encrypted shares by destination: exactly `expected`, its neighbours that
    advertised keys."""
    stage = SHARE_KEYS
    sent = read_node_keyed(payload, "destinations", "ciphertexts", node, stage)
    if set(sent) != expected:
        wrong = sorted(set(sent) ^ expected)
        raise SecAggError(
            f"node {node}, stage {stage}: shares must go to exactly its neighbours that "
            f"advertised keys; nodes {wrong} are missing or not its neighbours"
        )
    return sent


def read_masked_update(
    node: int, payload: Mapping[str, Any], modulus_bits: int, vector_length: int
) -> np.ndarray:
    """The node's masked vector (`vector_length` values and the count slot), packed at
    `modulus_bits` bits per value, checked for its type and exact length."""
    stage = MASKED_UPDATE
    if "masked_update" not in payload:
        raise SecAggError(f"node {node}, stage {stage}: payload has no 'masked_update'")
    packed = payload["masked_update"]
    if not isinstance(packed, np.ndarray) or packed.ndim != 1 or packed.dtype != np.uint8:
        raise SecAggError(
            f"node {node}, stage {stage}: masked_update must be a 1-D uint8 array (the "
            f"masked values packed at {modulus_bits} bits each)"
        )
    expected = (modulus_bits * (vector_length + 1) + 7) // 8
    if packed.size != expected:
        raise SecAggError(
            f"node {node}, stage {stage}: masked_update has {packed.size} bytes, not the "
            f"{expected} that {vector_length + 1} values (adapter size + 1 count slot) "
            f"of {modulus_bits} bits take; rejected"
        )
    return packed


def read_revealed(
    node: int, payload: Mapping[str, Any], survivors: list[int], dropped: list[int]
) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """The shares the node revealed: seed shares by owner (itself and its `survivors`
    neighbours), key shares by owner (its `dropped` neighbours), exactly those asked."""
    stage = UNMASK
    seeds = read_node_keyed(payload, "seed_share_owners", "seed_shares", node, stage)
    keys = read_node_keyed(payload, "key_share_owners", "key_shares", node, stage)
    if set(seeds) != {node, *survivors} or set(keys) != set(dropped):
        raise SecAggError(
            f"node {node}, stage {stage}: revealed shares for other nodes than asked "
            f"(seed shares for itself and its surviving neighbours, key shares for its "
            f"dropped neighbours); rejected"
        )
    for owner, share in [*seeds.items(), *keys.items()]:
        if len(share) != SHARE_BYTES:
            raise SecAggError(
                f"node {node}, stage {stage}: the share it revealed for node {owner} has "
                f"{len(share)} bytes, expected {SHARE_BYTES}"
            )
    return seeds, keys
