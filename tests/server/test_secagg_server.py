"""The coordinator's SecAgg+ session: routing, survivors, and what it refuses."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedward.client.secagg import SecAggClientSession, SecAggIdentity
from fedward.common.errors import SecAggError
from fedward.common.secagg import (
    ADVERTISE_KEYS,
    CONSISTENCY_CHECK,
    MASKED_UPDATE,
    SHARE_KEYS,
    UNMASK,
    pack_bits,
    quantization_bound,
)
from fedward.server.secagg import SecAggServerSession

IDS = [11, 22, 33, 44, 55]
LENGTH = 40


def start(ids=IDS, **options):
    server = SecAggServerSession("run-9", 2, ids, LENGTH, **options)
    clients = {
        node: SecAggClientSession(node, "run-9", 2, SecAggIdentity.simulated(index, len(ids)))
        for index, node in enumerate(ids)
    }
    return server, clients


def answer(clients, stage, requests, drop=()):
    replies = {}
    for node, request in requests.items():
        if node in drop:
            continue
        if stage == MASKED_UPDATE:
            update = np.linspace(-0.5, 0.5, LENGTH) * (node / 55)
            replies[node] = clients[node].masked_update(request, update, weight=node)
        else:
            replies[node] = getattr(clients[node], stage)(request)
    return replies


def up_to(stage, ids=IDS, **options):
    """Run the round until the replies to `stage` are in; return server, clients, replies."""
    server, clients = start(ids, **options)
    requests = server.advertise_keys_requests()
    steps = [
        (ADVERTISE_KEYS, server.share_keys_requests),
        (SHARE_KEYS, server.masked_update_requests),
        (MASKED_UPDATE, server.consistency_requests),
        (CONSISTENCY_CHECK, server.unmask_requests),
        (UNMASK, None),
    ]
    for name, next_requests in steps:
        replies = answer(clients, name, requests)
        if name == stage:
            return server, clients, replies
        requests = next_requests(replies)
    raise AssertionError(stage)


def test_a_full_round_returns_the_weighted_sum_and_weights():
    server, _, replies = up_to(UNMASK)
    result = server.aggregate(replies)
    updates = {node: np.linspace(-0.5, 0.5, LENGTH) * (node / 55) for node in IDS}
    expected = sum(node * updates[node] for node in IDS)
    assert result.total_weight == sum(IDS)
    assert result.included == tuple(IDS) and result.dropped == ()
    assert np.max(np.abs(result.weighted_sum - expected)) <= sum(IDS) * quantization_bound(1.0, 24)


def test_requests_are_addressed_and_carry_the_round_parameters():
    server, _ = start(neighbours=2, threshold=0.6, bits=16, clip=0.5)
    requests = server.advertise_keys_requests()
    assert set(requests) == set(IDS)
    request = requests[33]
    assert request["node_id"] == 33 and request["stage"] == ADVERTISE_KEYS
    assert request["round"] == 2 and request["run_id"] == "run-9"
    assert request["threshold"] == server.threshold == 2  # ceil(0.6 * 3)
    assert request["bits"] == 16 and request["clip"] == 0.5 and request["vector_length"] == LENGTH


def test_sparse_graph_routes_shares_only_between_neighbours():
    server, clients, replies = up_to(ADVERTISE_KEYS, ids=list(range(1, 11)), neighbours=4)
    requests = server.share_keys_requests(replies)
    for node, request in requests.items():
        assert set(request["neighbour_ids"]) == set(server.graph[node])
        assert len(request["neighbour_ids"]) == 4
    routed = server.masked_update_requests(answer(clients, SHARE_KEYS, requests))
    for node, request in routed.items():
        assert set(request["sources"]) == set(server.graph[node])


def test_dropped_hospitals_are_logged_and_left_out(caplog):
    caplog.set_level(logging.INFO, logger="fedward.server.secagg")
    server, clients, replies = up_to(SHARE_KEYS)
    del replies[44]
    requests = server.masked_update_requests(replies)
    assert 44 not in requests
    assert all(44 not in request["sources"] for request in requests.values())
    requests = server.consistency_requests(answer(clients, MASKED_UPDATE, requests))
    requests = server.unmask_requests(answer(clients, CONSISTENCY_CHECK, requests))
    result = server.aggregate(answer(clients, UNMASK, requests))
    assert 44 in result.dropped and 44 not in result.included
    assert "dropped: [44]" in caplog.text


# --- rejections: each names the node and the stage ---------------------------------------------


@pytest.mark.parametrize(
    "stage", [ADVERTISE_KEYS, SHARE_KEYS, MASKED_UPDATE, CONSISTENCY_CHECK, UNMASK]
)
def test_reply_from_an_unknown_node_is_rejected(stage):
    server, _, replies = up_to(stage)
    replies[99] = dict(replies[11], node_id=99)
    collect = {
        ADVERTISE_KEYS: server.share_keys_requests,
        SHARE_KEYS: server.masked_update_requests,
        MASKED_UPDATE: server.consistency_requests,
        CONSISTENCY_CHECK: server.unmask_requests,
        UNMASK: server.aggregate,
    }[stage]
    with pytest.raises(SecAggError, match=f"node 99, stage {stage}: unknown node"):
        collect(replies)


def test_reply_replayed_from_another_round_is_rejected():
    _, _, old = up_to(MASKED_UPDATE)  # round 2
    server = SecAggServerSession("run-9", 3, IDS, LENGTH)
    clients = {
        node: SecAggClientSession(node, "run-9", 3, SecAggIdentity.simulated(index, len(IDS)))
        for index, node in enumerate(IDS)
    }
    replies = answer(clients, ADVERTISE_KEYS, server.advertise_keys_requests())
    requests = server.masked_update_requests(
        answer(clients, SHARE_KEYS, server.share_keys_requests(replies))
    )
    replies = answer(clients, MASKED_UPDATE, requests)
    replies[22] = old[22]
    with pytest.raises(SecAggError, match=r"node 22, stage masked_update: .*round 2"):
        server.consistency_requests(replies)


def test_reply_for_another_stage_is_rejected():
    server, clients, replies = up_to(ADVERTISE_KEYS)
    requests = server.share_keys_requests(replies)
    shares = answer(clients, SHARE_KEYS, requests)
    shares[33] = replies[33]  # its advertise_keys reply, sent again
    with pytest.raises(SecAggError, match="node 33, stage share_keys: .*'advertise_keys'"):
        server.masked_update_requests(shares)


@pytest.mark.parametrize(
    "vector",
    [
        np.zeros(LENGTH + 1, dtype=np.uint64),  # not packed
        np.zeros(7, dtype=np.uint8),  # packed, but too short
        np.zeros((2, 3), dtype=np.uint8),
        b"not an array",
    ],
)
def test_a_malformed_masked_update_is_left_out_like_a_dropout(vector, caplog):
    server, clients, replies = up_to(MASKED_UPDATE)
    replies[55] = {**replies[55], "masked_update": vector}
    requests = server.consistency_requests(replies)
    assert 55 not in requests
    assert "node 55, stage masked_update" in caplog.text
    requests = server.unmask_requests(answer(clients, CONSISTENCY_CHECK, requests))
    result = server.aggregate(answer(clients, UNMASK, requests))
    assert 55 in result.dropped and result.total_weight == sum(IDS) - 55


def test_a_garbled_masked_update_is_caught_after_unmasking():
    server, clients, replies = up_to(MASKED_UPDATE)
    noise = np.random.default_rng(0).integers(
        0, 2**server.modulus_bits, LENGTH + 1, dtype=np.uint64
    )
    replies[22] = {**replies[22], "masked_update": pack_bits(noise, server.modulus_bits)}
    requests = server.consistency_requests(replies)
    requests = server.unmask_requests(answer(clients, CONSISTENCY_CHECK, requests))
    with pytest.raises(SecAggError, match="out of range"):
        server.aggregate(answer(clients, UNMASK, requests))


def test_shares_sent_to_a_non_neighbour_are_rejected():
    server, clients, replies = up_to(ADVERTISE_KEYS, ids=list(range(1, 9)), neighbours=2)
    requests = server.share_keys_requests(replies)
    shares = answer(clients, SHARE_KEYS, requests)
    stranger = next(node for node in range(1, 9) if node != 1 and node not in server.graph[1])
    shares[1] = {
        **shares[1],
        "destinations": [*shares[1]["destinations"], stranger],
        "ciphertexts": [*shares[1]["ciphertexts"], b"x" * 60],
    }
    with pytest.raises(SecAggError, match=f"node 1, stage share_keys: .*{stranger}"):
        server.masked_update_requests(shares)


def test_unmask_reply_revealing_unasked_shares_is_rejected():
    server, _, replies = up_to(UNMASK)
    reply = replies[11]
    replies[11] = {**reply, "key_share_owners": [22], "key_shares": [reply["seed_shares"][1]]}
    with pytest.raises(SecAggError, match="node 11, stage unmask: revealed shares"):
        server.aggregate(replies)


def test_bad_public_key_is_rejected():
    server, _, replies = up_to(ADVERTISE_KEYS)
    replies[44] = {**replies[44], "mask_public_key": b"short"}
    with pytest.raises(SecAggError, match="node 44, stage advertise_keys"):
        server.share_keys_requests(replies)


def test_stages_must_come_in_order():
    server, _ = start()
    with pytest.raises(SecAggError, match="stage consistency_check: out of order"):
        server.unmask_requests({})
    server.advertise_keys_requests()
    with pytest.raises(SecAggError, match="already started"):
        server.advertise_keys_requests()


# --- thresholds ----------------------------------------------------------------------------------


def test_too_few_keys_advertised_fails_before_any_share_is_sent():
    server, _, replies = up_to(ADVERTISE_KEYS, threshold=0.8)  # 4 of 5
    for node in (11, 22):
        del replies[node]
    with pytest.raises(SecAggError, match=r"stage advertise_keys: only 3 .*threshold 4"):
        server.share_keys_requests(replies)


def test_too_few_unmask_replies_fails_naming_the_node():
    server, _, replies = up_to(UNMASK, threshold=0.8)
    for node in (11, 22):
        del replies[node]
    with pytest.raises(SecAggError, match=r"node \d+, stage unmask: only 3 shares"):
        server.aggregate(replies)


def test_settings_that_overflow_the_modulus_fail_at_construction():
    with pytest.raises(SecAggError, match="lower secagg_bits"):
        SecAggServerSession("run", 1, list(range(100)), 10, bits=40, max_weight=2**24)


def test_one_hospital_cannot_be_securely_aggregated():
    with pytest.raises(SecAggError, match="at least 2 hospitals"):
        SecAggServerSession("run", 1, [7], 10)
