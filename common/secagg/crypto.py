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
    """What a message is bound to: run, round, stage, sender and receiver (AEAD associated data).

    Args:
        run_id: The Flower run id (formatted as text, so 7 and "7" bind alike).
        server_round: The round number.
        stage: The message's stage (`messages.STAGES`), or a key's purpose (`pair_context`).
        source: Node id of the sender (of the signer, in a signed statement).
        destination: Node id of the receiver (the signer again, in a signed statement).

    Returns:
        "fedward-secagg/v1|run=...|round=...|stage=...|from=...|to=...", UTF-8 encoded.
    """
    return (
        f"fedward-secagg/v1|run={run_id}|round={server_round}|stage={stage}"
        f"|from={source}|to={destination}"
    ).encode()


def agree_key(private_key: X25519PrivateKey, peer_public_key: bytes, context: bytes) -> bytes:
    """32-byte key shared by two nodes: X25519 between them, then HKDF-SHA256 bound to `context`.

    Args:
        private_key: One node's X25519 private key: a hospital's share or mask key, or the mask
            key of a dropped hospital that the coordinator rebuilt from shares.
        peer_public_key: The other node's raw X25519 public key (32 bytes).
        context: The HKDF info, which both nodes derive alike (`pair_context`).

    Returns:
        `SEED_BYTES` (32) bytes: a ChaCha20-Poly1305 key for shares, or a pairwise mask seed.

    Raises:
        ValueError: a malformed or degenerate public key (not `SecAggError`: callers catch it
            and name the node and stage).
    """
    peer = X25519PublicKey.from_public_bytes(peer_public_key)
    shared = private_key.exchange(peer)
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=context).derive(
        shared
    )


def pair_context(run_id: int | str, server_round: int, purpose: str, a: int, b: int) -> bytes:
    """HKDF context for the key two nodes share: the same whichever of them derives it.

    Args:
        run_id: The Flower run id.
        server_round: The round number.
        purpose: What the key is for: "share-key" (share encryption) or "pairwise-mask".
        a: One node's id.
        b: The other node's id; `a` and `b` may come in either order.

    Returns:
        `binding(run_id, server_round, purpose, min(a, b), max(a, b))`.
    """
    low, high = min(a, b), max(a, b)
    return binding(run_id, server_round, purpose, low, high)


def encrypt_share(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption under a fresh random 12-byte nonce.

    Args:
        key: The 32-byte key the sender and receiver agreed (`agree_key`).
        plaintext: What the receiver may read (a hospital's two Shamir shares for it).
        associated_data: What the ciphertext is bound to (`binding` of run, round, stage,
            sender and receiver): authenticated, not encrypted, not included in the output.

    Returns:
        nonce || ciphertext || tag: len(plaintext) + 28 bytes.
    """
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def decrypt_share(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Inverse of `encrypt_share`; `SecAggError` if the ciphertext or its binding is wrong.

    Args:
        key: The 32-byte key the two nodes agreed (`agree_key`).
        ciphertext: nonce || ciphertext || tag, as `encrypt_share` returns it.
        associated_data: The binding the receiver expects; it must equal the sender's.

    Returns:
        The plaintext.

    Raises:
        SecAggError: the ciphertext is shorter than a nonce and a tag (28 bytes), or it does
            not authenticate (altered, another key, or another run, round, stage, sender or
            receiver).
    """
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

    Args:
        params: The round's public parameters by name (as `read_round_params` reads them, the
            node ids sorted). Keys are taken in sorted order and values as their `repr`, so
            equal parameters give equal digests only when their types match too.

    Returns:
        The 32-byte SHA-256 digest.
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
    """What a hospital signs when it advertises its two public keys.

    Args:
        run_id: The Flower run id.
        server_round: The round number.
        node_id: The advertising hospital (bound as both sender and receiver).
        digest: `params_digest` of the round's public parameters.
        share_public_key: Its raw X25519 public key for share encryption.
        mask_public_key: Its raw X25519 public key for the pairwise masks.

    Returns:
        The `ADVERTISE_KEYS` binding of `node_id`, the digest and the two keys, joined by b"|".
    """
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
    """What a survivor signs in the consistency check: the survivor set it was told.

    Args:
        run_id: The Flower run id.
        server_round: The round number.
        node_id: The signing survivor (bound as both sender and receiver).
        digest: `params_digest` of the round's public parameters.
        survivors: The survivor set's node ids, in any order (sorted here).

    Returns:
        The `CONSISTENCY_CHECK` binding of `node_id`, the digest and
        "survivors=<sorted ids, comma-separated>", joined by b"|".
    """
    members = ",".join(str(node) for node in sorted(survivors))
    return b"|".join(
        [
            binding(run_id, server_round, CONSISTENCY_CHECK, node_id, node_id),
            digest,
            f"survivors={members}".encode(),
        ]
    )


def verify_signature(public_key: bytes, signature: bytes, statement: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `statement` by `public_key`.

    Args:
        public_key: The signer's raw Ed25519 public key (32 bytes), from the roster.
        signature: The signature to check.
        statement: The signed bytes (`key_statement` or `survivor_statement`).

    Returns:
        True for a valid signature; False for an invalid one or a malformed public key.
    """
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, statement)
    except (InvalidSignature, ValueError):
        return False
    return True
