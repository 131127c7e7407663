"""Flower apps for simulation: hospitals read their share of a pooled or synthetic data set.

`flwr run .` (pyproject's [tool.flwr.app.components]) and `fedward simulate` both use these.
A real hospital uses `client.app:app` instead, which reads the file named in its node config.
"""

from __future__ import annotations

import os
import random

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedward.client import model_cache
from fedward.client.app import handle_evaluate, handle_secagg_stage, handle_train
from fedward.common import wire
from fedward.common.config import RunConfig
from fedward.common.secagg import CONSISTENCY_CHECK, MASKED_UPDATE, SHARE_KEYS, UNMASK
from fedward.server.app import run_federation
from fedward.simulation.hospitals import prepare_config, simulated_data

#: Where a simulated hospital can drop out of a round (`RunConfig.dropout_rate`).
DROPOUT_STAGES = ("train", SHARE_KEYS, MASKED_UPDATE, UNMASK)
_DROPOUT_STATE = "fedward.simulated-dropout"


class SimulatedDropout(RuntimeError):
    """A simulated hospital failing on purpose; Flower turns it into an error reply."""


def dropout_stage(seed: int, server_round: int, hospital: int, rate: float) -> str | None:
    """The stage at which this hospital drops in this round, or None; deterministic by seed."""
    if rate <= 0:
        return None
    rng = random.Random(f"dropout:{seed}:{server_round}:{hospital}")
    if rng.random() >= rate:
        return None
    return rng.choice(DROPOUT_STAGES)


def _maybe_drop(context: Context, stage: str) -> None:
    record = context.state.get(_DROPOUT_STATE)
    if record is not None and record["stage"] == stage:
        raise SimulatedDropout(
            f"simulated dropout of hospital-{context.node_config['partition-id']} at {stage}"
        )


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this simulated hospital's share (or drop, per `dropout_rate`)."""
    config, server_round, _ = wire.read_round_config(msg.content[wire.CONFIG])
    hospital = int(context.node_config["partition-id"])
    stage = dropout_stage(config.seed, server_round, hospital, config.dropout_rate)
    context.state[_DROPOUT_STATE] = ConfigRecord({"stage": stage or ""})
    _maybe_drop(context, "train")
    reply = handle_train(msg, context, simulated_data)
    if wire.METRICS in reply.content:
        # Which worker process served this hospital, and how many models it has built so far:
        # lets tests and benchmarks check that the base model is loaded once per worker.
        reply.content[wire.METRICS]["worker-pid"] = os.getpid()
        reply.content[wire.METRICS]["model-loads"] = model_cache.load_count
    return reply


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate on this simulated hospital's validation split."""
    return handle_evaluate(msg, context, simulated_data)


@client_app.train("share_keys")
def share_keys(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 2."""
    _maybe_drop(context, SHARE_KEYS)
    return handle_secagg_stage(msg, context, SHARE_KEYS)


@client_app.train("masked_update")
def masked_update(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 3."""
    _maybe_drop(context, MASKED_UPDATE)
    return handle_secagg_stage(msg, context, MASKED_UPDATE)


@client_app.train("consistency_check")
def consistency_check(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 4: sign the survivor set."""
    _maybe_drop(context, CONSISTENCY_CHECK)
    return handle_secagg_stage(msg, context, CONSISTENCY_CHECK)


@client_app.train("unmask")
def unmask(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 5."""
    _maybe_drop(context, UNMASK)
    return handle_secagg_stage(msg, context, UNMASK)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Coordinator of a `flwr run` simulation: labels are read from the pooled data."""
    config = prepare_config(RunConfig.from_flower(dict(context.run_config)))
    run_federation(grid, config, context.run_id)
