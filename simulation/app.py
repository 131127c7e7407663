"""Flower apps for simulation: hospitals read their share of a pooled or synthetic data set.

Both apps come from the factories that make the deployment's (`build_client_app` in
client/app.py, `build_server_app` in server/app.py); only the data source, the site and the
simulated dropouts differ. A real hospital runs `fedward.client.app:app`, which reads the file
named in its node config.
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedward.client import model_cache
from fedward.client.app import DataSource, build_client_app, hospital_name
from fedward.common.config import RunConfig
from fedward.common.protocol import wire
from fedward.common.secagg import MASKED_UPDATE, SHARE_KEYS, UNMASK
from fedward.server.app import build_server_app
from fedward.simulation.hospitals import SimulatedSite, prepare_config, simulated_data

#: Where a simulated hospital can drop out of a round (`RunConfig.dropout_rate`).
DROPOUT_STAGES = ("train", SHARE_KEYS, MASKED_UPDATE, UNMASK)
_DROPOUT_STATE = "fedward.simulated-dropout"


#: Within a round, each simulated hospital appends its stages here, under the output folder,
#: for `fedward simulate`'s progress bar (`describe_progress`). The CLI creates the file before
#: the run and deletes it after; where it does not exist (`flwr run .`, the privacy audit),
#: nothing is written.
PROGRESS_FILE = ".progress.jsonl"


def note_progress(out: str, server_round: int, hospital: str, stage: str) -> None:
    """Append one stage of one hospital to an existing progress file (a line under PIPE_BUF:
    appends from several worker processes do not interleave). Progress is a convenience: a
    failure to write is ignored."""
    path = Path(out) / PROGRESS_FILE
    if not path.is_file():
        return
    line = json.dumps({"round": server_round, "hospital": hospital, "stage": stage}) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as file:
            file.write(line)
    except OSError:
        pass


#: The order in which `describe_progress` lists stages: the work of a round as it happens.
STAGES = (
    "loading the model",
    "encoding",
    "caching the frozen prefix",
    "training",
    "epoch",  # "epoch 2/3", one per epoch (client/trainer.py)
    "summing noisy gradients",
    "trained",
    "refused",
    "evaluating",
    "evaluated",
)
#: Stages that end a hospital's part in a round: counted, not listed.
DONE_STAGES = ("trained", "refused", "evaluated")


def describe_progress(lines: list[str]) -> str:
    """The latest round's progress in words, from the progress file's lines: which hospitals
    are loading the model (a worker's first task), encoding, caching the frozen prefix, in
    which epoch of their training, or evaluating, and how many are done ('' before any).

    Example:
        >>> describe_progress(['{"round": 1, "hospital": "hospital-1", "stage": "epoch 2/3"}'])
        'round 1: epoch 2/3: hospital-1'
    """
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written
    if not events:
        return ""
    current = max(event["round"] for event in events)
    stages: dict[str, str] = {}
    for event in events:
        if event["round"] == current:
            stages[event["hospital"]] = event["stage"]
    parts = []
    for stage in sorted(set(stages.values()), key=_stage_order):
        names = sorted(
            (n for n, held in stages.items() if held == stage), key=lambda n: (len(n), n)
        )
        if stage in DONE_STAGES:
            parts.append(f"{len(names)} {stage}")
        else:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            parts.append(f"{stage}: {shown}")
    return f"round {current}: " + "; ".join(parts)


def _stage_order(stage: str) -> tuple[int, int]:
    """Where a stage comes in `STAGES`; epochs by number, the latest first; unknown ones last."""
    kind, _, count = stage.partition(" ")
    if kind == "epoch":
        done = count.split("/")[0]
        return STAGES.index("epoch"), -int(done) if done.isdigit() else 0
    return (STAGES.index(stage) if stage in STAGES else len(STAGES)), 0


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
        watched = stage in ("train", "evaluate")
        if watched:
            server_round = int(msg.content[wire.CONFIG].get(wire.ROUND_KEY, 0))
            name = hospital_name(context)
            out = settings_of(context).local.out
            first = model_cache.load_count == 0  # this worker loads the base model first
            doing = {"train": "training", "evaluate": "evaluating"}[stage]
            note_progress(out, server_round, name, "loading the model" if first else doing)
        reply = handler(msg, context)
        if watched:
            done = {"train": "trained", "evaluate": "evaluated"}[stage]
            if wire.REFUSAL in reply.content:
                done = "refused"
            note_progress(out, server_round, name, done)
        if stage == "train" and wire.METRICS in reply.content:
            # Which worker process served this hospital, and how many models it has built so
            # far: lets tests and benchmarks check that the base model is loaded once per worker.
            reply.content[wire.METRICS]["worker-pid"] = os.getpid()
            reply.content[wire.METRICS]["model-loads"] = model_cache.load_count
        return reply

    def open_progress(msg: Message, context: Context):
        server_round = int(msg.content[wire.CONFIG].get(wire.ROUND_KEY, 0))
        out, name = settings_of(context).local.out, hospital_name(context)
        return functools.partial(note_progress, out, server_round, name)

    return build_client_app(data_source, open_simulated_site, simulate_stage, open_progress)


#: `flwr run .` (pyproject's [tool.flwr.app.components]); `fedward simulate` builds its own
#: pair with the settings it was given (simulation/runner.py).
client_app = build_simulation_client_app()
server_app = build_server_app(prepare=prepare_config)
