"""The run page's two charts, drawn by matplotlib as SVG on the server (no JavaScript).

`metrics_svg`: the global model's validation loss and task metrics per round, and the train loss
where hospitals report it (simulation). `epsilon_svg`: each hospital's epsilon after each round,
in the task's DP unit, with the run's target epsilon as a dashed line. A round a hospital did
not train leaves a gap; hospitals whose epsilon is the same every round share one line, named for
all of them (`epsilon_lines`), since identical lines would hide each other. Both use matplotlib's
object API (`Figure`, no pyplot), so concurrent requests draw on separate figures.

Hospital names are hospital-supplied text: they are drawn as plain text (`plain_text`), never as
matplotlib's math syntax, which a name like `$\\x$` would otherwise turn into a failed request.
"""

from __future__ import annotations

import io
import math
import textwrap
from typing import Any

from matplotlib.figure import Figure

from fedward.common.tasks import PATIENT_UNIT, Task
from fedward.server.dashboard.runs import hospital_names


def metric_columns(task: Task | None, rounds: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, title) of the task's headline metrics; for an unknown task (None), what the rows
    hold."""
    if task is not None:
        return list(task.metric_columns)
    # an unknown or missing task name: show every global metric but loss
    keys = sorted({key for row in rounds for key in row.get("global", {}) if key != "loss"})
    return [(key, key) for key in keys]


def privacy_unit(task: Task | None, dp_unit: str | None = "record") -> str:
    """What one unit of DP protects in this task and DP unit ('' for an unknown task, None)."""
    if dp_unit == "patient":
        return PATIENT_UNIT
    return task.privacy_unit if task is not None else ""


#: Markers cycled over the hospitals' lines, so that lines that cross or touch stay apart.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def plain_text(text: str) -> str:
    """`text` as matplotlib draws it literally: every `$` escaped, so no math syntax is parsed."""
    return text.replace("$", r"\$")


def wrapped_label(text: str, width: int = 34) -> str:
    """An axis label broken into lines of at most `width` characters, so that a long unit
    ("one patient (all of a patient's records)") fits beside the chart instead of being cut."""
    return "\n".join(textwrap.wrap(text, width)) or text


def epsilon_lines(series: dict[str, list[float]]) -> list[tuple[str, list[float]]]:
    """(label, values) per distinct line: hospitals with the same epsilon every round share one
    line labelled with all their names ("all hospitals" when that is every hospital), in the
    order of `series`."""
    groups: dict[tuple, list[str]] = {}
    for name, values in series.items():
        key = tuple(None if math.isnan(v) else round(v, 9) for v in values)
        groups.setdefault(key, []).append(name)
    lines = []
    for names in groups.values():
        if len(names) == 1:
            label = names[0]
        elif len(names) == len(series):
            label = f"all hospitals ({len(names)})"
        elif len(names) <= 3:
            label = ", ".join(names)
        else:
            label = f"{len(names)} hospitals: {names[0]}, {names[1]}, ..."
        lines.append((label, series[names[0]]))
    return lines


def metrics_svg(rounds: list[dict[str, Any]], task: Task | None) -> str:
    return _svg(metrics_figure(rounds, task))


def metrics_figure(rounds: list[dict[str, Any]], task: Task | None) -> Figure:
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
    axis.set_ylabel("loss / score")
    axis.set_title("global model")
    _finish(axis, x)
    return figure


def epsilon_svg(
    rounds: list[dict[str, Any]], privacy_unit: str, run_epsilon: float | None = None
) -> str:
    return _svg(epsilon_figure(rounds, privacy_unit, run_epsilon))


def epsilon_figure(
    rounds: list[dict[str, Any]], privacy_unit: str, run_epsilon: float | None = None
) -> Figure:
    figure = Figure(figsize=(6.4, 3.4))
    axis = figure.subplots()
    x = [row["round"] for row in rounds]
    series = {
        name: [
            _nan(row["hospitals"].get(name, {}).get("epsilon"))
            if row["hospitals"].get(name, {}).get("trained")
            else float("nan")
            for row in rounds
        ]
        for name in hospital_names(rounds)
    }
    for index, (label, values) in enumerate(epsilon_lines(series)):
        axis.plot(x, values, marker=MARKERS[index % len(MARKERS)], label=plain_text(label))
    if run_epsilon is not None:
        axis.axhline(
            run_epsilon,
            color="grey",
            linestyle=":",
            label=f"run's ε {run_epsilon:g}",
            gid="run-epsilon",
        )
    axis.set_xlabel("round")
    axis.set_ylabel(wrapped_label(f"ε spent (unit: {privacy_unit})" if privacy_unit else "ε spent"))
    axis.set_title("privacy budget spent per hospital")
    _finish(axis, x)
    return figure


def _finish(axis, x: list[int]) -> None:
    axis.grid(alpha=0.3)
    if x:
        axis.set_xticks(x)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")
    axis.figure.tight_layout()


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    return buffer.getvalue()


def _nan(value: Any) -> float:
    return float("nan") if not isinstance(value, int | float) or isinstance(value, bool) else value
