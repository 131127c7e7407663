"""The hospital's Flower ClientApp (Message API): local DP training and evaluation.

`handle_train` and `handle_evaluate` do the work; the data source is passed in, so the same
handlers serve a real hospital (its file, from the node config) and a simulated one (its share
of a data set, chosen by `simulation/`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedward.client.model_cache import cached_model, cached_tokenizer
from fedward.client.secagg import SecAggClientSession
from fedward.client.site import Site
from fedward.client.trainer import HistoryEntry, evaluate, train_locally
from fedward.common import wire
from fedward.common.config import RunConfig
from fedward.common.data import EncodedDataset
from fedward.common.errors import DataError, FedwardError, SecAggError
from fedward.common.secagg import MASKED_UPDATE, SHARE_KEYS, UNMASK, pack_bits
from fedward.common.tasks import task_named

log = logging.getLogger(__name__)

DP_STATE = "fedward.dp"  # node-state record holding the accountant history within a run
SECAGG_STATE = "fedward.secagg"  # this round's SecAgg+ session (secrets stay on this node)
SECAGG_UPDATE = "fedward.secagg.update"  # this round's update until it is masked


@dataclass
class HospitalData:
    """One hospital's examples, already split; they never leave the hospital."""

    name: str
    train: list
    val: list
    source: str = ""  # where the data came from (file path, or a description in simulation)


#: Loads a hospital's data for a run: (config, context) -> HospitalData.
DataSource = Callable[[RunConfig, Context], HospitalData]
#: Opens a real hospital's policy, ledger and audit log for one request (client/site.py).
SiteOpener = Callable[[Context], Site]


def hospital_name(context: Context) -> str:
    """The name a hospital reports: node config 'hospital-name', else its simulation index."""
    config = context.node_config
    if "hospital-name" in config:
        return str(config["hospital-name"])
    if "partition-id" in config:
        return f"hospital-{config['partition-id']}"
    return f"node-{context.node_id}"


def encode(examples: list, config: RunConfig, tokenizer) -> EncodedDataset:
    """Token ids and label ids for the run's task."""
    return task_named(config.task).encode(
        examples, config.labels or [], tokenizer, config.max_length
    )


def handle_train(
    msg: Message, context: Context, load_data: DataSource, open_site: SiteOpener | None = None
) -> Message:
    """Train the received global adapter on this hospital's data; reply with the update.

    With `open_site` (a real hospital) the site policy judges the request before any data is
    read, the privacy ledger before the first step, and the update is recorded before it leaves
    (see client/site.py). Simulation passes none and keeps the DP history in the node state.
    """
    config, server_round, run_id = wire.read_round_config(msg.content[wire.CONFIG])
    name = hospital_name(context)
    site = None
    try:
        global_arrays = wire.record_to_arrays(msg.content[wire.ARRAYS])
        result = None
        if open_site is not None:
            site = open_site(context)
            config, result = site.admit(config, run_id, server_round, global_arrays)
        if result is None:  # None unless a resumed run repeats a round already released
            data = load_data(config, context)
            tokenizer = cached_tokenizer(config.model)
            model = cached_model(config, len(config.labels or []))
            dataset = encode(data.train, config, tokenizer)
            if site is None:
                history = _read_history(context)
            else:
                history = site.run_history(run_id, server_round)
                site.check_budget(config, len(dataset))
            result = train_locally(
                model,
                dataset,
                config,
                global_arrays,
                history,
                pad_id=tokenizer.pad_token_id,
                who=name,
            )
            if site is not None:
                site.record(config, run_id, server_round, result, global_arrays)
    except FedwardError as exc:
        log.warning("%s refused round %d: %s", name, server_round, exc)
        if site is not None:
            site.refused(run_id, server_round, "train", exc)
        return _refusal(msg, name, exc)
    _write_history(context, result.history)

    metrics = {"num-examples": result.num_examples, "train-loss": result.train_loss}
    if result.epsilon_spent is not None:
        metrics["epsilon"] = result.epsilon_spent
        metrics["noise-multiplier"] = result.plan.noise_multiplier
    content = RecordDict(
        {wire.METRICS: MetricRecord(metrics), wire.INFO: ConfigRecord({"hospital": name})}
    )
    if config.secure_aggregation:
        # The update stays here; only its masked form leaves, in the masked_update stage.
        try:
            content[wire.SECAGG] = _start_secure_aggregation(
                msg, context, run_id, server_round, result
            )
        except SecAggError as exc:
            log.warning("%s: secure aggregation refused in round %d: %s", name, server_round, exc)
            return _refusal(msg, name, exc)
    else:
        content[wire.ARRAYS] = wire.arrays_to_record(result.delta)
    return Message(content=content, reply_to=msg)


def handle_secagg_stage(msg: Message, context: Context, stage: str) -> Message:
    """One of the SecAgg+ stages after the first: share keys, masked update, unmask."""
    name = hospital_name(context)
    state = context.state.get(SECAGG_STATE)
    request = wire.records_to_payload(msg.content[wire.SECAGG])
    try:
        if state is None:
            raise SecAggError(
                f"node {context.node_id}, stage {stage}: no secure-aggregation round in progress"
            )
        session = SecAggClientSession.from_state(bytes(state["session"]))
        if stage == SHARE_KEYS:
            reply = session.share_keys(request)
        elif stage == MASKED_UPDATE:
            update = context.state[SECAGG_UPDATE]
            reply = session.masked_update(
                request, update["delta"].numpy(), int(update["weight"].numpy()[0])
            )
            # Uniform modulo 2**modulus_bits: send that many bits per value, not 64.
            reply["masked_update"] = pack_bits(
                reply["masked_update"], session.params["modulus_bits"]
            )
        else:
            reply = session.unmask(request)
    except SecAggError as exc:
        log.warning("%s: %s", name, exc)
        return _refusal(msg, name, exc)
    if stage == UNMASK:
        context.state.pop(SECAGG_STATE, None)
        context.state.pop(SECAGG_UPDATE, None)
    else:
        context.state[SECAGG_STATE] = ConfigRecord({"session": session.to_state()})
    if stage == MASKED_UPDATE:
        context.state.pop(SECAGG_UPDATE, None)  # the update is no longer needed in any form
    payload, vector = wire.payload_to_records(reply)
    content = RecordDict({wire.SECAGG: payload, wire.INFO: ConfigRecord({"hospital": name})})
    if vector is not None:
        content[wire.ARRAYS] = vector
    return Message(content=content, reply_to=msg)


def _start_secure_aggregation(msg, context, run_id, server_round, result) -> ConfigRecord:
    session = SecAggClientSession(context.node_id, run_id, server_round)
    reply = session.advertise_keys(wire.records_to_payload(msg.content[wire.SECAGG]))
    context.state[SECAGG_STATE] = ConfigRecord({"session": session.to_state()})
    context.state[SECAGG_UPDATE] = ArrayRecord(
        {
            "delta": Array(wire.flatten(result.delta)),
            "weight": Array(np.array([result.num_examples], dtype=np.int64)),
        }
    )
    payload, _ = wire.payload_to_records(reply)
    return payload


def handle_evaluate(
    msg: Message, context: Context, load_data: DataSource, open_site: SiteOpener | None = None
) -> Message:
    """Evaluate the received global adapter on this hospital's validation split.

    With `open_site` (a real hospital) the site policy must accept the run first.
    """
    config, server_round, run_id = wire.read_round_config(msg.content[wire.CONFIG])
    name = hospital_name(context)
    site = None
    try:
        if open_site is not None:
            site = open_site(context)
            config = site.check_policy(config)
        data = load_data(config, context)
        tokenizer = cached_tokenizer(config.model)
        model = cached_model(config, len(config.labels or []))
        dataset = encode(data.val, config, tokenizer)
        arrays = wire.record_to_arrays(msg.content[wire.ARRAYS])
        metrics = evaluate(model, dataset, config, arrays, tokenizer.pad_token_id, config.labels)
    except FedwardError as exc:
        log.warning("%s could not evaluate round %d: %s", name, server_round, exc)
        if site is not None:
            site.refused(run_id, server_round, "evaluate", exc)
        return _refusal(msg, name, exc)
    metrics["num-examples"] = metrics.pop("num_examples")
    content = RecordDict(
        {
            wire.METRICS: MetricRecord({key: float(value) for key, value in metrics.items()}),
            wire.INFO: ConfigRecord({"hospital": name}),
        }
    )
    return Message(content=content, reply_to=msg)


def open_site(context: Context) -> Site:
    """This hospital's site policy, privacy ledger and audit log, named by its node config."""
    return Site.open(context.node_config, hospital_name(context))


def load_site_data(config: RunConfig, context: Context) -> HospitalData:
    """A real hospital's data: the file named by the node config's 'data-path'."""
    path = context.node_config.get("data-path")
    if not path:
        raise DataError(
            "this node has no 'data-path' in its node config; start it with "
            "`fedward client start --data PATH`"
        )
    return read_hospital_file(Path(str(path)), config, hospital_name(context))


def read_hospital_file(path: Path, config: RunConfig, name: str) -> HospitalData:
    """Read and split a hospital's own data file for the run's task."""
    task = task_named(config.task)
    examples = task.read(path, config.text_column, config.label_column)
    train, val = task.split(examples, config.val_fraction, config.seed)
    return HospitalData(name, train, val, str(path))


def _read_history(context: Context) -> list[HistoryEntry]:
    record = context.state.get(DP_STATE)
    if record is None:
        return []
    return [tuple(entry) for entry in json.loads(str(record["history"]))]


def _write_history(context: Context, history: list[HistoryEntry]) -> None:
    context.state[DP_STATE] = ConfigRecord({"history": json.dumps(history)})


def _refusal(msg: Message, name: str, exc: FedwardError) -> Message:
    content = RecordDict(
        {
            wire.REFUSAL: ConfigRecord({"kind": type(exc).__name__, "reason": str(exc)}),
            wire.INFO: ConfigRecord({"hospital": name}),
        }
    )
    return Message(content=content, reply_to=msg)


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower entry point: train on the hospital's own data, under its policy and ledger."""
    return handle_train(msg, context, load_site_data, open_site)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Flower entry point: evaluate the global adapter on the hospital's validation split."""
    return handle_evaluate(msg, context, load_site_data, open_site)


@app.train("share_keys")
def share_keys(msg: Message, context: Context) -> Message:
    """Flower entry point: SecAgg+ stage 2."""
    return handle_secagg_stage(msg, context, SHARE_KEYS)


@app.train("masked_update")
def masked_update(msg: Message, context: Context) -> Message:
    """Flower entry point: SecAgg+ stage 3."""
    return handle_secagg_stage(msg, context, MASKED_UPDATE)


@app.train("unmask")
def unmask(msg: Message, context: Context) -> Message:
    """Flower entry point: SecAgg+ stage 4."""
    return handle_secagg_stage(msg, context, UNMASK)
