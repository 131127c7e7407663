"""The coordinator's Flower ServerApp: drives the rounds, checkpoints, writes the history.

`run_federation` is the round loop; the ServerApp entry point reads the `RunConfig` from Flower's
run config and calls it. After every round the global adapter is saved in PEFT format
(`<out>/adapter/`, swapped in atomically) and `<out>/history.json` is rewritten atomically, so a
crash leaves the last completed round intact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.atomic import write_json_atomic
from common.config import RunConfig
from common.errors import ConfigError
from common.model import adapter_spec, build_model, get_adapter_arrays, set_adapter_arrays, save_adapter
from server.aggregation import Arrays
from server.strategy import FedwardStrategy, finite_or_none

log = logging.getLogger(__name__)

#: Called after every round with the round's history row (the CLI draws its table from it).
RoundCallback = Callable[[dict], None]


@dataclass
class RunResult:
    """The outcome of a run: where things were written and what happened each round."""

    out: Path
    rounds: list[dict] = field(default_factory=list)
    arrays: Arrays | None = None

    @property
    def adapter_dir(self) -> Path:
        return self.out / "adapter"


def run_federation(
    grid: Grid, config: RunConfig, run_id: int, on_round: RoundCallback | None = None
) -> RunResult:
    """Run `config.rounds` rounds of federated training and evaluation."""
    if not config.labels:
        raise ConfigError(
            "field 'labels': the run's label set is missing; list the labels in the run config"
        )
    out = Path(config.out)
    model = build_model(config, len(config.labels))
    spec = adapter_spec(model)
    arrays = get_adapter_arrays(model)
    strategy = FedwardStrategy(config, spec, run_id)
    result = RunResult(out=out, arrays=arrays)
    log.info(
        "run %s: %d rounds, %s, %d adapter tensors (%d values)",
        run_id,
        config.rounds,
        config.model,
        len(spec),
        sum(a.size for a in arrays.values()),
    )

    for server_round in range(1, config.rounds + 1):
        started = time.monotonic()
        outcome = strategy.train_round(server_round, arrays, grid)
        if outcome.arrays is not None:
            arrays = outcome.arrays
        evaluation = strategy.aggregate_evaluate(
            server_round,
            grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, grid),
                timeout=config.round_timeout,
            ),
        )
        row = history_row(server_round, outcome, evaluation, config, time.monotonic() - started)
        result.rounds.append(row)
        result.arrays = arrays
        set_adapter_arrays(model, arrays)
        save_adapter(model, out / "adapter", config.labels, config)
        write_history(out, config, run_id, result.rounds)
        if on_round is not None:
            on_round(row)
    return result


def history_row(server_round, outcome, evaluation, config: RunConfig, seconds: float) -> dict:
    """One round of `history.json`: global metrics, per-hospital metrics and epsilon."""
    hospitals: dict[str, dict] = {}
    for name, metrics in sorted(evaluation.hospitals.items()):
        hospitals.setdefault(name, {}).update(
            {key: finite_or_none(value) for key, value in metrics.items()}
        )
    for name, metrics in sorted(outcome.hospitals.items()):
        entry = hospitals.setdefault(name, {})
        entry["trained"] = True
        entry["num_train_examples"] = int(metrics["num_examples"])
        entry["train_loss"] = finite_or_none(metrics.get("train_loss"))
        entry["epsilon"] = finite_or_none(metrics.get("epsilon"))
    for name, reason in {**outcome.refused, **outcome.rejected}.items():
        hospitals.setdefault(name, {})["refused"] = reason
    return {
        "round": server_round,
        "status": outcome.status,
        "secure_aggregation": config.secure_aggregation,
        "train_loss": finite_or_none(outcome.train_loss),
        "global": {key: finite_or_none(value) for key, value in evaluation.metrics.items()},
        "hospitals": hospitals,
        "refused": outcome.refused,
        "rejected": outcome.rejected,
        "dropped": outcome.dropped,
        "seconds": round(seconds, 2),
    }


def write_history(out: Path, config: RunConfig, run_id: int, rounds: list[dict]) -> None:
    """Rewrite `<out>/history.json` atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / "history.json",
        {"run_id": str(run_id), "config": config.model_dump(), "rounds": rounds},
    )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: the run config comes from Flower's run config."""
    config = RunConfig.from_flower(dict(context.run_config))
    run_federation(grid, config, context.run_id)
