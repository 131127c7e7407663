"""Key agreement (X25519, HKDF-SHA256), share encryption (ChaCha20-Poly1305) and the Ed25519
signatures that bind keys and survivor sets to a run, a round and a node."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedward.common.errors import SecAggError
from fedward.common.secagg.messages import ADVERTISE_KEYS, CONSISTENCY_CHECK
from fedward.common.secagg.shamir import SEED_BYTES

_NONCE_BYTES = 12  # ChaCha20-Poly1305


# --- key agreement, share encryption, binding --------------------------------------------------


def binding(
    run_id: int | str, server_round: int, stage: str, source: int, destination: int
) -> bytes:
    """What a message is bound to: run, round, stage, sender and receiver (AEAD associated data)."""
    return (
        f"fedward-secagg/v1|run={run_id}|round={server_round}|stage={stage}"
        f"|from={source}|to={destination}"
    ).encode()


def agree_key(private_key: X25519PrivateKey, peer_public_key: bytes, context: bytes) -> bytes:
    """32-byte key shared by two nodes: X25519 between them, then HKDF-SHA256 bound to `context`.

    Raises `ValueError` for a malformed or degenerate public key; callers name node and stage.
    """
    peer = X25519PublicKey.from_public_bytes(peer_public_key)
    shared = private_key.exchange(peer)
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=context).derive(
        shared
    )


def pair_context(run_id: int | str, server_round: int, purpose: str, a: int, b: int) -> bytes:
    """HKDF context for the key two nodes share: the same whichever of them derives it."""
    low, high = min(a, b), max(a, b)
    return binding(run_id, server_round, purpose, low, high)


def encrypt_share(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ChaCha20-Poly1305 under a fresh random nonce; returns nonce || ciphertext || tag."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def decrypt_share(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Inverse of `encrypt_share`; `SecAggError` if the ciphertext or its binding is wrong."""
    if len(ciphertext) < _NONCE_BYTES + 16:
        raise SecAggError("secure aggregation: encrypted share is too short")
    try:
        return ChaCha20Poly1305(key).decrypt(
            ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], associated_data
        )
    except InvalidTag:
        raise SecAggError(
            "secure aggregation: encrypted share does not authenticate (it was altered, or it "
            "belongs to another run, round, stage, sender or receiver)"
        ) from None


# --- signatures: authenticated keys and the consistency check ----------------------------------


def params_digest(params: Mapping[str, Any]) -> bytes:
    """SHA-256 of a round's public parameters (the advertise_keys request, less the header).

    Signed with the keys and with the survivor set, so a hospital only trusts peers that were
    shown the very same cohort, threshold and modulus: a coordinator that shows different
    hospitals different rounds is caught at the first signature.
    """
    canonical = "|".join(f"{key}={params[key]!r}" for key in sorted(params))
    return hashlib.sha256(f"fedward-secagg-params|{canonical}".encode()).digest()


def key_statement(
    run_id: int | str,
    server_round: int,
    node_id: int,
    digest: bytes,
    share_public_key: bytes,
    mask_public_key: bytes,
) -> bytes:
    """What a hospital signs when it advertises its two public keys."""
    return b"|".join(
        [
            binding(run_id, server_round, ADVERTISE_KEYS, node_id, node_id),
            digest,
            share_public_key,
            mask_public_key,
        ]
    )


def survivor_statement(
    run_id: int | str, server_round: int, node_id: int, digest: bytes, survivors: Sequence[int]
) -> bytes:
    """What a survivor signs in the consistency check: the survivor set it was told."""
    members = ",".join(str(node) for node in sorted(survivors))
    return b"|".join(
        [
            binding(run_id, server_round, CONSISTENCY_CHECK, node_id, node_id),
            digest,
            f"survivors={members}".encode(),
        ]
    )


def verify_signature(public_key: bytes, signature: bytes, statement: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `statement` by `public_key`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, statement)
    except (InvalidSignature, ValueError):
        return False
    return True
