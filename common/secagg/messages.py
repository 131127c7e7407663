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
    """The fields every SecAgg payload starts with.

    Args:
        run_id: The Flower run id (sent as text).
        server_round: The round number.
        stage: The message's stage (one of `STAGES`).
        node_id: The hospital the message is from (a reply) or for (a request).

    Returns:
        {"run_id": str(run_id), "round": server_round, "stage": stage, "node_id": node_id}.
    """
    return {"run_id": str(run_id), "round": server_round, "stage": stage, "node_id": node_id}


def check_header(
    payload: Mapping[str, Any], run_id: int | str, server_round: int, stage: str, node_id: int
) -> None:
    """Raise `SecAggError` unless `payload` belongs to this run, round, stage and node.

    Args:
        payload: A received message.
        run_id: The run it must name (compared as text).
        server_round: The round it must name.
        stage: The stage it must name.
        node_id: The node it must name: the sender of a reply, the receiver of a request.

    Raises:
        SecAggError: `payload` is not a mapping, or its header names another run, round, stage
            or node (a replayed or misrouted message).
    """
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
    """`payload[key]`, checked to be a `kind` (int, float, str, bytes).

    Args:
        payload: A received message.
        key: The field to read.
        kind: Its type: int (a bool is not one), float (an int is one too), str or bytes.
        node_id: The node the message is from or for, named in the error.
        stage: The message's stage, named in the error.

    Returns:
        The value as it is (an int read as float stays an int).

    Raises:
        SecAggError: `payload` has no `key`, or its value is not a `kind`.
    """
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
    """`payload[key]` as a list whose items are all `kind` (int or bytes).

    Args:
        payload: A received message.
        key: The field to read.
        kind: The type of every item: int (a bool is not one) or bytes.
        node_id: The node the message is from or for, named in the error.
        stage: The message's stage, named in the error.

    Returns:
        The items in a new list.

    Raises:
        SecAggError: `payload` has no `key`, its value is not a list or tuple, or an item is
            not a `kind`.
    """
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
    """Two parallel lists (node ids, bytes) as a dict; rejects duplicates and length mismatches.

    Args:
        payload: A received message.
        ids_key: The field of node ids (ints).
        values_key: The field of bytes values, one per node id, in the same order.
        node_id: The node the message is from or for, named in the error.
        stage: The message's stage, named in the error.

    Returns:
        Each node id mapped to its value.

    Raises:
        SecAggError: a field is missing or mistyped (`read_list`), the two lists differ in
            length, or a node id is listed twice.
    """
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
