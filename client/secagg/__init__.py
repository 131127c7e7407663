"""A hospital's side of SecAgg+: its long-term identity (`identity`: signing key, roster, minimum
cohort) and one round's state machine (`session`: five stages, one method each)."""

from fedward.client.secagg.identity import (
    SecAggIdentity,
    parse_signing_public_key,
    signing_public_key,
    write_signing_key,
)
from fedward.client.secagg.session import SecAggClientSession

__all__ = [
    "SecAggClientSession",
    "SecAggIdentity",
    "parse_signing_public_key",
    "signing_public_key",
    "write_signing_key",
]
