"""Tests for the round phases of `FedwardStrategy` (server/strategy.py) with real Flower messages.

Replies are built the way a hospital builds them, `Message(content, reply_to=instruction)`, on
the instructions `configure_train` produced.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from sklearn.metrics import f1_score

from fedward.common.config import RunConfig
from fedward.common.model import ArraySpec
from fedward.common.protocol import wire
from fedward.common.protocol.reasons import Reason
from fedward.common.tasks.classification import CLASSIFICATION
from fedward.server.strategy import FedwardStrategy

SPEC = [ArraySpec("lora_B", (2, 2), "float32"), ArraySpec("head.bias", (3,), "float32")]
RUN_ID = 77


@pytest.fixture(autouse=True)
def inside_a_server_app(monkeypatch):
    """Flower stamps instructions with the running task's identity, as a ServerApp run does."""
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _strategy(**options) -> FedwardStrategy:
    values = {
        "hospitals": 5,
        "min_hospitals": 2,
        "secure_aggregation": False,
        "labels": ["a", "b", "c"],
    }
    return FedwardStrategy(RunConfig(**{**values, **options}), SPEC, RUN_ID)


def _arrays(fill_b: float, fill_bias: float) -> dict[str, np.ndarray]:
    return {
        "lora_B": np.full((2, 2), fill_b, dtype=np.float32),
        "head.bias": np.full(3, fill_bias, dtype=np.float32),
    }


def _update_reply(
    instruction: Message, name: str, update, examples: int, loss: float = 0.5
) -> Message:
    content = RecordDict(
        {
            wire.ARRAYS: wire.arrays_to_record(update),
            wire.METRICS: MetricRecord(
                {"num-examples": examples, "train-loss": loss, "epsilon": 1.5}
            ),
            wire.INFO: ConfigRecord({"hospital": name}),
        }
    )
    return Message(content=content, reply_to=instruction)


def _refusal_reply(instruction: Message, name: str, reason: Reason | dict) -> Message:
    record = reason.to_record() if isinstance(reason, Reason) else reason
    content = RecordDict(
        {
            wire.REFUSAL: ConfigRecord(record),
            wire.INFO: ConfigRecord({"hospital": name}),
        }
    )
    return Message(content=content, reply_to=instruction)


def test_configure_train_sends_the_global_adapter_and_round_config():
    strategy = _strategy()
    global_arrays = _arrays(0.25, -1.0)
    messages = strategy.configure_train(3, global_arrays, [11, 12])
    assert [m.metadata.dst_node_id for m in messages] == [11, 12]
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    for message in messages:
        received = wire.record_to_arrays(message.content[wire.ARRAYS])
        assert all(np.array_equal(received[n], global_arrays[n]) for n in global_arrays)
        config, server_round, run_id = wire.read_round_config(message.content[wire.CONFIG])
        assert (config, server_round, run_id) == (strategy.config.spec, 3, str(RUN_ID))
        # Only the run spec travels: the coordinator's local settings never leave it.
        sent = set(message.content[wire.CONFIG])
        assert not sent & {"out", "device", "round-timeout", "resume", "hospitals", "data"}


def test_the_average_does_not_depend_on_the_order_replies_arrive_in():
    """Float sums in arrival order would make the global adapter and the train loss differ in
    their last bits between two runs of the same seeded federation (timing decides the order)."""
    strategy = _strategy()
    global_arrays = _arrays(1.0, 0.0)
    to = strategy.configure_train(1, global_arrays, [11, 12, 13])
    # losses and counts whose float mean differs in its last bit between the two orders
    values = [(0.1, 0.3, 5, 1.837), (-0.7, 0.2, 58, 0.187), (0.33, -0.9, 57, 0.798)]
    replies = [
        _update_reply(to[i], f"hospital-{i}", _arrays(a, b), examples=n, loss=loss)
        for i, (a, b, n, loss) in enumerate(values)
    ]
    first = strategy.aggregate_train(1, global_arrays, replies, sent=3)
    second = strategy.aggregate_train(1, global_arrays, replies[::-1], sent=3)
    assert first.train_loss == second.train_loss
    for name in global_arrays:
        assert first.arrays[name].tobytes() == second.arrays[name].tobytes()


def test_aggregate_train_drops_bad_and_refused_replies_and_averages_the_rest(caplog):
    strategy = _strategy()
    global_arrays = _arrays(1.0, 0.0)
    to = strategy.configure_train(1, global_arrays, [11, 12, 13, 14, 15])
    broken = _arrays(0.1, 0.0)
    broken["lora_B"][0, 0] = np.nan
    replies = [
        _update_reply(to[0], "hospital-a", _arrays(0.2, 0.4), examples=30, loss=0.6),
        _update_reply(to[1], "hospital-b", _arrays(-0.2, 0.8), examples=10, loss=0.2),
        _update_reply(to[2], "hospital-c", broken, examples=50, loss=0.6),
        _refusal_reply(to[3], "hospital-d", Reason("budget.exceeded")),
        Message(Error(code=0, reason="worker crashed"), reply_to=to[4]),
    ]
    with caplog.at_level(logging.WARNING, logger="fedward.server.strategy"):
        outcome = strategy.aggregate_train(1, global_arrays, replies, sent=len(to))

    assert outcome.status == "ok"
    # global + (30 * a + 10 * b) / 40
    np.testing.assert_allclose(outcome.arrays["lora_B"], np.full((2, 2), 1.1), rtol=1e-6)
    np.testing.assert_allclose(outcome.arrays["head.bias"], np.full(3, 0.5), rtol=1e-6)
    assert sorted(outcome.hospitals) == ["hospital-a", "hospital-b"]
    assert outcome.hospitals["hospital-a"]["num_examples"] == 30
    assert outcome.hospitals["hospital-a"]["epsilon"] == 1.5
    assert list(outcome.rejected) == ["hospital-c"] and "NaN" in outcome.rejected["hospital-c"]
    assert outcome.refused == {"hospital-d": Reason("budget.exceeded").render()}
    assert "privacy budget would be exceeded" in outcome.refused["hospital-d"]
    assert outcome.dropped == ["node-15"]
    assert outcome.aggregation_seconds > 0  # the coordinator's own work, timed for history.json

    logged = caplog.text
    assert "hospital-c" in logged and "NaN" in logged
    assert "hospital-d refused" in logged
    assert "worker crashed" in logged


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (
            {
                "lora_B": np.full((2, 2), 3.0, dtype=np.float32),
                "head.bias": np.zeros(3, np.float32),
            },
            "outside",
        ),
        (
            {"lora_B": np.zeros((2, 3), dtype=np.float32), "head.bias": np.zeros(3, np.float32)},
            "shape",
        ),
        ({"lora_B": np.zeros((2, 2), dtype=np.float32)}, "missing"),
    ],
)
def test_each_kind_of_bad_update_is_rejected_not_averaged(bad, words):
    strategy = _strategy()
    global_arrays = _arrays(0.0, 0.0)
    to = strategy.configure_train(1, global_arrays, [11, 12, 13])
    replies = [
        _update_reply(to[0], "hospital-a", _arrays(0.3, 0.3), examples=5),
        _update_reply(to[1], "hospital-b", _arrays(0.1, 0.1), examples=5),
        _update_reply(to[2], "hospital-c", bad, examples=1000),
    ]
    outcome = strategy.aggregate_train(1, global_arrays, replies, sent=3)
    assert words in outcome.rejected["hospital-c"]
    np.testing.assert_allclose(outcome.arrays["lora_B"], np.full((2, 2), 0.2), rtol=1e-6)


def test_a_rejected_update_does_not_count_in_the_round_train_loss():
    strategy = _strategy()
    global_arrays = _arrays(0.0, 0.0)
    to = strategy.configure_train(1, global_arrays, [11, 12, 13])
    replies = [
        _update_reply(to[0], "hospital-a", _arrays(0.1, 0.1), examples=10, loss=0.4),
        _update_reply(to[1], "hospital-b", _arrays(0.1, 0.1), examples=10, loss=0.6),
        _update_reply(to[2], "hospital-c", _arrays(5.0, 5.0), examples=10, loss=90.0),
    ]
    outcome = strategy.aggregate_train(1, global_arrays, replies, sent=3)
    assert "hospital-c" in outcome.rejected
    assert outcome.train_loss == pytest.approx(0.5)


def test_a_reply_without_a_positive_weight_is_rejected():
    strategy = _strategy()
    global_arrays = _arrays(0.0, 0.0)
    to = strategy.configure_train(1, global_arrays, [11, 12, 13])
    replies = [
        _update_reply(to[0], "hospital-a", _arrays(0.1, 0.1), examples=10),
        _update_reply(to[1], "hospital-b", _arrays(0.1, 0.1), examples=10),
        _update_reply(to[2], "hospital-c", _arrays(0.9, 0.9), examples=0),
    ]
    outcome = strategy.aggregate_train(1, global_arrays, replies, sent=3)
    assert "weight" in outcome.rejected["hospital-c"]
    np.testing.assert_allclose(outcome.arrays["lora_B"], np.full((2, 2), 0.1), rtol=1e-6)


def test_clear_updates_are_averaged_with_the_weights_hospitals_declare():
    """A deployed hospital sends the weight its policy declares, not its training count
    (issue 40): the average follows the declared weights."""
    strategy = _strategy()
    global_arrays = _arrays(0.0, 0.0)
    to = strategy.configure_train(1, global_arrays, [11, 12])
    replies = []
    for instruction, name, value, weight in ((to[0], "a", 0.1, 1), (to[1], "b", 0.4, 2)):
        content = RecordDict(
            {
                wire.ARRAYS: wire.arrays_to_record(_arrays(value, value)),
                wire.METRICS: MetricRecord({"weight": weight, "epsilon": 1.5}),
                wire.INFO: ConfigRecord({"hospital": name}),
            }
        )
        replies.append(Message(content=content, reply_to=instruction))
    outcome = strategy.aggregate_train(1, global_arrays, replies, sent=2)
    np.testing.assert_allclose(outcome.arrays["lora_B"], np.full((2, 2), 0.3), rtol=1e-6)
    assert "num_examples" not in outcome.hospitals["a"]


def test_too_few_usable_updates_fail_the_round_and_keep_the_adapter(caplog):
    strategy = _strategy(min_hospitals=3)
    global_arrays = _arrays(1.0, 1.0)
    to = strategy.configure_train(2, global_arrays, [11, 12, 13, 14])
    replies = [
        _update_reply(to[0], "hospital-a", _arrays(0.1, 0.1), examples=10),
        _update_reply(to[1], "hospital-b", _arrays(0.1, 0.1), examples=10),
        _refusal_reply(to[2], "hospital-c", Reason("policy.rules", {"rules": "allowed_models"})),
    ]  # hospital 14 never answers
    with caplog.at_level(logging.WARNING, logger="fedward.server.strategy"):
        outcome = strategy.aggregate_train(2, global_arrays, replies, sent=len(to))
    assert outcome.arrays is None
    assert outcome.status.startswith("failed: 2 usable update(s), fewer than min_hospitals (3)")
    assert outcome.dropped == ["no reply #1"]
    assert "round 2 failed" in caplog.text


def test_no_replies_at_all_fail_the_round():
    strategy = _strategy()
    outcome = strategy.aggregate_train(1, _arrays(0, 0), [], sent=3)
    assert outcome.arrays is None and outcome.status.startswith("failed: 0 usable")
    assert len(outcome.dropped) == 3
    assert math.isnan(outcome.train_loss)


def _evaluate_reply(
    instruction: Message, name: str, examples: int, loss: float, accuracy: float
) -> Message:
    content = RecordDict(
        {
            wire.METRICS: MetricRecord(
                {"num-examples": examples, "loss": loss, "accuracy": accuracy}
            ),
            wire.INFO: ConfigRecord({"hospital": name}),
        }
    )
    return Message(content=content, reply_to=instruction)


def test_aggregate_evaluate_weights_hospitals_by_examples_and_skips_failures():
    strategy = _strategy()
    to = [
        Message(content=RecordDict(), message_type=MessageType.EVALUATE, dst_node_id=node)
        for node in (11, 12, 13)
    ]
    replies = [
        _evaluate_reply(to[0], "hospital-a", 30, loss=1.0, accuracy=0.9),
        _evaluate_reply(to[1], "hospital-b", 10, loss=2.0, accuracy=0.5),
        Message(Error(code=0, reason="out of memory"), reply_to=to[2]),
    ]
    outcome = strategy.aggregate_evaluate(1, replies)
    assert sorted(outcome.hospitals) == ["hospital-a", "hospital-b"]
    assert outcome.metrics["loss"] == pytest.approx(1.25)
    assert outcome.metrics["accuracy"] == pytest.approx(0.8)
    assert "num_examples" not in outcome.metrics


def test_a_refusal_carrying_text_is_stored_as_unknown_never_as_its_text():
    """A hospital (an old version, or a broken one) that sends text instead of a code: the
    coordinator renders its own `reason.unknown`, so the text reaches no history or audit log."""
    strategy = _strategy()
    global_arrays = _arrays(1.0, 0.0)
    to = strategy.configure_train(1, global_arrays, [11, 12, 13])
    leaked = "patient SENTINEL-4711 had chest pain"
    replies = [
        _update_reply(to[0], "hospital-a", _arrays(0.2, 0.4), examples=30),
        _update_reply(to[1], "hospital-b", _arrays(0.2, 0.4), examples=30),
        _refusal_reply(to[2], "hospital-c", {"kind": "DataError", "reason": leaked}),
    ]
    outcome = strategy.aggregate_train(1, global_arrays, replies, sent=len(to))
    assert outcome.refused == {"hospital-c": Reason("reason.unknown").render()}
    crafted = Reason.from_record({"code": "policy.rules", "params": '{"rules": "' + leaked + '"}'})
    assert crafted == Reason("reason.unknown")


def test_with_secure_aggregation_replies_need_no_clear_example_count():
    """Deployed hospitals send no example count or loss in the clear under SecAgg+: their
    replies are accepted, and the round's train loss is unknown rather than invented."""
    strategy = _strategy(secure_aggregation=True)
    to = strategy.configure_train(1, _arrays(0.0, 0.0), [11, 12])
    replies = []
    for instruction, name in zip(to, ("hospital-a", "hospital-b")):
        content = RecordDict(
            {
                wire.METRICS: MetricRecord({"epsilon": 1.5}),
                wire.INFO: ConfigRecord({"hospital": name}),
                wire.SECAGG: ConfigRecord({}),
            }
        )
        replies.append(Message(content=content, reply_to=instruction))
    outcome, accepted = strategy._read_train_replies(1, replies, sent=2)
    assert sorted(name for name, _ in accepted.values()) == ["hospital-a", "hospital-b"]
    assert outcome.hospitals["hospital-a"] == {"epsilon": 1.5}
    assert math.isnan(outcome.train_loss)


def test_aggregate_evaluate_pools_the_hospitals_counts_and_keeps_them_out_of_their_rows():
    strategy = _strategy()
    to = [
        Message(content=RecordDict(), message_type=MessageType.EVALUATE, dst_node_id=node)
        for node in (11, 12)
    ]
    replies = []
    for instruction, name, (true, pred) in zip(
        to,
        ("hospital-a", "hospital-b"),
        (([0, 0, 0, 0, 0, 0, 0, 1], [0] * 8), ([1, 1, 1, 1, 1, 0], [1] * 6)),
        strict=True,
    ):
        metrics = {"num-examples": len(true), **CLASSIFICATION.metrics(true, pred, ["a", "b"])}
        content = RecordDict(
            {
                wire.METRICS: MetricRecord(metrics),
                wire.INFO: ConfigRecord({"hospital": name}),
            }
        )
        replies.append(Message(content=content, reply_to=instruction))
    outcome = strategy.aggregate_evaluate(1, replies)
    pooled = f1_score([0] * 7 + [1] + [1] * 5 + [0], [0] * 8 + [1] * 6, average="macro")
    assert outcome.metrics["macro_f1"] == pytest.approx(pooled)
    assert outcome.metrics["hospital_mean_macro_f1"] < pooled - 0.3
    for scores in outcome.hospitals.values():
        assert set(scores) == {"num_examples", "accuracy", "macro_f1"}
