"""Experiment tracking: a run's spec, its rounds and its adapter, recorded in MLflow.

`--tracking mlflow` (on `fedward simulate` and `fedward run`) records, in one MLflow run:

- parameters: the run spec's fields (what hospitals agree to; lists as JSON) under their own
  names, and the local and simulation settings as `local.<field>`; tags `fedward.spec_sha256`
  (the spec's digest, as sites pin it), `fedward.kind` (simulation or deployment), `fedward.out`
  and, at the end, `fedward.run_id`;
- metrics, one step per round: `global.<metric>` (the global model's validation metrics),
  `train_loss` where hospitals report it, `epsilon.<hospital>` (what each hospital reported for
  its update, cumulative over the run) and `epsilon_max`, `joining.alone.<hospital>`,
  `joining.global.<hospital>` and `joining.own.<hospital>` where a hospital reported them
  (worth joining: a simulated hospital at the last round), and counts of `participants`,
  `refused` and `dropped` hospitals, `round_ok` (1 or 0) and `seconds`;
- artifacts: the final adapter (`adapter/`, PEFT format), `history.json` and `metrics.png`.

Where: `mlflow` alone keeps a local store in the output folder (`<out>/mlflow.db`, SQLite, and
`<out>/mlartifacts/`; read it with `mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db`
where the full mlflow package is installed); anything else is taken as a tracking URI
(`http://mlflow.example:5000`, `sqlite:///path.db`, `databricks`...). The experiment is
`fedward` unless `MLFLOW_EXPERIMENT_NAME` says otherwise.

Only what the coordinator already holds is recorded: the history's rows, never anything a
hospital did not send. A tracking store that fails during a run logs a warning and the run goes
on: bookkeeping never stops a federated round. One that cannot be reached at the start fails
before any round.

MLflow's client (`mlflow-skinny`) is an optional dependency: `pip install -e ".[tracking]"`.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from fedward.common.config import RunConfig
from fedward.common.errors import ConfigError

log = logging.getLogger(__name__)

#: The local store's files inside the run's output folder.
LOCAL_DATABASE = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
DEFAULT_EXPERIMENT = "fedward"

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def tracking_uri(tracking: str, out: Path) -> str:
    """The MLflow tracking URI `--tracking` names: 'mlflow' is the run's local store."""
    if tracking == "mlflow":
        return f"sqlite:///{(Path(out).resolve() / LOCAL_DATABASE).as_posix()}"
    if "://" in tracking or tracking.startswith(("sqlite:", "file:", "databricks")):
        return tracking
    raise ConfigError(
        f"--tracking {tracking!r}: use 'mlflow' (a local store in the output folder) or a "
        "tracking server's address such as http://mlflow.example:5000"
    )


def open_tracker(tracking: str | None, config: RunConfig, kind: str) -> MlflowTracker | None:
    """The tracker `--tracking` asks for (None without it); starts the MLflow run."""
    if not tracking:
        return None
    return MlflowTracker(tracking_uri(tracking, Path(config.local.out)), config, kind)


class MlflowTracker:
    """One fedward run as one MLflow run: `log_round` per round, `finish` at the end.

    Example:
        >>> tracker = open_tracker("mlflow", config, "simulation")  # doctest: +SKIP
        >>> tracker.log_round(history_row)  # after each round  # doctest: +SKIP
        >>> tracker.finish(Path(config.local.out))  # doctest: +SKIP
    """

    def __init__(self, uri: str, config: RunConfig, kind: str) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(
                '--tracking mlflow needs MLflow\'s client: pip install -e ".[tracking]" '
                "(mlflow-skinny)"
            ) from None
        for name in ("mlflow", "alembic"):  # schema migrations of a new local store are chatty
            logging.getLogger(name).setLevel(logging.WARNING)
        self.uri = uri
        self.out = Path(config.local.out)
        self.client = MlflowClient(tracking_uri=uri)
        try:
            experiment_id = self._experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME"))
            run = self.client.create_run(
                experiment_id,
                run_name=self.out.name or None,
                tags={
                    "fedward.kind": kind,
                    "fedward.out": str(self.out.resolve()),
                    "fedward.spec_sha256": config.digest(),
                    "fedward.task": config.spec.task.name,
                },
            )
        except Exception as exc:  # MLflow raises its own and the HTTP client's errors
            raise ConfigError(f"--tracking: MLflow at {uri} cannot be used ({exc})") from None
        self.run_id = run.info.run_id
        self._finished = False
        self._call(self._log_params, config.flat(), set(config.spec.flat()))
        atexit.register(self._abandoned)
        log.info("tracking this run in MLflow at %s (run %s)", uri, self.run_id)

    def _experiment(self, name: str | None) -> str:
        name = name or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.uri.startswith("sqlite:") and self.uri.endswith(LOCAL_DATABASE):
            location = (self.out.resolve() / LOCAL_ARTIFACTS).as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def _log_params(self, options: dict[str, Any], spec_names: set[str]) -> None:
        """Every option as an MLflow param: the run spec's under their flat names, the rest
        (this machine's settings) as `local.<name>`."""
        from mlflow.entities import Param

        params = [
            Param(name if name in spec_names else f"local.{name}", _param_value(value))
            for name, value in options.items()
        ]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_round(self, row: dict[str, Any]) -> None:
        """Record one row of history.json (server/app.py, `history_row`) at step = round."""
        self._call(self._log_round, row)

    def _log_round(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        values = round_metrics(row)
        step, stamp = int(row["round"]), _now_ms()
        metrics = [Metric(key, value, stamp, step) for key, value in values.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def finish(self, out: Path | None = None, run_id: str = "", failed: bool = False) -> None:
        """Upload the adapter, history and plot from `out` and close the MLflow run."""
        out = Path(out) if out is not None else self.out
        if run_id:
            self._call(self.client.set_tag, self.run_id, "fedward.run_id", run_id)
        if (out / "adapter").is_dir():
            self._call(self.client.log_artifacts, self.run_id, str(out / "adapter"), "adapter")
        for name in ("history.json", "metrics.png"):
            if (out / name).is_file():
                self._call(self.client.log_artifact, self.run_id, str(out / name))
        self._call(self.client.set_terminated, self.run_id, "FAILED" if failed else "FINISHED")
        self._finished = True

    def _abandoned(self) -> None:
        """At exit: a run the process left without `finish` (a crash, Ctrl-C) is FAILED."""
        if not self._finished:
            self._call(self.client.set_terminated, self.run_id, "FAILED")
            self._finished = True

    def _call(self, function, *args) -> None:
        try:
            function(*args)
        except Exception as exc:  # tracking never stops a run
            log.warning(
                "MLflow at %s: %s failed (%s); the run goes on", self.uri, _name(function), exc
            )


def round_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of one history row that MLflow records (None values are left out)."""
    values: dict[str, float] = {}
    for key, value in (row.get("global") or {}).items():
        if _is_number(value):
            values[f"global.{metric_key(key)}"] = float(value)
    if _is_number(row.get("train_loss")):
        values["train_loss"] = float(row["train_loss"])
    hospitals = row.get("hospitals") or {}
    epsilons = []
    for name, item in hospitals.items():
        if item.get("trained") and _is_number(item.get("epsilon")):
            values[f"epsilon.{metric_key(name)}"] = float(item["epsilon"])
            epsilons.append(float(item["epsilon"]))
    if epsilons:
        values["epsilon_max"] = max(epsilons)
    for name, item in hospitals.items():  # worth joining: a hospital's alone / global / own
        for which in ("alone", "global", "own"):
            if _is_number(item.get(f"personal_{which}")):
                values[f"joining.{which}.{metric_key(name)}"] = float(item[f"personal_{which}"])
    values["participants"] = float(sum(1 for item in hospitals.values() if item.get("trained")))
    values["refused"] = float(len({**(row.get("refused") or {}), **(row.get("rejected") or {})}))
    values["dropped"] = float(len(row.get("dropped") or []))
    values["round_ok"] = 1.0 if row.get("status") == "ok" else 0.0
    if _is_number(row.get("seconds")):
        values["seconds"] = float(row["seconds"])
    return values


def metric_key(name: str) -> str:
    """A name MLflow accepts as (part of) a metric key: other characters become '_'."""
    return _UNSAFE.sub("_", str(name)) or "_"


def _param_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _now_ms() -> int:
    return int(time.time() * 1000)


def _name(function) -> str:
    return getattr(function, "__name__", "a call").lstrip("_")
