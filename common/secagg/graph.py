"""The SecAgg+ neighbour graph of a round, and its thresholds (reconstruction, consistency)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from fedward.common.errors import SecAggError

#: Node ids are Flower node ids: unsigned 64-bit integers.
MAX_NODE_ID = 2**64 - 1


# --- the SecAgg+ graph and thresholds ----------------------------------------------------------


def round_seed(run_id: int | str, server_round: int) -> bytes:
    """Public seed of one round's neighbour graph; every party derives it from run id and round.

    Args:
        run_id: The Flower run id (formatted as text, so 7 and "7" give the same seed).
        server_round: The round number.

    Returns:
        The 32-byte SHA-256 of "fedward-secagg-graph|run=...|round=...".
    """
    return hashlib.sha256(
        f"fedward-secagg-graph|run={run_id}|round={server_round}".encode()
    ).digest()


def secagg_graph(
    node_ids: Sequence[int], neighbours: int, public_seed: bytes
) -> dict[int, tuple[int, ...]]:
    """Each node's neighbours (itself excluded) in the round's SecAgg+ graph.

    `neighbours == 0`, or at least `len(node_ids) - 1`, means all-to-all (SecAgg). Otherwise the
    graph is a Harary graph on a public random ring (Bell et al. 2020): the nodes are ordered by
    SHA-256(public_seed, node id) and each is joined to the `k / 2` nodes on either side, where
    `k` is `neighbours` rounded up to even. The graph is symmetric and every node has the same
    degree. The ordering uses only SHA-256, so all parties agree whatever their numpy version.

    Args:
        node_ids: The round's node ids (Flower node ids), in any order.
        neighbours: Neighbours per node (`secagg_neighbours`), >= 0; 0 means all-to-all.
        public_seed: The round's public seed (`round_seed`).

    Returns:
        Each node id mapped to its neighbours' ids, sorted: `neighbours` rounded up to even of
        them, or all the other nodes (all-to-all). Empty when `node_ids` is.

    Raises:
        SecAggError: a node id that is not an unsigned 64-bit int, a repeated node id, or
            `neighbours` below 0.
    """
    nodes = check_node_ids(node_ids)
    if neighbours < 0:
        raise SecAggError(f"secure aggregation: secagg_neighbours must be >= 0, got {neighbours}")
    count = len(nodes)
    degree = neighbours + (neighbours % 2)
    if neighbours == 0 or degree >= count - 1:
        return {node: tuple(other for other in nodes if other != node) for node in nodes}
    ring = sorted(
        nodes, key=lambda node: hashlib.sha256(public_seed + node.to_bytes(8, "big")).digest()
    )
    graph: dict[int, tuple[int, ...]] = {}
    for position, node in enumerate(ring):
        near = {ring[(position + offset) % count] for offset in range(1, degree // 2 + 1)}
        near |= {ring[(position - offset) % count] for offset in range(1, degree // 2 + 1)}
        graph[node] = tuple(sorted(near))
    return graph


def check_node_ids(node_ids: Sequence[int]) -> list[int]:
    """Sorted node ids, after checking they are distinct unsigned 64-bit ints.

    Args:
        node_ids: Node ids (Flower node ids), in any order.

    Returns:
        The ids in a new list, sorted.

    Raises:
        SecAggError: an id that is not an int in 0..`MAX_NODE_ID` (a bool is not one), or an id
            listed twice.
    """
    nodes = list(node_ids)
    for node in nodes:
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node <= MAX_NODE_ID:
            raise SecAggError(
                f"secure aggregation: node id {node!r} is not an unsigned 64-bit int "
                "(a Flower node id)"
            )
    if len(set(nodes)) != len(nodes):
        raise SecAggError("secure aggregation: the round's node ids contain duplicates")
    return sorted(nodes)


def threshold_from_fraction(fraction: float, neighbourhood_size: int) -> int:
    """Reconstruction threshold t for a neighbourhood (a node and its neighbours) of this size.

    t = ceil(fraction * size), at least 2 and at most the size; `secagg_threshold` is the
    fraction. A node's secrets are recovered while at least t of its neighbourhood survive.

    Args:
        fraction: `secagg_threshold`, in (0, 1].
        neighbourhood_size: How many hold a node's shares: the node and its neighbours, >= 2.

    Returns:
        The threshold t, in 2..neighbourhood_size (the product is rounded to 9 decimals before
        the ceiling, so a float error in it does not add one).

    Raises:
        SecAggError: `fraction` outside (0, 1] (NaN included), or a neighbourhood below 2.
    """
    if not 0 < fraction <= 1:
        raise SecAggError(f"secure aggregation: secagg_threshold must be in (0, 1], got {fraction}")
    if neighbourhood_size < 2:
        raise SecAggError(
            "secure aggregation needs at least 2 hospitals per round; sample more hospitals "
            "or turn secure_aggregation off"
        )
    wanted = math.ceil(round(fraction * neighbourhood_size, 9))
    return min(neighbourhood_size, max(2, wanted))


def check_threshold(threshold: int, neighbourhood_size: int) -> None:
    """Raise `SecAggError` unless 2 <= threshold <= neighbourhood_size.

    Args:
        threshold: The reconstruction threshold a round states.
        neighbourhood_size: How many hold a node's shares: the node and its neighbours.

    Raises:
        SecAggError: `threshold` is not an int (a bool is not one), or is outside
            2..neighbourhood_size.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise SecAggError(f"secure aggregation: threshold must be an int, got {threshold!r}")
    if not 2 <= threshold <= neighbourhood_size:
        raise SecAggError(
            f"secure aggregation: threshold {threshold} must be between 2 and the neighbourhood "
            f"size {neighbourhood_size}; raise secagg_neighbours or lower secagg_threshold"
        )


def majority(count: int) -> int:
    """Fewest members that are more than half of `count`.

    Args:
        count: The size of the group.

    Returns:
        count // 2 + 1.
    """
    return count // 2 + 1


def secure_threshold(fraction: float, neighbourhood_size: int) -> int:
    """`threshold_from_fraction`, raised to a majority of the neighbourhood when it is below.

    With a majority threshold, the hospitals that reveal a node's self-mask seed share and those
    that reveal its mask-key share must overlap; a hospital never reveals both for one node, so
    the coordinator cannot rebuild both secrets of one hospital however it splits the cohort.

    Args:
        fraction: `secagg_threshold`, in (0, 1].
        neighbourhood_size: How many hold a node's shares: the node and its neighbours, >= 2.

    Returns:
        max(threshold_from_fraction(...), majority(neighbourhood_size)), in
        2..neighbourhood_size.

    Raises:
        SecAggError: as `threshold_from_fraction`: `fraction` outside (0, 1], or a neighbourhood
            below 2.
    """
    return max(threshold_from_fraction(fraction, neighbourhood_size), majority(neighbourhood_size))


def consistency_quorum(threshold: int, cohort_size: int) -> int:
    """Valid signatures on one survivor set that a hospital needs before it reveals any share.

    At least the reconstruction threshold and a majority of the round's cohort: two different
    survivor sets cannot both reach a cohort majority unless some hospital signed both, which an
    honest hospital never does. It bounds disagreement, not the size of the sum: 2 of 3 reach it,
    so the hospitals check the survivor set against their own minimum cohort as well.

    Args:
        threshold: The round's reconstruction threshold.
        cohort_size: How many hospitals the round sampled (all its node ids, not the survivors).

    Returns:
        max(threshold, majority(cohort_size)).
    """
    return max(threshold, majority(cohort_size))


def mask_sign(node_id: int, other_id: int) -> int:
    """+1 if `node_id` adds the pairwise mask it shares with `other_id`, -1 if it subtracts it.

    Args:
        node_id: The node that masks its vector.
        other_id: The neighbour it shares the pairwise mask with.

    Returns:
        +1 when node_id < other_id, else -1: the two nodes of a pair get opposite signs, so
        their pairwise mask cancels in the sum.
    """
    return 1 if node_id < other_id else -1
