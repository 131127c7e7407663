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


# --- bad replies: each is left out like a dropout, named with its stage, and the round goes on ---

UPDATES = {node: np.linspace(-0.5, 0.5, LENGTH) * (node / 55) for node in IDS}
COLLECT = {
    ADVERTISE_KEYS: "share_keys_requests",
    SHARE_KEYS: "masked_update_requests",
    MASKED_UPDATE: "consistency_requests",
    CONSISTENCY_CHECK: "unmask_requests",
    UNMASK: "aggregate",
}
STAGE_ORDER = list(COLLECT)


def finish(server, clients, stage, replies):
    """Hand `replies` (to `stage`) to the server, answer every later stage honestly; return the
    result."""
    outcome = getattr(server, COLLECT[stage])(replies)
    for later in STAGE_ORDER[STAGE_ORDER.index(stage) + 1 :]:
        outcome = getattr(server, COLLECT[later])(answer(clients, later, outcome))
    return outcome


def assert_the_sum_of(result, included):
    """The unmasked sum is exactly that of `included`'s updates (to quantization)."""
    expected = sum(node * UPDATES[node] for node in included)
    assert result.included == tuple(sorted(included))
    assert result.total_weight == sum(included)
    bound = sum(included) * quantization_bound(1.0, 24)
    assert np.max(np.abs(result.weighted_sum - expected)) <= bound


def round_three():
    """A fresh round 3 of the same run, with its own client sessions."""
    server = SecAggServerSession("run-9", 3, IDS, LENGTH)
    clients = {
        node: SecAggClientSession(node, "run-9", 3, SecAggIdentity.simulated(index, len(IDS)))
        for index, node in enumerate(IDS)
    }
    return server, clients


@pytest.mark.parametrize("stage", STAGE_ORDER)
def test_a_reply_from_an_unknown_node_is_left_out_and_the_round_goes_on(stage, caplog):
    server, clients, replies = up_to(stage)
    replies[99] = dict(replies[11], node_id=99)
    result = finish(server, clients, stage, replies)
    assert_the_sum_of(result, IDS)
    assert "unknown node" in server.rejected[99] and list(server.rejected) == [99]
    assert "node 99, stage " + stage in caplog.text


@pytest.mark.parametrize("stage", STAGE_ORDER)
def test_a_reply_replayed_from_an_earlier_round_is_left_out_and_the_round_goes_on(stage):
    """Node 22's reply to `stage` in round 2, sent again in round 3 (a node replaying its own
    message, or one replayed on its behalf): rejected on its header, and the round completes.
    Left out before its masked update, node 22 is a dropout (not in the sum); left out after
    it, its update stays in the sum and its masks come off with its neighbours' shares."""
    _, _, old = up_to(stage)
    server, clients = round_three()
    requests = server.advertise_keys_requests()
    for earlier in STAGE_ORDER[: STAGE_ORDER.index(stage)]:
        requests = getattr(server, COLLECT[earlier])(answer(clients, earlier, requests))
    replies = answer(clients, stage, requests)
    replies[22] = old[22]
    result = finish(server, clients, stage, replies)
    late = STAGE_ORDER.index(stage) > STAGE_ORDER.index(MASKED_UPDATE)
    assert_the_sum_of(result, IDS if late else [n for n in IDS if n != 22])
    assert (
        "round 2" in server.rejected[22]
        and "a replayed or misrouted message" in (server.rejected[22])
    )


def test_a_reply_for_another_stage_is_left_out():
    server, clients, replies = up_to(ADVERTISE_KEYS)
    requests = server.share_keys_requests(replies)
    shares = answer(clients, SHARE_KEYS, requests)
    shares[33] = replies[33]  # its advertise_keys reply, sent again
    result = finish(server, clients, SHARE_KEYS, shares)
    assert_the_sum_of(result, [11, 22, 44, 55])
    assert "stage share_keys" in server.rejected[33] and "'advertise_keys'" in server.rejected[33]


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


def test_a_truncated_masked_update_is_left_out_and_the_others_are_summed_exactly():
    server, clients, replies = up_to(MASKED_UPDATE)
    packed = replies[44]["masked_update"]
    replies[44] = {**replies[44], "masked_update": packed[: packed.size // 2]}
    result = finish(server, clients, MASKED_UPDATE, replies)
    assert_the_sum_of(result, [11, 22, 33, 55])
    assert f"{packed.size // 2} bytes" in server.rejected[44]


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


def test_shares_sent_to_a_non_neighbour_are_left_out():
    ids = list(range(1, 9))
    server, clients, replies = up_to(ADVERTISE_KEYS, ids=ids, neighbours=4)
    requests = server.share_keys_requests(replies)
    shares = answer(clients, SHARE_KEYS, requests)
    stranger = next(node for node in ids if node != 1 and node not in server.graph[1])
    shares[1] = {
        **shares[1],
        "destinations": [*shares[1]["destinations"], stranger],
        "ciphertexts": [*shares[1]["ciphertexts"], b"x" * 60],
    }
    requests = server.masked_update_requests(shares)
    assert 1 not in requests and all(1 not in r["sources"] for r in requests.values())
    assert "node 1, stage share_keys" in server.rejected[1] and str(stranger) in server.rejected[1]


def test_an_unmask_reply_revealing_unasked_shares_is_left_out():
    server, _, replies = up_to(UNMASK)
    reply = replies[11]
    replies[11] = {**reply, "key_share_owners": [22], "key_shares": [reply["seed_shares"][1]]}
    result = server.aggregate(replies)
    assert_the_sum_of(result, IDS)  # the others' shares recover every mask
    assert "node 11, stage unmask: revealed shares" in server.rejected[11]


def test_a_bad_public_key_is_left_out():
    server, clients, replies = up_to(ADVERTISE_KEYS)
    replies[44] = {**replies[44], "mask_public_key": b"short"}
    result = finish(server, clients, ADVERTISE_KEYS, replies)
    assert_the_sum_of(result, [11, 22, 33, 55])
    assert "node 44, stage advertise_keys: public keys must be 32 bytes" in server.rejected[44]


def test_bad_replies_below_the_threshold_still_fail_the_round():
    """Leaving bad replies out is dropout handling, not a way around the threshold."""
    server, _, replies = up_to(ADVERTISE_KEYS, threshold=0.8)  # 4 of 5
    for node in (11, 22):
        replies[node] = {**replies[node], "round": 1}
    with pytest.raises(SecAggError, match=r"stage advertise_keys: only 3 .*threshold 4"):
        server.share_keys_requests(replies)
    assert set(server.rejected) == {11, 22}


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
