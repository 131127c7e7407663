"""Flower apps for simulation: hospitals read their share of a pooled or synthetic data set.

Both apps come from the factories that make the deployment's (`build_client_app` in
client/app.py, `build_server_app` in server/app.py); only the data source, the site and the
simulated dropouts differ. A real hospital runs `fedward.client.app:app`, which reads the file
named in its node config.
"""

from __future__ import annotations

import os
import random

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedward.client import model_cache
from fedward.client.app import DataSource, build_client_app
from fedward.common.config import RunConfig
from fedward.common.protocol import wire
from fedward.common.secagg import MASKED_UPDATE, SHARE_KEYS, UNMASK
from fedward.server.app import build_server_app
from fedward.simulation.hospitals import SimulatedSite, prepare_config, simulated_data

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


def build_simulation_client_app(
    settings: RunConfig | None = None, data_source: DataSource = simulated_data
) -> ClientApp:
    """The simulated hospitals' ClientApp: the hospital ClientApp (client/app.py) fed by the
    hospital's share of the data, with a `SimulatedSite` and simulated dropouts.

    `settings` are the simulation's own (hospitals, data, partition, dropout rate, device);
    None reads them from Flower's run config (`flwr run .`). `data_source` gives each hospital
    its data (the privacy audit adds canaries to one hospital's).
    """

    def settings_of(context: Context) -> RunConfig:
        return settings or RunConfig.from_flower(dict(context.run_config))

    def open_simulated_site(context: Context) -> SimulatedSite:
        return SimulatedSite(context, settings_of(context))

    def simulate_stage(stage: str, msg: Message, context: Context, handler) -> Message:
        if stage == "train":
            spec, server_round, _ = wire.read_round_config(msg.content[wire.CONFIG])
            hospital = int(context.node_config["partition-id"])
            rate = settings_of(context).simulation.dropout_rate
            planned = dropout_stage(spec.training.seed, server_round, hospital, rate)
            context.state[_DROPOUT_STATE] = ConfigRecord({"stage": planned or ""})
        if stage != "evaluate":
            _maybe_drop(context, stage)
        reply = handler(msg, context)
        if stage == "train" and wire.METRICS in reply.content:
            # Which worker process served this hospital, and how many models it has built so
            # far: lets tests and benchmarks check that the base model is loaded once per worker.
            reply.content[wire.METRICS]["worker-pid"] = os.getpid()
            reply.content[wire.METRICS]["model-loads"] = model_cache.load_count
        return reply

    return build_client_app(data_source, open_simulated_site, simulate_stage)


#: `flwr run .` (pyproject's [tool.flwr.app.components]); `fedward simulate` builds its own
#: pair with the settings it was given (simulation/runner.py).
client_app = build_simulation_client_app()
server_app = build_server_app(prepare=prepare_config)
