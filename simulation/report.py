"""The end-of-run report: the per-round table (rich) and `metrics.png` (matplotlib).

Every epsilon names its unit: the patient (patient-level DP, the default where the data have
patients) or one record (a note for classification, a sentence for NER). A record-level run on
data with patients also says what its epsilon means per patient (group privacy over the largest
patient's records). A simulated hospital reports exact metrics and training loss, unnoised and
uncharged; a deployed one releases only DP-noised evaluation counts, charged to its ledger.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from fedward.client.privacy.accounting import group_epsilon
from fedward.common.tasks import CLASSIFICATION, PATIENT_UNIT, Task
from fedward.server.dashboard.runs import worth_joining


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def hospital_names(rounds: list[dict]) -> list[str]:
    """Every hospital that appears in any round, in natural order."""
    names = {name for row in rounds for name in row["hospitals"]}
    return sorted(names, key=lambda n: (len(n), n))


def privacy_unit(task: Task, dp_unit: str = "record") -> str:
    """What one unit of (epsilon, delta)-DP protects, said next to epsilon."""
    return PATIENT_UNIT if dp_unit == "patient" else task.privacy_unit


def round_table(
    rounds: list[dict],
    task: Task = CLASSIFICATION,
    title: str | None = None,
    dp_unit: str = "record",
    delta: float = 1e-5,
) -> Table:
    """One row per round: global loss/accuracy/macro-F1 (or entity F1) and epsilon per hospital,
    in `dp_unit`."""
    names = hospital_names(rounds)
    columns = task.metric_columns
    dp_on = any(
        stats.get("epsilon") is not None
        for row in rounds
        for stats in (row.get("hospitals") or {}).values()
    )
    anyone_trained = any(
        stats.get("trained") for row in rounds for stats in (row.get("hospitals") or {}).values()
    )
    privacy = (
        f"ε: {dp_unit}-level DP, unit {privacy_unit(task, dp_unit)}, per hospital over the run. "
        "Metrics are exact: simulated hospitals are not charged for them (deployed hospitals "
        "release only DP-noised counts)."
        if dp_on
        else "ε: none spent; no hospital trained in any round, so none released an update."
        if not anyone_trained
        else "ε: none; DP was OFF for this run, so no hospital's records are protected."
    )
    lines = (
        privacy,
        group_privacy_line(rounds, dp_unit, delta),
        pooled_line(task),
        coverage_line(rounds),
        entity_type_line(rounds),
    )
    table = Table(
        title=title, header_style="bold", caption="\n".join(line for line in lines if line)
    )
    table.add_column("round", justify="right")
    table.add_column("status")
    table.add_column("train loss", justify="right")
    table.add_column("val loss", justify="right")
    for _, title in columns:
        table.add_column(title, justify="right")
    for name in names:
        table.add_column(f"ε {name}", justify="right")
    for row in rounds:
        metrics = row["global"]
        cells = [
            str(row["round"]),
            _status(row),
            _fmt(row.get("train_loss")),
            _fmt(metrics.get("loss")),
        ]
        cells += [_fmt(metrics.get(key)) for key, _ in columns]
        for name in names:
            hospital = row["hospitals"].get(name, {})
            if "refused" in hospital:
                cells.append("refused")
            elif hospital.get("trained"):
                cells.append(
                    _fmt(hospital.get("epsilon"), 2)
                    if hospital.get("epsilon") is not None
                    else "no DP"
                )
            else:
                cells.append("·")
        table.add_row(*cells)
    return table


def group_privacy_line(rounds: list[dict], dp_unit: str, delta: float) -> str:
    """For a record-level run on data with patients: what its epsilon means per patient, by
    group privacy over the largest patient's records ('' otherwise)."""
    if dp_unit != "record" or not rounds:
        return ""
    worst = None
    for name, hospital in rounds[-1]["hospitals"].items():
        if hospital.get("largest_patient") and hospital.get("epsilon") is not None:
            epsilon, group_delta = group_epsilon(
                hospital["epsilon"], delta, hospital["largest_patient"]
            )
            if worst is None or epsilon > worst[1]:
                worst = (name, epsilon, group_delta, hospital["largest_patient"])
    if worst is None:
        return ""
    name, epsilon, group_delta, records = worst
    bound = f"delta {group_delta:.1e}" if group_delta < 1 else "delta above 1: no bound at all"
    return (
        f"per patient: {name}'s largest patient has {records} training records, so its record-"
        f"level ε is only ε {epsilon:.1f} per patient by group privacy ({bound}); "
        "--dp-unit patient protects each patient as one unit."
    )


def pooled_line(task: Task) -> str:
    """What the global scores are: the global model's over all hospitals' validation rows at
    once, from their summed counts (not a mean of the hospitals' own; those are in history.json)."""
    return (
        f"{task.pooled_scores_name}: the global model's over all hospitals' validation "
        f"{task.rows_name} pooled "
        "(each hospital's own: history.json)."
    )


def hospital_coverage(rounds: list[dict]) -> dict[str, float]:
    """Each hospital's share of characters/words unknown to the model, as it last reported it."""
    shares: dict[str, float] = {}
    for row in rounds:
        for name, hospital in row["hospitals"].items():
            if hospital.get("unknown_rate") is not None:
                shares[name] = hospital["unknown_rate"]
    return shares


#: Hospitals named one by one in the coverage line; above it the line is summarised.
COVERAGE_LISTED = 5


def coverage_line(rounds: list[dict]) -> str:
    """'unknown to the model's vocabulary: hospital-0 0.4%, ...' ('' when none reported); for
    more than `COVERAGE_LISTED` hospitals, one figure when all round to it, else the worst few."""
    shares = hospital_coverage(rounds)
    if not shares:
        return ""
    names = sorted(shares, key=lambda n: (len(n), n))
    prefix = "unknown to the model's vocabulary: "
    if len(names) <= COVERAGE_LISTED:
        return prefix + ", ".join(f"{name} {shares[name]:.1%}" for name in names)
    shown = {f"{share:.1%}" for share in shares.values()}
    if len(shown) == 1:
        return prefix + f"{shown.pop()} at each of the {len(names)} hospitals"
    worst = sorted(names, key=lambda n: -shares[n])[:3]
    rest = max(shares[n] for n in names if n not in worst)
    return (
        prefix
        + ", ".join(f"{name} {shares[name]:.1%}" for name in worst)
        + f"; the other {len(names) - len(worst)} hospitals at most {rest:.1%}"
    )


def entity_types(metrics: dict) -> list[str]:
    """The entity types of NER metrics (keys `f1_TYPE`), under the data's own names."""
    return sorted(key.removeprefix("f1_") for key in metrics if key.startswith("f1_"))


def entity_type_line(rounds: list[dict]) -> str:
    """'entity F1 by type, round N: TYPE 0.412, ...' for the last round ('' for no types)."""
    if not rounds:
        return ""
    metrics = rounds[-1]["global"]
    types = entity_types(metrics)
    if not types:
        return ""
    return f"entity F1 by type, round {rounds[-1]['round']}: " + ", ".join(
        f"{name} {_fmt(metrics[f'f1_{name}'])}" for name in types
    )


def _status(row: dict) -> str:
    status = row["status"]
    if status == "evaluated":  # an evaluate-only run's one row: nothing was to train
        return status
    if status != "ok":
        return f"[red]{status.split(':')[0]}[/red]"
    extra = []
    if row.get("dropped"):
        extra.append(f"{len(row['dropped'])} dropped")
    if row.get("refused"):
        extra.append(f"{len(row['refused'])} refused")
    if row.get("rejected"):
        extra.append(f"{len(row['rejected'])} rejected")
    return "ok" + (f" ({', '.join(extra)})" if extra else "")


def save_plot(
    rounds: list[dict], path: Path, task: Task = CLASSIFICATION, dp_unit: str = "record"
) -> Path:
    """`metrics.png`: global metrics per round (left) and epsilon per hospital (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plot_figure(rounds, task, dp_unit)
    path = Path(path)
    staging = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(staging, dpi=110)
    plt.close(figure)
    staging.replace(path)
    return path


def plot_figure(rounds: list[dict], task: Task = CLASSIFICATION, dp_unit: str = "record"):
    """The figure of `metrics.png`. Hospitals with the same epsilon every round share one line
    (`epsilon_lines`); hospital names are drawn as plain text; the unit wraps to fit."""
    import matplotlib.pyplot as plt

    from fedward.server.dashboard.plots import MARKERS, epsilon_lines, plain_text, wrapped_label

    x = [row["round"] for row in rounds]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    keys = ("loss", *(key for key, _ in task.metric_columns))
    for key in keys:
        left.plot(
            x, [_nan(row["global"].get(key)) for row in rounds], marker="o", label=f"val {key}"
        )
    left.plot(
        x,
        [_nan(row.get("train_loss")) for row in rounds],
        marker="o",
        linestyle="--",
        label="train loss",
    )
    left.set_xlabel("round")
    left.set_ylabel("loss / score")
    left.set_title("global model")
    left.legend()
    left.grid(alpha=0.3)
    series = {
        name: [_nan(row["hospitals"].get(name, {}).get("epsilon")) for row in rounds]
        for name in hospital_names(rounds)
    }
    for index, (label, values) in enumerate(epsilon_lines(series)):
        right.plot(x, values, marker=MARKERS[index % len(MARKERS)], label=plain_text(label))
    right.set_xlabel("round")
    right.set_ylabel(wrapped_label(f"ε spent (DP unit: {privacy_unit(task, dp_unit)})"))
    right.set_title("privacy budget spent per hospital")
    right.grid(alpha=0.3)
    if series:
        right.legend(fontsize="small")
    for axis in (left, right):
        axis.set_xticks(x)
    figure.tight_layout()
    return figure


def _nan(value):
    return float("nan") if value is None else value


def worth_joining_table(rounds: list[dict], task: Task = CLASSIFICATION) -> Table | None:
    """Per hospital, on its own validation notes: *alone* (its notes only, no DP), *global*
    (the federation's model), *own* (the global model fitted at home) and own minus alone."""
    figures = worth_joining(rounds)
    if not figures:
        return None
    metric = task.primary_metric.replace("_", "-")
    table = Table(
        title=f"fedward: worth joining ({metric} on each hospital's own validation notes)",
        header_style="bold",
        caption="alone: trained on its own notes only, without DP (never leaves the hospital); "
        "global: the federated model; own: the global model fitted to its own notes at home "
        "(not DP: kept at home, never shared). own - alone is what joining gave it.",
    )
    for column in ("hospital", "alone", "global", "own", "own - alone"):
        table.add_column(column, justify="left" if column == "hospital" else "right")
    for name in sorted(figures, key=lambda n: (len(n), n)):
        row = figures[name]
        gain = 100 * (row["own"] - row["alone"])
        shown = f"[green]{gain:+.1f} pts[/]" if gain >= 0 else f"[red]{gain:+.1f} pts[/]"
        table.add_row(name, _fmt(row["alone"]), _fmt(row["global"]), _fmt(row["own"]), shown)
    return table
