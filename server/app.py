"""The coordinator's Flower ServerApp: drives the rounds, checkpoints, writes the history.

`run_federation` is the round loop; the ServerApp entry point reads the `RunConfig` from Flower's
run config and calls it. After every round, in this order: `<out>/checkpoint.npz` (the commit
point, see `server/resume.py`), the global adapter in PEFT format (`<out>/adapter/`, swapped in
atomically), `<out>/history.json` (rewritten atomically) and one record in the hash-chained audit
log `<out>/audit.jsonl`. A crash therefore leaves the last completed round intact, and
`RunConfig.resume` continues from it under the same fedward run id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedward.common.config import PrivacySpec, RunConfig
from fedward.common.errors import ConfigError
from fedward.common.files.atomic import write_json_atomic
from fedward.common.files.audit_log import AuditLog
from fedward.common.model import (
    ArraySpec,
    adapter_spec,
    build_model,
    check_adapter_arrays,
    get_adapter_arrays,
    save_adapter,
    set_adapter_arrays,
    starting_adapter_record,
)
from fedward.server.aggregation import Arrays
from fedward.server.resume import (
    arrays_digest,
    check_resumable,
    load_checkpoint,
    new_run_id,
    save_checkpoint,
)
from fedward.server.strategy import FedwardStrategy, TrainOutcome, finite_or_none

log = logging.getLogger(__name__)

#: The coordinator's audit log, inside the run's output folder.
AUDIT_LOG = "audit.jsonl"

#: Called after every round with the round's history row (the CLI draws its table from it).
RoundCallback = Callable[[dict], None]


@dataclass
class RunResult:
    """The outcome of a run: where things were written and what happened each round."""

    out: Path
    rounds: list[dict] = field(default_factory=list)
    arrays: Arrays | None = None  # the last round's global adapter (the checkpoint's)
    run_id: str = ""  # the fedward run id (the same across resumptions)
    kept_round: int | None = None  # the round whose adapter <out>/adapter holds (`kept_round`)

    @property
    def adapter_dir(self) -> Path:
        return self.out / "adapter"


def run_federation(
    grid: Grid, config: RunConfig, run_id: int | str, on_round: RoundCallback | None = None
) -> RunResult:
    """Run rounds 1..`config.spec.federation.rounds` of federated training and evaluation.

    `run_id` is Flower's run id (recorded, for tying logs together). Hospitals see the fedward
    run id instead: a new random one, or with `config.local.resume` the id of the run
    checkpointed in `config.local.out`, which then continues with the round after its last
    completed one.
    """
    if not config.spec.task.labels:
        raise ConfigError(
            "field 'labels': the run's label set is missing; list the labels in the run config"
        )
    out = Path(config.local.out)
    model = build_model(config.spec, len(config.spec.task.labels))
    spec = adapter_spec(model)
    audit = AuditLog(out / AUDIT_LOG)
    fedward_run_id, arrays, rounds, first_round = _start_or_resume(
        config, spec, get_adapter_arrays(model), audit, str(run_id)
    )
    strategy = FedwardStrategy(config, spec, fedward_run_id)
    result = RunResult(out=out, rounds=rounds, arrays=arrays, run_id=fedward_run_id)
    log.info(
        "run %s (Flower run %s): rounds %d..%d, %s, %d adapter tensors (%d values)",
        fedward_run_id,
        run_id,
        first_round,
        config.spec.federation.rounds,
        config.spec.model.name,
        len(spec),
        sum(a.size for a in arrays.values()),
    )

    if config.local.evaluate_only:
        return evaluate_only(grid, config, strategy, result, audit, str(run_id), on_round)
    for server_round in range(first_round, config.spec.federation.rounds + 1):
        started = time.monotonic()
        outcome = strategy.train_round(server_round, arrays, grid)
        if outcome.arrays is not None:
            arrays = outcome.arrays
        evaluation = strategy.aggregate_evaluate(
            server_round,
            grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, grid),
                timeout=config.local.round_timeout,
            ),
        )
        seconds = time.monotonic() - started
        secure = config.spec.secagg.secure_aggregation
        row = history_row(server_round, outcome, evaluation, config.spec.privacy, secure, seconds)
        result.rounds.append(row)
        result.arrays = arrays
        checkpoint_sha256 = save_checkpoint(
            out, fedward_run_id, config.spec, server_round, arrays, result.rounds
        )
        kept = kept_round(
            result.rounds,
            config.spec.task.definition.primary_metric,
            config.local.keep_adapter,
        )
        if kept == server_round:  # else <out>/adapter keeps the earlier, better round's
            set_adapter_arrays(model, arrays)
            save_adapter(
                model, out / "adapter", config.spec.task.labels, config.spec.task, config.spec.model
            )
        result.kept_round = kept
        write_history(out, config.flat(), fedward_run_id, result.rounds, str(run_id), first_round)
        audit.append(
            "round",
            **round_audit_fields(row, fedward_run_id, checkpoint_sha256, arrays_digest(arrays)),
        )
        if on_round is not None:
            on_round(row)
    audit.append("run.end", **_run_end_fields(result, str(run_id)))
    return result


def _start_or_resume(
    config: RunConfig, spec: list[ArraySpec], fresh: dict, audit: AuditLog, flower_run_id: str
) -> tuple[str, dict, list[dict], int]:
    """The fedward run id, the global adapter, the rounds so far and the first round to run:
    a new run from the `fresh` adapter, or with `config.local.resume` the run checkpointed in
    `config.local.out`, checked against the config and the adapter `spec`; audited."""
    if not config.local.resume:
        fedward_run_id = new_run_id()
        fields = run_start_fields(config, fedward_run_id, flower_run_id, fresh)
        audit.append("run.start", **fields)
        return fedward_run_id, fresh, [], 1
    checkpoint = load_checkpoint(Path(config.local.out))
    check_resumable(checkpoint, config.spec)
    check_adapter_arrays(spec, checkpoint.arrays)
    audit.append(
        "run.resume",
        run_id=checkpoint.run_id,
        flower_run_id=flower_run_id,
        completed_round=checkpoint.completed_round,
        checkpoint_sha256=checkpoint.sha256,
        adapter_sha256=arrays_digest(checkpoint.arrays),
    )
    log.info("run %s: resuming after round %d", checkpoint.run_id, checkpoint.completed_round)
    return (
        checkpoint.run_id,
        checkpoint.arrays,
        list(checkpoint.rounds),
        checkpoint.completed_round + 1,
    )


def _run_end_fields(result: RunResult, flower_run_id: str) -> dict:
    """The audit log's `run.end` record: rounds run, those that failed, the adapter kept."""
    return {
        "run_id": result.run_id,
        "flower_run_id": flower_run_id,
        "rounds": len(result.rounds),
        "failed_rounds": [row["round"] for row in result.rounds if row["status"] != "ok"],
        "adapter_sha256": arrays_digest(result.arrays),
        "kept_round": result.kept_round,
    }


#: The status of the one row of an evaluate-only run (round 0: nothing trained).
EVALUATED = "evaluated"


def evaluate_only(
    grid: Grid,
    config: RunConfig,
    strategy: FedwardStrategy,
    result: RunResult,
    audit: AuditLog,
    flower_run_id: str,
    on_round: RoundCallback | None,
) -> RunResult:
    """Federated evaluation without training (`LocalSettings.evaluate_only`): every hospital
    scores the starting adapter on its validation split once; the history's one row is round 0,
    status `EVALUATED`. No adapter is written: nothing new was made."""
    started = time.monotonic()
    evaluation = strategy.aggregate_evaluate(
        0,
        grid.send_and_receive(
            strategy.configure_evaluate(0, result.arrays, grid),
            timeout=config.local.round_timeout,
        ),
    )
    outcome = TrainOutcome(arrays=None, status=EVALUATED)
    seconds = time.monotonic() - started
    secure = config.spec.secagg.secure_aggregation
    row = history_row(0, outcome, evaluation, config.spec.privacy, secure, seconds)
    result.rounds.append(row)
    write_history(result.out, config.flat(), result.run_id, result.rounds, flower_run_id, 0)
    audit.append(
        "evaluation",
        run_id=result.run_id,
        flower_run_id=flower_run_id,
        global_metrics=row["global"],
        evaluation_refused=[
            {"hospital": name, "reason": reason}
            for name, reason in sorted(row["evaluation_refused"].items())
        ],
    )
    if on_round is not None:
        on_round(row)
    audit.append(
        "run.end",
        run_id=result.run_id,
        flower_run_id=flower_run_id,
        rounds=0,
        failed_rounds=[],
        adapter_sha256=arrays_digest(result.arrays),
    )
    return result


def kept_round(rounds: list[dict], score: str, rule: str = "best") -> int | None:
    """The round whose global adapter a run keeps as its result (`LocalSettings.keep_adapter`).

    best: among the trained rounds (status "ok") with a global `score`, the highest, the later on
    a tie; where none has one (every round failed, or no hospital released its evaluation), the
    last round. last: the last round. None for no rounds.

    Choosing costs no privacy: in a simulation the scores are exact and free; in a deployment
    they are the evaluation releases the hospitals already made, DP-noised and charged each
    round, and choosing among them is post-processing. The kept round's score was chosen on the
    same validation notes, so it is optimistic by the choice; the other rounds' stay in the
    history.

    Example:
        >>> rows = [{"round": r, "status": "ok", "global": {"macro_f1": f}}
        ...         for r, f in ((1, 0.454), (2, 0.677), (3, 0.609))]
        >>> kept_round(rows, "macro_f1"), kept_round(rows, "macro_f1", "last")
        (2, 3)
    """
    if not rounds:
        return None
    last = rounds[-1]["round"]
    if rule == "last":
        return last
    scored = [
        (row["global"][score], row["round"])
        for row in rounds
        if row.get("status") == "ok"
        and finite_or_none(row.get("global", {}).get(score)) is not None
    ]
    return max(scored)[1] if scored else last


def trained_a_round(rounds: list[dict]) -> bool:
    """Whether any round of a run's history trained (status "ok": an update was aggregated into
    the global adapter). A run in which none did has nothing to use: its adapter is the
    starting one, and every command that ran it fails."""
    return any(row.get("status") == "ok" for row in rounds)


def run_start_fields(config: RunConfig, run_id: str, flower_run_id: str, arrays: Arrays) -> dict:
    """What the audit log records when a run starts: what was asked of the hospitals."""
    return {
        "run_id": run_id,
        "flower_run_id": flower_run_id,
        "config_sha256": config.digest(),
        "task": config.spec.task.name,
        "model": config.spec.model.name,
        "labels": list(config.spec.task.labels or []),
        "rounds": config.spec.federation.rounds,
        "dp": config.spec.privacy.dp,
        "epsilon": config.spec.privacy.target_epsilon,
        "dp_unit": config.spec.privacy.dp_unit,
        "delta": config.spec.privacy.delta,
        "secure_aggregation": config.spec.secagg.secure_aggregation,
        "min_hospitals": config.spec.federation.min_hospitals,
        "initial_adapter_sha256": arrays_digest(arrays),
        # The starting adapter the hospitals approved by content (None: a fresh adapter).
        "init_adapter": (
            starting_adapter_record(config.spec.model, config.spec.task)
            if config.spec.model.init_adapter
            else None
        ),
    }


def round_audit_fields(row: dict, run_id: str, checkpoint_sha256: str, adapter_sha256: str) -> dict:
    """One round's audit record: who took part, who refused and why, epsilon, hashes.

    Reasons are the coordinator's own rendering of the hospitals' reason codes (never their text).

    Per-hospital facts are lists of objects (not maps keyed by hospital name), so a hospital's
    name can never be mistaken for a secret-looking field and redacted.
    """
    hospitals = row["hospitals"]
    return {
        "run_id": run_id,
        "round": row["round"],
        "status": row["status"],
        "secure_aggregation": row["secure_aggregation"],
        "participants": sorted(name for name, item in hospitals.items() if item.get("trained")),
        "epsilon": [
            {"hospital": name, "epsilon": item.get("epsilon")}
            for name, item in sorted(hospitals.items())
            if item.get("trained")
        ],
        "refused": [
            {"hospital": name, "reason": reason} for name, reason in sorted(row["refused"].items())
        ],
        "rejected": [
            {"hospital": name, "reason": reason} for name, reason in sorted(row["rejected"].items())
        ],
        "dropped": list(row["dropped"]),
        "evaluation_refused": [
            {"hospital": name, "reason": reason}
            for name, reason in sorted(row.get("evaluation_refused", {}).items())
        ],
        "global": row["global"],
        "checkpoint_sha256": checkpoint_sha256,
        "adapter_sha256": adapter_sha256,
    }


def history_row(
    server_round, outcome, evaluation, privacy: PrivacySpec, secure: bool, seconds: float
) -> dict:
    """One round of `history.json`: global metrics, per-hospital metrics and epsilon (in the
    privacy group's unit); `secure`: whether the round's updates were securely aggregated."""
    hospitals: dict[str, dict] = {}
    for name, metrics in sorted(evaluation.hospitals.items()):
        hospitals.setdefault(name, {}).update(
            {key: finite_or_none(value) for key, value in metrics.items()}
        )
    for name, metrics in sorted(outcome.hospitals.items()):
        entry = hospitals.setdefault(name, {})
        entry["trained"] = True
        if "num_examples" in metrics:  # with secure aggregation only the sum is known
            entry["num_train_examples"] = int(metrics["num_examples"])
        if "train_loss" in metrics:  # simulation only
            entry["train_loss"] = finite_or_none(metrics["train_loss"])
        entry["epsilon"] = finite_or_none(metrics.get("epsilon"))
        if privacy.dp:
            entry["dp_unit"] = privacy.dp_unit  # what that epsilon protects
        # simulation only, when present: diagnostics, and the most records of one patient
        for key in ("worker_pid", "model_loads", "largest_patient"):
            if key in metrics:
                entry[key] = int(metrics[key])
    for name, reason in {**outcome.refused, **outcome.rejected}.items():
        hospitals.setdefault(name, {})["refused"] = reason
    for name, reason in evaluation.refused.items():
        hospitals.setdefault(name, {})["evaluation_refused"] = reason
    return {
        "round": server_round,
        "status": outcome.status,
        "secure_aggregation": secure,
        "train_loss": finite_or_none(outcome.train_loss),
        "global": {key: finite_or_none(value) for key, value in evaluation.metrics.items()},
        "hospitals": hospitals,
        "refused": outcome.refused,
        "rejected": outcome.rejected,
        "dropped": outcome.dropped,
        "evaluation_refused": evaluation.refused,
        "seconds": round(seconds, 2),
        # the coordinator's own aggregation work (SecAgg+ or plain), without the wait
        "aggregation_seconds": round(outcome.aggregation_seconds, 4),
    }


def write_history(
    out: Path,
    options: dict[str, Any],
    run_id: int | str,
    rounds: list[dict],
    flower_run_id: str = "",
    first_round: int = 1,
) -> None:
    """Rewrite `<out>/history.json` atomically.

    `options` are the run's options under their flat names (`RunConfig.flat`), kept as the
    history's `config`; `run_id` is the fedward run id; `flower_run_id` and `first_round` say
    which Flower run wrote it and from which round on (after a resume, earlier rounds came from
    the checkpoint).
    """
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / "history.json",
        {
            "run_id": str(run_id),
            "flower_run_id": flower_run_id,
            "first_round": first_round,
            "config": options,
            "rounds": rounds,
        },
    )


def build_server_app(
    config: RunConfig | None = None,
    prepare: Callable[[RunConfig], RunConfig] | None = None,
    on_round: RoundCallback | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> ServerApp:
    """The coordinator's ServerApp, for the deployment and for both simulation entries.

    `config` None reads it from Flower's run config; `prepare` fills in what the run needs
    before round 1 (simulation: the data's label set); `on_round` sees each round's row and
    `on_result` the finished run (the `fedward simulate` progress bar and report).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = config or RunConfig.from_flower(dict(context.run_config))
        if prepare is not None:
            run_config = prepare(run_config)
        result = run_federation(grid, run_config, context.run_id, on_round=on_round)
        if on_result is not None:
            on_result(result)

    return app


#: The coordinator's ServerApp in a deployment (`fedward run` names it in the app bundle).
app = build_server_app()
