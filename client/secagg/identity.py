"""A hospital's long-term secure-aggregation identity: its Ed25519 signing key (written and
read as files), the roster of peers it accepts, and its minimum cohort."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedward.common.errors import ConfigError, PolicyError
from fedward.common.files.atomic import write_bytes_atomic

logger = logging.getLogger(__name__)


#: Bytes of a raw Ed25519 public key (RFC 8032).
ED25519_KEY_BYTES = 32


def raw_public(private_key: X25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def raw_private(private_key: X25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def raw_signing_public(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def raw_signing_private(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def parse_signing_public_key(text: str, where: str) -> bytes:
    """A roster entry: 64 hex characters (optionally prefixed 'ed25519:'), as raw key bytes.

    Args:
        text: The entry as written; surrounding whitespace and case are ignored.
        where: Where it was read (e.g. "site policy secagg_roster['hospital-a']"), for the
            message.

    Returns:
        The 32 raw bytes of the public key (not checked to be a valid Ed25519 point).

    Raises:
        PolicyError: the text is not hex, or not 32 bytes of it.
    """
    cleaned = str(text).strip().lower().removeprefix("ed25519:")
    try:
        raw = bytes.fromhex(cleaned)
    except ValueError:
        raw = b""
    if len(raw) != ED25519_KEY_BYTES:
        raise PolicyError(
            f"{where}: not an Ed25519 public key (64 hex characters, as `fedward client "
            "signing-key` printed when the hospital's signing key was made)"
        )
    return raw


def write_signing_key(path: str | Path, replace: bool = False) -> str:
    """Make a hospital's long-term SecAgg signing key (PEM, mode 0600); return its public hex.

    The hospital keeps the file; the hex goes to the other hospitals, which pin it in their
    site policy's `secagg_roster`. An existing key is never replaced by accident: the other
    hospitals' rosters pin its public key, and a new one would be refused by all of them.

    Args:
        path: Where to write the private key (PKCS#8 PEM, unencrypted); its folder must
            exist.
        replace: Replace a key already at `path` (a rotation: every roster must then pin the
            new public key).

    Returns:
        The public key as 64 lowercase hex characters (no 'ed25519:' prefix).

    Raises:
        ConfigError: a file is already at `path` and `replace` is not set.
    """
    if Path(path).exists() and not replace:
        raise ConfigError(
            f"{path}: a signing key is already there, and the other hospitals' rosters pin its "
            "public key; `fedward client signing-key` prints it. Replacing it is a rotation "
            "(every roster must pin the new key): ask for it with --replace"
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_bytes_atomic(path, pem, mode=0o600)
    return raw_signing_public(key).hex()


def signing_public_key(path: str | Path) -> str:
    """The public half of the signing key at `path`, as `write_signing_key` printed it.

    Args:
        path: A private key written by `write_signing_key` (PKCS#8 PEM).

    Returns:
        The public key as 64 lowercase hex characters (no 'ed25519:' prefix).

    Raises:
        ConfigError: the file cannot be read or holds no Ed25519 private key.
    """
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable signing key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key (fedward client signing-key)")
    return raw_signing_public(key).hex()


@dataclass(frozen=True)
class SecAggIdentity:
    """Who this hospital is in secure aggregation, and which hospitals it trusts.

    Attributes:
        signing_key: the hospital's long-term Ed25519 key; signs its round keys and the
            survivor set it was told.
        roster: public signing key (raw 32 bytes) -> hospital name, accepted out of band; keys
            signed by anyone else are refused.
        min_hospitals: fewest hospitals whose updates may be unmasked together with this
            one's (site policy `min_secure_aggregation_hospitals`, itself included): a round
            with a smaller neighbourhood is refused before training, and the masked update, the
            signature on the survivor set and every share are withheld while fewer than this
            many of the hospitals it masked with are still in the round.
        memory_dir: where what the hospital committed to in each round is kept, so resumed and
            replayed rounds are held to it (None: only within one session, as in simulation).
    """

    signing_key: Ed25519PrivateKey
    roster: Mapping[bytes, str]
    min_hospitals: int = 3
    memory_dir: Path | None = field(default=None)

    def __repr__(self) -> str:
        return (
            f"SecAggIdentity(public_key={self.public_key.hex()[:16]}..., "
            f"roster={len(self.roster)} hospitals, min_hospitals={self.min_hospitals})"
        )

    @property
    def public_key(self) -> bytes:
        """This hospital's public signing key (raw 32 bytes)."""
        return raw_signing_public(self.signing_key)

    @classmethod
    def from_policy(cls, policy: Any, name: str, memory_dir: Path | None) -> SecAggIdentity:
        """The identity a site policy pins: `secagg_signing_key`, `secagg_roster`, and
        `min_secure_aggregation_hospitals`. Raises `PolicyError` naming the field (never the
        path: the reason travels to the coordinator; the path goes to this hospital's log)."""
        if not policy.secagg_signing_key or not policy.secagg_roster:
            raise PolicyError(
                f"hospital {name}: secure aggregation needs secagg_signing_key and secagg_roster "
                "in the site policy (the hospitals whose keys it accepts); refused"
            )
        try:
            pem = Path(policy.secagg_signing_key).expanduser().read_bytes()
            key = serialization.load_pem_private_key(pem, password=None)
        except (OSError, ValueError, TypeError) as exc:
            logger.error("%s: secagg_signing_key %s: %s", name, policy.secagg_signing_key, exc)
            key = None
        if not isinstance(key, Ed25519PrivateKey):
            raise PolicyError(
                f"hospital {name}: the site policy's secagg_signing_key is not a readable "
                "Ed25519 private key (details in the hospital's log); refused"
            )
        roster = {
            parse_signing_public_key(text, f"site policy secagg_roster['{member}']"): member
            for member, text in policy.secagg_roster.items()
        }
        return cls(key, roster, policy.min_secure_aggregation_hospitals, memory_dir)

    @classmethod
    def simulated(cls, hospital: int, hospitals: int, min_hospitals: int = 2) -> SecAggIdentity:
        """A simulated hospital's identity: keys derived from its index, the roster of all.

        Simulation only (the keys are predictable). Simulations may run 2 hospitals, so the
        minimum cohort is the protocol's 2 unless given.
        """

        def key_of(index: int) -> Ed25519PrivateKey:
            seed = hashlib.sha256(f"fedward-simulated-hospital|{index}".encode()).digest()
            return Ed25519PrivateKey.from_private_bytes(seed)

        roster = {raw_signing_public(key_of(i)): f"hospital-{i}" for i in range(hospitals)}
        return cls(key_of(hospital), roster, min_hospitals)
