"""The run page's two charts, drawn by matplotlib as SVG on the server (no JavaScript).

`metrics_svg`: the global model's validation loss and task metrics per round, and the train loss
where hospitals report it (simulation). `epsilon_svg`: each hospital's epsilon after each round,
in the task's DP unit, with the run's target epsilon as a dashed line. A round a hospital did
not train leaves a gap. Both use matplotlib's object API (`Figure`, no pyplot), so concurrent
requests draw on separate figures.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.figure import Figure

from fedward.common.errors import ConfigError
from fedward.common.tasks import PATIENT_UNIT, task_named
from fedward.server.dashboard.runs import hospital_names


def metric_columns(task: str, rounds: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, title) of the task's headline metrics; for an unknown task, what the rows hold."""
    try:
        return list(task_named(task).metric_columns)
    except ConfigError:  # an unknown or missing task name: show every global metric but loss
        keys = sorted({key for row in rounds for key in row.get("global", {}) if key != "loss"})
        return [(key, key) for key in keys]


def privacy_unit(task: str, dp_unit: str | None = "record") -> str:
    """What one unit of DP protects in this task and DP unit ('' for an unknown task)."""
    if dp_unit == "patient":
        return PATIENT_UNIT
    try:
        return task_named(task).privacy_unit
    except ConfigError:
        return ""


def metrics_svg(rounds: list[dict[str, Any]], task: str) -> str:
    figure = Figure(figsize=(6.4, 3.4))
    axis = figure.subplots()
    x = [row["round"] for row in rounds]
    for key, title in (("loss", "val loss"), *metric_columns(task, rounds)):
        axis.plot(
            x, [_nan(row.get("global", {}).get(key)) for row in rounds], marker="o", label=title
        )
    if any(row.get("train_loss") is not None for row in rounds):
        axis.plot(
            x,
            [_nan(row.get("train_loss")) for row in rounds],
            marker="o",
            linestyle="--",
            label="train loss",
        )
    axis.set_xlabel("round")
    axis.set_title("global model")
    _finish(axis, x)
    return _svg(figure)


def epsilon_svg(
    rounds: list[dict[str, Any]], privacy_unit: str, run_epsilon: float | None = None
) -> str:
    figure = Figure(figsize=(6.4, 3.4))
    axis = figure.subplots()
    x = [row["round"] for row in rounds]
    for name in hospital_names(rounds):
        values = [
            _nan(row["hospitals"].get(name, {}).get("epsilon"))
            if row["hospitals"].get(name, {}).get("trained")
            else float("nan")
            for row in rounds
        ]
        axis.plot(x, values, marker="o", label=name)
    if run_epsilon is not None:
        axis.axhline(run_epsilon, color="grey", linestyle=":", label=f"run's ε {run_epsilon:g}")
    axis.set_xlabel("round")
    axis.set_ylabel(f"ε spent (unit: {privacy_unit})" if privacy_unit else "ε spent")
    axis.set_title("privacy budget spent per hospital")
    _finish(axis, x)
    return _svg(figure)


def _finish(axis, x: list[int]) -> None:
    axis.grid(alpha=0.3)
    if x:
        axis.set_xticks(x)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")


def _svg(figure: Figure) -> str:
    figure.tight_layout()
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    return buffer.getvalue()


def _nan(value: Any) -> float:
    return float("nan") if not isinstance(value, int | float) or isinstance(value, bool) else value
