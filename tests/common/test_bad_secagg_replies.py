"""A hospital's bad message costs that hospital its place in the round, not the round.

The coordinator's real loop (strategy, SecAgg+ server session, history) and the hospitals' real
ClientApp in one process (`inprocess_federation`), with a Grid that tampers with one node's reply
the way a broken or dishonest node would: a SecAgg+ reply replayed from an earlier round, a
masked update cut short, two replies to one request. Each is rejected on its header or shape,
named in the history with its reason, and the round completes with the other hospitals' sum.
"""

from __future__ import annotations

import copy

import pytest
from flwr.app import Message
from inprocess_federation import FLOWER_RUN_ID, InProcessGrid, _stamped

from fedward.common.config import RunConfig
from fedward.common.protocol import wire
from fedward.server.app import run_federation
from fedward.simulation.hospitals import prepare_config

pytestmark = pytest.mark.slow


class TamperingGrid(InProcessGrid):
    """Keeps every reply by (round, message type, node); `tamper(round, type, node, reply,
    kept)` returns the replies delivered instead (node `1 + i` is hospital-i)."""

    def __init__(self, config: RunConfig, tamper) -> None:
        super().__init__(config)
        self.tamper = tamper
        self.kept: dict[tuple[int, str, int], Message] = {}
        self.round = 0

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.round += 1
        delivered = []
        for reply in super().send_and_receive(messages, timeout):
            node, kind = reply.metadata.src_node_id, reply.metadata.message_type
            self.kept[(self.round, kind, node)] = reply
            delivered += self.tamper(self.round, kind, node, reply, self.kept)
        return delivered


#: (round, message type, node) -> what that node sends instead of its reply
REPLAYED = (2, "train.share_keys", 2)  # hospital-1 replays its reply of round 1
TRUNCATED = (3, "train.masked_update", 3)  # hospital-2's masked update cut in half
TWICE = (1, "train.share_keys", 4)  # hospital-3 answers one request twice


def _with_content(reply: Message, content) -> Message:
    forged = copy.copy(reply)
    forged.content = content
    return forged


def _truncated(reply: Message) -> Message:
    content = copy.deepcopy(reply.content)
    vector = content[wire.ARRAYS]
    key = next(iter(vector))
    packed = vector[key].numpy()
    vector[key] = type(vector[key])(packed[: packed.size // 2])
    return _with_content(reply, content)


def tamper(server_round, kind, node, reply, kept):
    where = (server_round, kind, node)
    if where == REPLAYED:
        return [_with_content(reply, kept[(1, kind, node)].content)]
    if where == TRUNCATED:
        return [_truncated(reply)]
    if where == TWICE:
        return [reply, reply]
    return [reply]


@pytest.fixture(scope="module")
def rounds(tiny_model_dir, tmp_path_factory):
    """Three rounds of four hospitals, one bad message in each."""
    config = RunConfig(
        model=tiny_model_dir,
        hospitals=4,
        min_hospitals=2,
        rounds=3,
        notes_per_hospital=24,
        batch_size=8,
        max_length=32,
        dp=False,
        secure_aggregation=True,
        device="cpu",
        out=str(tmp_path_factory.mktemp("bad-replies") / "out"),
    )
    config = prepare_config(config)
    with _stamped(0):
        result = run_federation(TamperingGrid(config, tamper), config, FLOWER_RUN_ID)
    return result.rounds


def trained(row) -> set[str]:
    return {name for name, item in row["hospitals"].items() if item.get("trained")}


def test_every_round_completes_without_the_hospital_whose_message_was_bad(rounds):
    assert [row["status"] for row in rounds] == ["ok", "ok", "ok"]
    everyone = {f"hospital-{i}" for i in range(4)}
    assert trained(rounds[0]) == everyone - {"hospital-3"}
    assert trained(rounds[1]) == everyone - {"hospital-1"}
    assert trained(rounds[2]) == everyone - {"hospital-2"}
    for row, name in zip(rounds, ["hospital-3", "hospital-1", "hospital-2"], strict=True):
        assert list(row["rejected"]) == [name]  # one bad message, not a ban
        assert 0 < row["aggregation_seconds"] < row["seconds"]  # the SecAgg+ work, timed apart


def test_a_reply_replayed_from_the_round_before_is_rejected_on_its_header(rounds):
    reason = rounds[1]["rejected"]["hospital-1"]
    assert "stage share_keys" in reason and "round 1" in reason
    assert "replayed or misrouted" in reason


def test_a_truncated_masked_update_is_rejected_on_its_length(rounds):
    reason = rounds[2]["rejected"]["hospital-2"]
    assert "stage masked_update" in reason and "bytes, not the" in reason


def test_two_replies_to_one_request_are_both_left_out(rounds):
    assert "two to share_keys" in rounds[0]["rejected"]["hospital-3"]
