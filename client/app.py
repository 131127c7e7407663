"""The hospital's Flower ClientApp (Message API): local DP training and evaluation.

`build_client_app(load_data, open_site)` makes the ClientApp of both runtimes: a real hospital
(`app` below: its file from the node config, its policy, ledger and audit log as `Site`) and a
simulated one (simulation/app.py: its share of a data set, a `SimulatedSite`). The handlers only
see the run spec a message carries; the site turns it into the config this hospital trains with,
adding its own local settings.

What a reply may carry is fixed here: a refusal is a reason code with numbers
(common/protocol/reasons.py), never an exception's text; a train reply carries the update (masked
with secure aggregation) and epsilon; without secure aggregation, the update's weight (the one the
site policy declares, never a count); the example count and training loss only in simulation;
an evaluate reply carries what the site releases (deployed: DP-noised counts, charged).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedward.client.hospital_data import (
    DataSource,
    HospitalData,
    check_data_vocabulary,
    encode,
    example_labels,
    largest_patient,
    read_hospital_file,
    with_run_labels,
)
from fedward.client.model_cache import cached_model, cached_tokenizer, initial_arrays
from fedward.client.own_model import own_model
from fedward.client.prefix_cache import CacheOptions
from fedward.client.privacy.noisy_sum import NOISY_SUM, distributed_update
from fedward.client.privacy.release import Predictions
from fedward.client.replies import hospital_name, log_refusal, refusal, round_identity
from fedward.client.secagg.stages import (
    SECAGG_STAGES,
    SECAGG_STATE,
    SECAGG_UPDATE,
    advertise_keys,
    distributed,
    handle_secagg_stage,
    secure_round_terms,
)
from fedward.client.site import START_ROUND, Site, check_starting_arrays
from fedward.client.site.protocol import HospitalSite, SiteOpener
from fedward.client.trainer import (
    Progress,
    TrainResult,
    predict,
    train_locally,
)
from fedward.common.config import (
    LocalRun,
    PrivacySpec,
    RunSpec,
    SecAggSpec,
)
from fedward.common.errors import ConfigError, DataError
from fedward.common.protocol import wire

log = logging.getLogger(__name__)

#: The hospital's data (client/hospital_data.py) and own model (client/own_model.py) lived
#: here; their old import paths still work.
__all__ = [
    "SECAGG_STATE",
    "SECAGG_UPDATE",
    "DataSource",
    "HospitalData",
    "HospitalSite",
    "build_client_app",
    "check_data_vocabulary",
    "encode",
    "example_labels",
    "handle_evaluate",
    "handle_secagg_stage",
    "handle_train",
    "hospital_name",
    "largest_patient",
    "load_site_data",
    "open_site",
    "own_model",
    "read_hospital_file",
    "secure_round_terms",
    "with_run_labels",
]


#: Handles one stage of a round for a message: (message, context) -> reply.
StageHandler = Callable[[Message, Context], Message]
#: Runs around each stage ("train", "evaluate", or a SecAgg+ stage): (stage, message, context,
#: handler) -> reply. Simulation uses it to drop hospitals on purpose and to report its workers.
StageHook = Callable[[str, Message, Context, StageHandler], Message]
#: Where a hospital tells its progress within a training round (encoding, each epoch):
#: (message, context) -> `Progress`. A deployed hospital logs it (`log_progress`); a simulated
#: one appends it to `fedward simulate`'s progress file (simulation/app.py).
ProgressOpener = Callable[[Message, Context], Progress]


def log_progress(msg: Message, context: Context) -> Progress:
    """A deployed hospital's progress within a round: lines in its own log.

    Args:
        msg: The train request (its round number goes into each line).
        context: The node's context (its hospital name goes into each line).

    Returns:
        A `Progress` that logs each stage it is told at INFO level.
    """
    name = hospital_name(context)
    server_round = round_identity(msg)[1]
    return lambda stage: log.info("%s: round %d: %s", name, server_round, stage)


def handle_train(
    msg: Message,
    context: Context,
    load_data: DataSource,
    open_site: SiteOpener,
    open_progress: ProgressOpener = log_progress,
) -> Message:
    """Train the received global adapter on this hospital's data; reply with the update.

    The site judges the run spec before any data is read; the privacy budget is the first thing
    judged with the data, before every check whose answer depends on the records (the example
    count, the vocabulary, the labels), so that such a refusal is charged like a trained round;
    the site records the update before it leaves (see client/site/gates.py).

    Args:
        msg: The coordinator's train request: the run spec, round and run id (its config
            record), the global adapter (its arrays) and, with secure aggregation, the first
            SecAgg+ stage's request.
        context: The node's context: its node config (the hospital's name) and its state (the
            SecAgg+ session and the update kept for the masked stage).
        load_data: Loads this hospital's data for the config the site admitted.
        open_site: Opens this hospital's site (policy, ledger, audit log; or a simulated one).
        open_progress: Where this round's progress goes ("encoding", each epoch); by default
            this hospital's own log.

    Returns:
        The train reply: its metrics (the update's weight without secure aggregation, epsilon
        under DP; exact figures in simulation only) and the update, in the clear or kept in
        the node state for the masked stage (with the advertised keys in the reply). An error
        while admitting, loading, judging or training is not raised: it is answered with a
        refusal that carries only its reason code.
    """
    name = hospital_name(context)
    spec, server_round, run_id = round_identity(msg)
    site = None
    coverage: dict[str, float] = {}
    try:
        if spec is None:
            raise ConfigError("the train request's run spec is invalid")
        global_arrays = wire.record_to_arrays(msg.content[wire.ARRAYS])
        site = open_site(context)
        if spec.model.init_adapter and server_round == 1:
            # The pin first (the model is built from pinned files only), then the coordinator's
            # first global adapter against it; both before the ledger opens the data set. A
            # deployed hospital first asked at a later round checks it there (`Site.admit`).
            _check_start(site, spec, global_arrays, name)
        config, result = site.admit(spec, run_id, server_round, global_arrays)
        secagg = None
        if spec.secagg.secure_aggregation:  # keys, cohort and threshold are judged before training
            secagg = advertise_keys(
                msg, context, run_id, server_round, site.secagg_identity(), config.spec.privacy
            )
        if result is None:  # None unless a resumed run repeats a round already released
            progress = open_progress(msg, context)
            history = site.run_history(run_id, server_round)
            data = with_run_labels(load_data(config, context), config.spec.task.labels)
            result, coverage = _train_on(data, config, site, global_arrays, history, name, progress)
            site.record(config.spec.privacy, run_id, server_round, result, global_arrays)
    except Exception as exc:  # whatever it was, only a code leaves
        log_refusal(name, "train", server_round, exc)
        if site is not None:
            site.refused(run_id, server_round, "train", exc)
        return refusal(msg, name, exc)

    return _train_reply(
        msg, context, name, result, coverage, config.spec.privacy, config.spec.secagg, site, secagg
    )


def _check_start(site: HospitalSite, spec: RunSpec, arrays: dict, name: str) -> None:
    """The pin first (the model is built from the policy's pinned files only), then `arrays`,
    the coordinator's first adapter, against the starting adapter as this hospital builds it."""
    pinned = site.check_policy(spec).spec
    initial = initial_arrays(pinned.model, pinned.task, pinned.training.seed)
    check_starting_arrays(initial, arrays, name)


def _train_on(
    data: HospitalData,
    config: LocalRun,
    site: HospitalSite,
    global_arrays: dict[str, np.ndarray],
    history: list,
    name: str,
    progress: Progress,
) -> tuple[TrainResult, dict[str, float]]:
    """The round's training on this hospital's data, behind the budget gate: the update, and
    the data's coverage by the tokenizer (the unknown-token rate, reported in simulation)."""
    tokenizer = cached_tokenizer(config.spec.model.name)
    model = cached_model(config.spec.model, config.spec.task, config.spec.training.seed)
    progress("encoding")
    # Encoded before the gate so that the gate plans on what is trained (NER cuts long
    # sentences; patient-level DP counts patients); encoding refuses nothing (records with
    # labels the run does not list are already left out).
    dataset = encode(
        data.train, config.spec.task, tokenizer, per_patient=config.spec.privacy.per_patient
    )
    # the budget gate: charged from here on
    plan = site.check_budget(config.spec.privacy, config.spec.training, dataset)
    unknown = check_data_vocabulary(
        data, tokenizer, config.spec.model.name, config.spec.task.max_unknown_rate
    )
    train = distributed_update if distributed(config.spec.privacy) else train_locally
    result = train(
        model,
        dataset,
        config,
        global_arrays,
        history,
        pad_id=tokenizer.pad_token_id,
        who=name,
        plan=plan,
        on_progress=progress,
    )
    result.largest_patient = largest_patient(data.train)
    return result, {"unknown-rate": unknown}


def _train_reply(
    msg: Message,
    context: Context,
    name: str,
    result: TrainResult,
    coverage: dict[str, float],
    privacy: PrivacySpec,
    secagg_spec: SecAggSpec,
    site: HospitalSite,
    secagg: ConfigRecord | None,
) -> Message:
    """The train reply: what the site may release of `result`, and the update itself in the
    clear, or (`secagg`: this round's advertised keys) kept here for its masked stage."""
    metrics: dict[str, float] = {}
    if site.releases_exact_metrics:  # simulation only: the exact training count
        metrics["num-examples"] = result.num_examples
    if not secagg_spec.secure_aggregation:
        # A clear update carries its weight in the average; with SecAgg+ the weight travels
        # only inside the masked vector. Deployed, it is the policy's, never the count.
        metrics["weight"] = update_weight(result, secagg_spec, site)
    if site.releases_exact_metrics:
        metrics["train-loss"] = result.train_loss  # not DP: simulation only
    if site.releases_exact_metrics:  # the unknown-token rate (simulation's report); not DP
        metrics.update(coverage)
        if result.largest_patient is not None:  # group privacy of a record-level run, per patient
            metrics["largest-patient"] = result.largest_patient
    if result.epsilon_spent is not None:
        # Deployed: the run's epsilon, which bounds what the run spends here (the plan is
        # calibrated to it, the ledger enforces it). The accountant's exact figure after this
        # round depends on ceil(training count / batch size), so it stays in the ledger.
        exact = site.releases_exact_metrics
        metrics["epsilon"] = result.epsilon_spent if exact else privacy.target_epsilon
        if site.releases_exact_metrics:
            metrics["noise-multiplier"] = result.plan.noise_multiplier
    content = RecordDict(
        {wire.METRICS: MetricRecord(metrics), wire.INFO: ConfigRecord({"hospital": name})}
    )
    if secagg is not None:
        # The update stays here; only its masked form leaves, in the masked_update stage.
        content[wire.SECAGG] = secagg
        update = result.delta[NOISY_SUM] if distributed(privacy) else wire.flatten(result.delta)
        context.state[SECAGG_UPDATE] = ArrayRecord(
            {
                "delta": Array(update),
                "weight": Array(
                    np.array([update_weight(result, secagg_spec, site)], dtype=np.int64)
                ),
            }
        )
    else:
        content[wire.ARRAYS] = wire.arrays_to_record(result.delta)
    return Message(content=content, reply_to=msg)


def update_weight(result: TrainResult, secagg: SecAggSpec, site: HospitalSite) -> int:
    """The weight this hospital's update carries in the average (inside the masked vector with
    secure aggregation, in the clear without), capped at the run's `secagg_max_weight`.

    Deployed, it is the weight the site policy declares (`aggregation_weight`, default 1: every
    hospital counts the same), never the training count: a count, even masked, is told by the
    sums of rotating cohorts (issue 40: four rounds of three of four hospitals gave every
    hospital's exact count, and with a label left out, the count of one diagnosis). A simulated
    hospital, which reports its exact count anyway, is weighted by it.

    A weight above the limit is not refused: the refusal would answer "are there more than N
    training records?" for any N the coordinator chose (issue 28).

    Args:
        result: This round's training result (its example count weighs a simulated update).
        secagg: The run's secure-aggregation group (`secagg_max_weight`).
        site: The hospital's site: its declared weight, or whether it reports exact counts.

    Returns:
        The weight, at most `secagg_max_weight`.
    """
    weight = result.num_examples if site.releases_exact_metrics else site.update_weight()
    return min(weight, secagg.secagg_max_weight)


def handle_evaluate(
    msg: Message, context: Context, load_data: DataSource, open_site: SiteOpener
) -> Message:
    """Evaluate the received adapter on this hospital's validation split, if the site releases
    it: the site admits (and charges) the request before any data is read and decides what
    leaves; a refusal after admission keeps the charge.

    Round 0 (`START_ROUND`) is an evaluate-only run's one evaluation: the adapter must be the
    run's starting adapter as this hospital builds it from its own pinned files (the policy's
    `init_adapter` pin, else the fresh adapter of the run's seed), checked before anything is
    charged or read, so an evaluate-only run scores nothing the hospital did not approve.

    At the run's last round the hospital's own model is made first (`keep_own_model`); that
    never changes whether the evaluation is answered.

    Args:
        msg: The coordinator's evaluate request: the run spec, round and run id (its config
            record) and the adapter to score (its arrays).
        context: The node's context (its node config names the hospital).
        load_data: Loads this hospital's data for the config the site admitted.
        open_site: Opens this hospital's site (policy, ledger, audit log; or a simulated one).

    Returns:
        The evaluate reply: the metrics the site releases on the validation split (deployed:
        DP-noised counts; in simulation also the exact unknown-token rate and, at the last
        round, the own model's alone / global / own figures). An error is not raised: it is
        answered with a refusal that carries only its reason code.
    """
    name = hospital_name(context)
    spec, server_round, run_id = round_identity(msg)
    personal: dict[str, float] = {}
    if spec is not None and server_round == spec.federation.rounds:
        personal = keep_own_model(msg, context, load_data, open_site, spec, run_id)
    site = None
    try:
        if spec is None:
            raise ConfigError("the evaluate request's run spec is invalid")
        site = open_site(context)
        arrays = wire.record_to_arrays(msg.content[wire.ARRAYS])
        if server_round == START_ROUND:  # the pin first, then the adapter against it
            _check_start(site, spec, arrays, name)
        config = site.admit_evaluation(spec, run_id, server_round)
        tokenizer = cached_tokenizer(config.spec.model.name)
        model = cached_model(config.spec.model, config.spec.task, config.spec.training.seed)
        data = with_run_labels(load_data(config, context), config.spec.task.labels)
        share = check_data_vocabulary(
            data, tokenizer, config.spec.model.name, config.spec.task.max_unknown_rate
        )
        dataset = encode(
            data.val, config.spec.task, tokenizer, per_patient=config.spec.privacy.per_patient
        )
        cache = CacheOptions.of(config)
        pad = tokenizer.pad_token_id
        loss, true_ids, pred_ids = predict(
            model, dataset, arrays, pad, config.local.device, cache, who=name
        )
        labels = list(config.spec.task.labels or [])
        predictions = Predictions(config.spec.task.definition, loss, true_ids, pred_ids, labels)
        metrics = site.release_evaluation(run_id, server_round, predictions)
        if site.releases_exact_metrics:
            metrics["unknown-rate"] = share
            metrics.update(personal)  # simulation only: alone / global / own, not DP
    except Exception as exc:  # whatever it was, only a code leaves
        log_refusal(name, "evaluate", server_round, exc)
        if site is not None:
            site.refused(run_id, server_round, "evaluate", exc)
        return refusal(msg, name, exc)
    content = RecordDict(
        {
            wire.METRICS: MetricRecord({key: float(value) for key, value in metrics.items()}),
            wire.INFO: ConfigRecord({"hospital": name}),
        }
    )
    return Message(content=content, reply_to=msg)


def keep_own_model(
    msg: Message,
    context: Context,
    load_data: DataSource,
    open_site: SiteOpener,
    spec: RunSpec,
    run_id: str,
) -> dict[str, float]:
    """At the run's last round: this hospital's own model, from the final global adapter and
    its own notes, kept at home (`site.keep_own_model`), with its alone / global / own report.

    Whatever happens here changes nothing in the reply of a deployed hospital: the own model is
    not DP and never leaves; a failure is logged here and the evaluation goes on. The figures
    are returned for a simulated hospital's reply only (`releases_exact_metrics`).

    Args:
        msg: The last round's evaluate request; its arrays are the final global adapter.
        context: The node's context (its node config names the hospital).
        load_data: Loads this hospital's data for the config its policy gives the run.
        open_site: Opens this hospital's site.
        spec: The run spec the request carries (already validated).
        run_id: The run's id: where the own model is kept.

    Returns:
        "personal-alone", "personal-global" and "personal-own" (the task's primary metric on
        the validation notes) for a simulated hospital; empty when deployed, when the local
        settings ask for no own model, or when making it failed.
    """
    name = hospital_name(context)
    try:
        site = open_site(context)
        config = site.check_policy(spec)  # the hospital's own rules first, before any record
        if not config.local.own_model:
            return {}
        data = with_run_labels(load_data(config, context), config.spec.task.labels)
        arrays = wire.record_to_arrays(msg.content[wire.ARRAYS])
        own = own_model(data, config, arrays)
        site.keep_own_model(run_id, own)
    except Exception as exc:  # the hospital's own log only; the evaluation goes on
        log.warning("%s: no own model for run %s: %s", name, run_id, exc)
        return {}
    if not site.releases_exact_metrics:
        return {}
    return {
        "personal-alone": own.report.alone,
        "personal-global": own.report.global_,
        "personal-own": own.report.own,
    }


def open_site(context: Context) -> Site:
    """This hospital's site policy, privacy ledger and audit log, named by its node config.

    Args:
        context: The SuperNode's context; its node config names the policy, ledger and
            audit log, and the hospital (`hospital_name`).

    Returns:
        The hospital's `Site`, its policy read now.

    Raises:
        PolicyError: a missing node-config key or an unusable policy (`Site.open`).
    """
    return Site.open(context.node_config, hospital_name(context))


def build_client_app(
    load_data: DataSource,
    open_site: SiteOpener,
    around_stage: StageHook | None = None,
    open_progress: ProgressOpener = log_progress,
) -> ClientApp:
    """The ClientApp of one runtime: the same handlers for every stage of a round, fed by
    `load_data`, judged by the site `open_site` returns, telling its progress within a training
    round to `open_progress`'s sink.

    Args:
        load_data: Loads a hospital's data for an admitted run (`load_site_data` deployed;
            a simulated hospital's share of a data set in simulation).
        open_site: Opens the hospital's site for each request (`open_site` deployed, a
            `SimulatedSite` in simulation).
        around_stage: Runs around each stage's handler ("train", "evaluate" or a SecAgg+
            stage); None calls the handlers directly.
        open_progress: Where a training round's progress goes; by default the hospital's log.

    Returns:
        The ClientApp, with handlers for train, evaluate and each SecAgg+ stage after the
        first (registered as train actions).
    """
    handlers: dict[str, StageHandler] = {
        "train": lambda msg, context: handle_train(
            msg, context, load_data, open_site, open_progress
        ),
        "evaluate": lambda msg, context: handle_evaluate(msg, context, load_data, open_site),
    }
    for stage in SECAGG_STAGES:
        handlers[stage] = functools.partial(_secagg_handler, stage=stage)

    def entry(stage: str) -> StageHandler:
        handler = handlers[stage]
        if around_stage is None:
            return handler
        return lambda msg, context: around_stage(stage, msg, context, handler)

    app = ClientApp()
    app.train()(entry("train"))
    app.evaluate()(entry("evaluate"))
    for stage in SECAGG_STAGES:
        app.train(stage)(entry(stage))
    return app


def _secagg_handler(msg: Message, context: Context, stage: str) -> Message:
    return handle_secagg_stage(msg, context, stage)


def load_site_data(config: LocalRun, context: Context) -> HospitalData:
    """A real hospital's data: the file named by the node config's 'data-path'.

    Args:
        config: The run's config as this hospital runs it: its task, its data schema (the
            columns) and the run's seed (the train / validation split).
        context: The SuperNode's context: its node config's 'data-path' and the hospital's
            name.

    Returns:
        The hospital's examples, split into training and validation.

    Raises:
        DataError: no 'data-path' in the node config, or a file the task cannot read
            (`read_hospital_file`).
    """
    path = context.node_config.get("data-path")
    if not path:
        raise DataError(
            "this node has no 'data-path' in its node config; start it with "
            "`fedward client start --data PATH`"
        )
    return read_hospital_file(
        Path(str(path)),
        config.spec.task,
        config.data_schema,
        config.spec.training.seed,
        hospital_name(context),
    )


#: The ClientApp of a real hospital (`flower-supernode` runs it; see client/deploy/supernode.py).
app = build_client_app(load_site_data, open_site)
