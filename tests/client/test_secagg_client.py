"""A hospital's SecAgg+ session: what it sends, and what it refuses to accept or reveal."""

from __future__ import annotations

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
    unpack_bits,
)
from fedward.server.secagg import SecAggServerSession

IDS = [5, 6, 7, 8]
LENGTH = 16


def identity(index: int) -> SecAggIdentity:
    return SecAggIdentity.simulated(index, len(IDS))


class Round:
    """Four hospitals and a coordinator, advanced one stage at a time."""

    def __init__(self, server_round: int = 1, **options) -> None:
        self.server = SecAggServerSession("run-a", server_round, IDS, LENGTH, **options)
        self.clients = {
            node: SecAggClientSession(node, "run-a", server_round, identity(index))
            for index, node in enumerate(IDS)
        }
        self.requests = self.server.advertise_keys_requests()

    def advance(self, stage: str, drop=()) -> dict:
        replies = {}
        for node, request in self.requests.items():
            if node in drop:
                continue
            if stage == MASKED_UPDATE:
                replies[node] = self.clients[node].masked_update(request, np.zeros(LENGTH), 10)
            else:
                replies[node] = getattr(self.clients[node], stage)(request)
        collect = {
            ADVERTISE_KEYS: self.server.share_keys_requests,
            SHARE_KEYS: self.server.masked_update_requests,
            MASKED_UPDATE: self.server.consistency_requests,
            CONSISTENCY_CHECK: self.server.unmask_requests,
        }[stage]
        self.requests = collect(replies)
        return self.requests


def test_advertise_keys_replies_with_two_distinct_public_keys():
    game = Round()
    reply = game.clients[5].advertise_keys(game.requests[5])
    assert reply["node_id"] == 5 and reply["stage"] == ADVERTISE_KEYS and reply["round"] == 1
    assert len(reply["share_public_key"]) == len(reply["mask_public_key"]) == 32
    assert reply["share_public_key"] != reply["mask_public_key"]
    assert game.clients[5].params["vector_length"] == LENGTH


def test_share_keys_sends_one_ciphertext_per_neighbour():
    game = Round()
    requests = game.advance(ADVERTISE_KEYS)
    reply = game.clients[6].share_keys(requests[6])
    assert reply["destinations"] == [5, 7, 8]
    assert len(reply["ciphertexts"]) == 3 and all(
        isinstance(c, bytes) for c in reply["ciphertexts"]
    )


def test_masked_update_has_the_count_slot_and_the_modulus():
    game = Round()
    game.advance(ADVERTISE_KEYS)
    requests = game.advance(SHARE_KEYS)
    reply = game.clients[7].masked_update(requests[7], np.zeros(LENGTH), 10)
    packed = reply["masked_update"]  # on the wire: modulus_bits per value, not 64
    bits = game.server.modulus_bits
    assert packed.dtype == np.uint8 and packed.shape == (((LENGTH + 1) * bits + 7) // 8,)
    masked = unpack_bits(packed, bits, LENGTH + 1)
    assert int(masked.max()) < 2**bits


# --- refusals ------------------------------------------------------------------------------------


def test_stages_out_of_order_are_refused():
    game = Round()
    request = dict(game.requests[5], stage=SHARE_KEYS)
    with pytest.raises(SecAggError, match="node 5, stage share_keys: out of order"):
        game.clients[5].share_keys(request)


@pytest.mark.parametrize(
    ("field", "value"), [("round", 2), ("run_id", "run-b"), ("node_id", 6), ("stage", UNMASK)]
)
def test_request_for_another_round_run_node_or_stage_is_refused(field, value):
    game = Round()
    request = {**game.requests[5], field: value}
    with pytest.raises(SecAggError, match="node 5, stage advertise_keys: .*rejected"):
        game.clients[5].advertise_keys(request)


def test_hospital_not_in_the_round_refuses():
    game = Round()
    request = {**game.requests[5], "node_ids": [6, 7, 8]}
    with pytest.raises(SecAggError, match="node 5, stage advertise_keys: .*not among"):
        game.clients[5].advertise_keys(request)


def test_inconsistent_round_parameters_are_refused():
    game = Round()
    with pytest.raises(SecAggError, match="node 5, stage advertise_keys: .*threshold"):
        game.clients[5].advertise_keys({**game.requests[5], "threshold": 1})
    with pytest.raises(SecAggError, match="node 5, stage advertise_keys: modulus_bits"):
        game.clients[5].advertise_keys({**game.requests[5], "modulus_bits": 20})


def test_keys_from_a_non_neighbour_are_refused():
    game = Round(neighbours=0)
    requests = game.advance(ADVERTISE_KEYS)
    request = requests[5]
    request = {
        **request,
        "neighbour_ids": [*request["neighbour_ids"], 99],
        "share_public_keys": [*request["share_public_keys"], bytes(range(32))],
        "mask_public_keys": [*request["mask_public_keys"], bytes(range(1, 33))],
    }
    with pytest.raises(SecAggError, match=r"node 5, stage share_keys: nodes \[99\]"):
        game.clients[5].share_keys(request)


def test_a_share_addressed_to_another_hospital_is_refused():
    game = Round()
    game.advance(ADVERTISE_KEYS)
    requests = game.advance(SHARE_KEYS)
    # The coordinator misroutes: node 5 gets the ciphertext node 8 sent to node 6.
    to_six = dict(zip(requests[6]["sources"], requests[6]["ciphertexts"]))
    request = dict(requests[5])
    request["ciphertexts"] = [
        to_six[8] if source == 8 else c
        for source, c in zip(request["sources"], request["ciphertexts"])
    ]
    with pytest.raises(SecAggError, match="node 5, stage masked_update: the share from node 8"):
        game.clients[5].masked_update(request, np.zeros(LENGTH), 10)


def test_a_share_replayed_from_an_earlier_round_is_refused():
    old = Round(server_round=1)
    old.advance(ADVERTISE_KEYS)
    old_requests = old.advance(SHARE_KEYS)
    game = Round(server_round=2)
    game.advance(ADVERTISE_KEYS)
    requests = game.advance(SHARE_KEYS)
    request = {**requests[5], "ciphertexts": old_requests[5]["ciphertexts"]}
    with pytest.raises(SecAggError, match="node 5, stage masked_update: .*replayed"):
        game.clients[5].masked_update(request, np.zeros(LENGTH), 10)


@pytest.mark.parametrize(
    ("update", "weight", "message"),
    [
        (np.zeros(LENGTH + 1), 10, "shape"),
        (np.zeros((2, LENGTH)), 10, "shape"),
        (np.full(LENGTH, np.nan), 10, "NaN"),
        (np.zeros(LENGTH), -1, "weight"),
        (np.zeros(LENGTH), 2**20 + 1, "weight"),
        (np.zeros(LENGTH), 2.5, "weight"),
    ],
)
def test_bad_update_or_weight_is_refused(update, weight, message):
    game = Round()
    game.advance(ADVERTISE_KEYS)
    requests = game.advance(SHARE_KEYS)
    with pytest.raises(SecAggError, match=f"node 5, stage masked_update: .*{message}"):
        game.clients[5].masked_update(requests[5], update, weight)


def _consistency_request(game: Round) -> dict:
    game.advance(ADVERTISE_KEYS)
    game.advance(SHARE_KEYS)
    return game.advance(MASKED_UPDATE)[5]


def test_unmask_refuses_a_survivor_set_it_did_not_sign():
    game = Round()
    _consistency_request(game)
    requests = game.advance(CONSISTENCY_CHECK)
    request = {**requests[5], "survivors": [5, 6, 7]}  # 8 now said to have dropped
    with pytest.raises(SecAggError, match="node 5, stage unmask: the survivor set differs"):
        game.clients[5].unmask(request)


def test_consistency_check_refuses_too_few_survivors_or_unknown_nodes():
    game = Round(threshold=0.75)  # 3 of 4
    request = _consistency_request(game)
    with pytest.raises(SecAggError, match="node 5, stage consistency_check: only 2 survivors"):
        game.clients[5].consistency_check({**request, "survivors": [5, 6]})
    with pytest.raises(SecAggError, match=r"node 5, stage consistency_check: .*\[42\]"):
        game.clients[5].consistency_check({**request, "survivors": [5, 6, 7, 42]})
    with pytest.raises(SecAggError, match="node 5, stage consistency_check: .*not among"):
        game.clients[5].consistency_check({**request, "survivors": [6, 7, 8]})


def test_unmask_reveals_seed_shares_for_survivors_and_key_shares_for_the_dropped():
    game = Round()
    game.advance(ADVERTISE_KEYS)
    game.advance(SHARE_KEYS)
    game.advance(MASKED_UPDATE, drop={8})
    requests = game.advance(CONSISTENCY_CHECK)
    reply = game.clients[5].unmask(requests[5])
    assert reply["seed_share_owners"] == [5, 6, 7]
    assert reply["key_share_owners"] == [8]
    assert len(reply["seed_shares"]) == 3 and len(reply["key_shares"]) == 1
    # The round's secrets are gone once they have served.
    assert game.clients[5]._self_seed is None and game.clients[5]._mask_key is None


def test_repr_shows_no_secrets():
    game = Round()
    game.advance(ADVERTISE_KEYS)
    game.advance(SHARE_KEYS)
    client = game.clients[5]
    text = repr(client)
    assert "node_id=5" in text and "share_keys" in text
    for secret in (client._self_seed, *client._own_shares):
        assert secret.hex() not in text and repr(secret) not in text


# --- the identity a site policy pins -------------------------------------------------------------


def test_a_site_policy_pins_the_signing_key_roster_and_minimum_cohort(tmp_path):
    from fedward.client.policy import SitePolicy
    from fedward.client.secagg import write_signing_key

    own = write_signing_key(tmp_path / "a.pem")
    other = write_signing_key(tmp_path / "b.pem")
    policy = SitePolicy.build(
        {
            "lifetime_epsilon": 8.0,
            "secagg_signing_key": str(tmp_path / "a.pem"),
            "secagg_roster": {"hospital-a": own, "hospital-b": f"ed25519:{other}"},
            "min_secure_aggregation_hospitals": 4,
        }
    )
    identity = SecAggIdentity.from_policy(policy, "hospital-a", tmp_path / "secagg")
    assert identity.public_key.hex() == own and identity.min_hospitals == 4
    assert set(identity.roster.values()) == {"hospital-a", "hospital-b"}
    assert oct((tmp_path / "a.pem").stat().st_mode & 0o777) == "0o600"
    assert "PRIVATE" not in repr(identity) and own[:16] in repr(identity)


def test_a_policy_without_a_roster_refuses_secure_aggregation(tmp_path):
    from fedward.client.policy import SitePolicy
    from fedward.common.errors import ConfigError, PolicyError

    policy = SitePolicy.build({"lifetime_epsilon": 8.0})
    with pytest.raises(PolicyError, match="needs secagg_signing_key and secagg_roster"):
        SecAggIdentity.from_policy(policy, "hospital-a", None)
    with pytest.raises(ConfigError, match="secagg_roster"):
        SitePolicy.build({"lifetime_epsilon": 8.0, "secagg_roster": {"hospital-b": "abc"}})
    broken = SitePolicy.build(
        {
            "lifetime_epsilon": 8.0,
            "secagg_signing_key": str(tmp_path / "missing.pem"),
            "secagg_roster": {"hospital-b": "ab" * 32},
        }
    )
    with pytest.raises(PolicyError, match="not a readable") as info:
        SecAggIdentity.from_policy(broken, "hospital-a", None)
    assert "missing.pem" not in str(info.value)  # the reason goes to the coordinator


# --- the site's minimum cohort, to the end of the round ------------------------------------------


def test_a_round_shrunk_below_the_minimum_is_refused_with_a_code_and_logged_in_full(
    monkeypatch, caplog
):
    import logging

    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedward.client.app import SECAGG_STATE, handle_secagg_stage
    from fedward.common.protocol import wire
    from fedward.common.protocol.reasons import Reason

    ids = [5, 6, 7]
    server = SecAggServerSession("run-a", 1, ids, LENGTH)
    clients = {}
    for index, node in enumerate(ids):
        simulated = SecAggIdentity.simulated(index, len(ids))
        identity = SecAggIdentity(simulated.signing_key, simulated.roster, 3)  # the default
        clients[node] = SecAggClientSession(node, "run-a", 1, identity)
    requests = server.advertise_keys_requests()
    replies = {node: clients[node].advertise_keys(requests[node]) for node in ids}
    requests = server.share_keys_requests(replies)
    replies = {node: clients[node].share_keys(requests[node]) for node in ids}
    requests = server.masked_update_requests(replies)
    replies = {
        node: clients[node].masked_update(requests[node], np.zeros(LENGTH), 10) for node in ids
    }
    del replies[7]  # it arrived, but the coordinator declares hospital 7 dropped
    request = server.consistency_requests(replies)[5]
    assert request["survivors"] == [5, 6]

    context = Context(
        run_id=11,
        node_id=5,
        node_config={"hospital-name": "hospital-a"},
        state=RecordDict(),
        run_config={},
    )
    context.state[SECAGG_STATE] = ConfigRecord({"session": clients[5].to_state()})
    monkeypatch.setattr(TaskIdentity, "_run_id", 11)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    payload, _ = wire.payload_to_records(request)
    message = Message(
        content=RecordDict({wire.SECAGG: payload}),
        dst_node_id=5,
        message_type=wire.SECAGG_STAGE_TYPES[CONSISTENCY_CHECK],
    )
    with caplog.at_level(logging.WARNING):
        reply = handle_secagg_stage(message, context, CONSISTENCY_CHECK)

    assert wire.SECAGG not in reply.content  # no signature, so no share later
    refusal = reply.content[wire.REFUSAL]
    assert set(refusal) == {"code", "params"}
    reason = Reason.from_record(refusal)
    assert reason == Reason(
        "secagg.cohort_too_small", {"hospitals": 2, "min_secure_aggregation_hospitals": 3}
    )
    assert "only 2 hospital(s)" in reason.render()
    # The hospital's own log tells the whole story; the coordinator gets the code and numbers.
    assert "hospital-a refused consistency_check" in caplog.text
    assert "min_secure_aggregation_hospitals (3); refusing to sign it" in caplog.text


def test_a_sparse_neighbourhood_smaller_than_the_minimum_is_refused_before_training():
    ids = list(range(1, 11))
    server = SecAggServerSession("run-a", 1, ids, LENGTH, neighbours=2)
    simulated = SecAggIdentity.simulated(0, len(ids))
    client = SecAggClientSession(
        1, "run-a", 1, SecAggIdentity(simulated.signing_key, simulated.roster, 4)
    )
    with pytest.raises(SecAggError, match="masks with 2 neighbours") as info:
        client.advertise_keys(server.advertise_keys_requests()[1])
    assert info.value.reason.code == "secagg.cohort_too_small"
    assert info.value.reason.params == {"hospitals": 3, "min_secure_aggregation_hospitals": 4}
