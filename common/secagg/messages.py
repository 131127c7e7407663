"""The stages of a SecAgg+ round and the payload checks both sides apply to its messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedward.common.errors import SecAggError

# The five stages of a SecAgg+ round, in order. Every message names its stage.
ADVERTISE_KEYS = "advertise_keys"
SHARE_KEYS = "share_keys"
MASKED_UPDATE = "masked_update"
CONSISTENCY_CHECK = "consistency_check"
UNMASK = "unmask"
STAGES = (ADVERTISE_KEYS, SHARE_KEYS, MASKED_UPDATE, CONSISTENCY_CHECK, UNMASK)


# --- payload checks shared by both sides ---------------------------------------------------------


def header(run_id: int | str, server_round: int, stage: str, node_id: int) -> dict[str, Any]:
    """The fields every SecAgg payload starts with (node_id: sender of a reply, receiver of a
    request)."""
    return {"run_id": str(run_id), "round": server_round, "stage": stage, "node_id": node_id}


def check_header(
    payload: Mapping[str, Any], run_id: int | str, server_round: int, stage: str, node_id: int
) -> None:
    """Raise `SecAggError` unless `payload` belongs to this run, round, stage and node."""
    if not isinstance(payload, Mapping):
        raise SecAggError(f"node {node_id}, stage {stage}: payload is not a mapping")
    got = (
        payload.get("run_id"),
        payload.get("round"),
        payload.get("stage"),
        payload.get("node_id"),
    )
    want = (str(run_id), server_round, stage, node_id)
    if got != want:
        raise SecAggError(
            f"node {node_id}, stage {stage}: message is for run {got[0]!r}, round {got[1]!r}, "
            f"stage {got[2]!r}, node {got[3]!r}, but this is run {want[0]!r}, round {want[1]}, "
            f"stage {want[2]!r}, node {want[3]} (a replayed or misrouted message); it was rejected"
        )


def read_field(payload: Mapping[str, Any], key: str, kind: type, node_id: int, stage: str) -> Any:
    """`payload[key]`, checked to be a `kind` (int, float, str, bytes)."""
    if key not in payload:
        raise SecAggError(f"node {node_id}, stage {stage}: payload has no '{key}'")
    value = payload[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise SecAggError(
            f"node {node_id}, stage {stage}: '{key}' must be {kind.__name__}, "
            f"got {type(value).__name__}"
        )
    return value


def read_list(
    payload: Mapping[str, Any], key: str, kind: type, node_id: int, stage: str
) -> list[Any]:
    """`payload[key]` as a list whose items are all `kind` (int or bytes)."""
    if key not in payload:
        raise SecAggError(f"node {node_id}, stage {stage}: payload has no '{key}'")
    value = payload[key]
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise SecAggError(f"node {node_id}, stage {stage}: '{key}' must be a list")
    for item in value:
        if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
            raise SecAggError(
                f"node {node_id}, stage {stage}: '{key}' must hold {kind.__name__} values, "
                f"got {type(item).__name__}"
            )
    return list(value)


def read_node_keyed(
    payload: Mapping[str, Any], ids_key: str, values_key: str, node_id: int, stage: str
) -> dict[int, bytes]:
    """Two parallel lists (node ids, bytes) as a dict; rejects duplicates and length mismatches."""
    ids = read_list(payload, ids_key, int, node_id, stage)
    values = read_list(payload, values_key, bytes, node_id, stage)
    if len(ids) != len(values):
        raise SecAggError(
            f"node {node_id}, stage {stage}: '{ids_key}' has {len(ids)} entries but "
            f"'{values_key}' has {len(values)}"
        )
    if len(set(ids)) != len(ids):
        raise SecAggError(f"node {node_id}, stage {stage}: '{ids_key}' lists a node twice")
    return dict(zip(ids, values))
