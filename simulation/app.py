"""Flower apps for simulation: hospitals read their share of a pooled or synthetic data set.

`flwr run .` (pyproject's [tool.flwr.app.components]) and `fedward simulate` both use these.
A real hospital uses `client.app:app` instead, which reads the file named in its node config.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.app import handle_evaluate, handle_secagg_stage, handle_train
from common.secagg import MASKED_UPDATE, SHARE_KEYS, UNMASK
from common.config import RunConfig
from server.app import run_federation
from simulation.hospitals import prepare_config, simulated_data

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this simulated hospital's share."""
    return handle_train(msg, context, simulated_data)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate on this simulated hospital's validation split."""
    return handle_evaluate(msg, context, simulated_data)


@client_app.train("share_keys")
def share_keys(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 2."""
    return handle_secagg_stage(msg, context, SHARE_KEYS)


@client_app.train("masked_update")
def masked_update(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 3."""
    return handle_secagg_stage(msg, context, MASKED_UPDATE)


@client_app.train("unmask")
def unmask(msg: Message, context: Context) -> Message:
    """SecAgg+ stage 4."""
    return handle_secagg_stage(msg, context, UNMASK)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Coordinator of a `flwr run` simulation: labels are read from the pooled data."""
    config = prepare_config(RunConfig.from_flower(dict(context.run_config)))
    run_federation(grid, config, context.run_id)
