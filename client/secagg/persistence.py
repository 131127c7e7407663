"""What one hospital's SecAgg+ round keeps: between messages, the whole session in the node's
own state (`session_to_bytes`, `state_from_bytes`, `restore_session`: Flower may serve
consecutive stages from different worker processes); between sessions of the round, on disk in
the hospital's ledger folder, what it committed to (`memory_path`, `load_memory`: who took part,
who survived, what it revealed), so that a resumed round cannot reveal anything twice.
Nothing of it is ever sent."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedward.client.secagg.identity import SecAggIdentity, raw_private, raw_signing_private
from fedward.common.errors import SecAggError
from fedward.common.files.atomic import write_bytes_atomic


def memory_path(identity: SecAggIdentity, run_id: str, server_round: int) -> Path | None:
    if identity.memory_dir is None:
        return None
    return identity.memory_dir / f"{run_id}.{server_round}.json"


def load_memory(path: Path | None, server_round: int) -> dict[str, Any]:
    """What this hospital committed to in the round in earlier sessions (empty: nothing yet).

    participants: public signing keys (hex) of the hospitals its masked update was sent among;
    survivors: those of itself and the neighbours in the survivor set it signed;
    revealed: neighbour key (hex) -> "seed" or "key", the share it revealed for that neighbour.
    """
    if path is None or not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise SecAggError(
            f"round {server_round}: this hospital's secure-aggregation record of the round "
            f"cannot be read ({type(exc).__name__}); refusing, so that nothing is revealed twice"
        ) from None


def save_memory(path: Path, memory: dict[str, Any]) -> None:
    """Write what the hospital committed to in the round (`load_memory`), atomically, readable
    by its own account only; `OSError` when it cannot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(memory, sort_keys=True).encode(), mode=0o600)


def session_to_bytes(session: Any) -> bytes:
    """A `SecAggClientSession`'s state (its secrets included) as bytes for the node state."""
    keys = {
        "share_key": None if session._share_key is None else raw_private(session._share_key),
        "mask_key": None if session._mask_key is None else raw_private(session._mask_key),
    }
    identity = session.identity
    state = {
        "signing_key": raw_signing_private(identity.signing_key),
        "roster": dict(identity.roster),
        "min_hospitals": identity.min_hospitals,
        "memory_dir": None if identity.memory_dir is None else str(identity.memory_dir),
        "digest": session._digest,
        "peer_signing_keys": session._peer_signing_keys,
        "survivors": session._survivors,
        "memory": session._memory,
        "node_id": session.node_id,
        "run_id": session.run_id,
        "server_round": session.server_round,
        "stage": session.stage,
        "params": session.params,
        "neighbours": session._neighbours,
        "self_seed": session._self_seed,
        "peer_share_keys": session._peer_share_keys,
        "peer_mask_keys": session._peer_mask_keys,
        "own_shares": session._own_shares,
        "received": session._received,
        "encoding": session.encoding,
        **keys,
    }
    return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)


def state_from_bytes(blob: bytes) -> tuple[SecAggIdentity, dict[str, Any]]:
    """The identity and the state saved by `session_to_bytes` (by this same node)."""
    state = pickle.loads(blob)
    memory_dir = state["memory_dir"]
    identity = SecAggIdentity(
        Ed25519PrivateKey.from_private_bytes(state["signing_key"]),
        state["roster"],
        state["min_hospitals"],
        None if memory_dir is None else Path(memory_dir),
    )
    return identity, state


def restore_session(session: Any, state: dict[str, Any]) -> None:
    """Put the saved `state` back into a session just built from its identity."""
    session._digest = state["digest"]
    session._peer_signing_keys = state["peer_signing_keys"]
    session._survivors = state["survivors"]
    session._memory = state["memory"]
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
