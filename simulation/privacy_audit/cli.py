"""`fedward audit privacy`: the audit a hospital (or a privacy officer) runs before trusting the
epsilon fedward prints. Mounted on the `audit` group by fedward/cli.py (server/ never imports
simulation/).

Only the CLI prints; the audit itself (audit.py) logs.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedward.common.config import GROUPS
from fedward.common.files.atomic import write_json_atomic
from fedward.common.files.output_paths import check_output_folder
from fedward.simulation.cli import (
    console,
    field_options,
    load_config,
    quiet_libraries,
    rounds_progress,
)
from fedward.simulation.privacy_audit.audit import (
    DEFAULT_CANARIES,
    PrivacyAuditResult,
    run_privacy_audit,
)

#: The audit's result, in the run's output folder beside history.json.
RESULT_FILE = "privacy_audit.json"


def privacy(
    config_file: Annotated[
        Path | None, typer.Option("--config", help="TOML file with any RunConfig field.")
    ] = None,
    canaries: Annotated[
        int,
        typer.Option(
            help="Canaries put into the audited hospital's training data, each with "
            "probability 1/2. More canaries raise the ceiling of what the audit can show."
        ),
    ] = DEFAULT_CANARIES,
    hospital: Annotated[int, typer.Option(help="The audited hospital (0-based).")] = 0,
    confidence: Annotated[
        float, typer.Option(help="Confidence of the lower bound (all bounds printed together).")
    ] = 0.95,
    verbose: Annotated[bool, typer.Option(help="Show Flower/Ray logs.")] = False,
    **fields: Any,
) -> None:
    """Audit DP from outside: a lower bound on a hospital's epsilon, measured with canaries.

    The bound (Steinke, Nasr and Jagielski 2023) is printed beside the accounted epsilon."""
    quiet_libraries(verbose)
    flags = {name: value for name, value in fields.items() if value not in (None, [])}
    config = load_config(config_file, flags)
    out = check_output_folder(config.local.out, "--out")
    console.print(
        f"[bold]fedward audit privacy[/bold]: {canaries} canaries in hospital-{hospital} of "
        f"{config.simulation.hospitals}, {config.spec.federation.rounds} rounds, "
        f"{config.spec.model.lora_variant or 'task default'} adapter, "
        + (
            f"target epsilon {config.spec.privacy.target_epsilon:g}"
            if config.spec.privacy.dp
            else "no DP"
        )
        + f", secure aggregation {'on' if config.spec.secagg.secure_aggregation else 'off'}, "
        f"prefix cache {'on' if config.local.prefix_cache else 'off'}"
    )
    started = time.monotonic()
    with rounds_progress() as progress:
        bar = progress.add_task("federated training", total=config.spec.federation.rounds)

        def on_round(row: dict) -> None:
            progress.console.print(
                f"round {row['round']}: {row['status']} ({row['seconds']:.0f} s)"
            )
            progress.advance(bar)

        def on_scoring() -> None:
            progress.update(bar, description="scoring canaries")

        result = run_privacy_audit(
            config,
            canaries=canaries,
            hospital=hospital,
            confidence=confidence,
            on_round=on_round,
            on_scoring=on_scoring,
            verbose=verbose,
        )
    seconds = time.monotonic() - started
    write_json_atomic(
        out / RESULT_FILE,
        {
            **dataclasses.asdict(result),
            "epsilon_lower_bound": result.epsilon_lower_bound,
            "seconds": round(seconds, 1),
        },
    )
    console.print(result_table(result))
    console.print(verdict(result))
    console.print(f"{seconds:.0f} s; result in {out / RESULT_FILE}")


def result_table(result: PrivacyAuditResult) -> Table:
    """The two auditors' guesses and bounds beside the accounted epsilon and the ceiling."""
    table = Table(title=f"privacy audit of {result.hospital} (unit: {result.unit})")
    for column in ("auditor", "canaries (included)", "guesses", "correct", "lower bound"):
        table.add_column(column, justify="left" if column == "auditor" else "right")
    for auditor in result.auditors:
        table.add_row(
            auditor.auditor,
            f"{result.canaries} ({result.included})",
            str(auditor.guesses),
            str(auditor.correct),
            f"{auditor.epsilon_lower_bound:.2f}",
        )
    accounted = (
        "none (no DP)" if result.accounted_epsilon is None else f"{result.accounted_epsilon:.2f}"
    )
    table.caption = (
        f"accounted epsilon {accounted} (delta {result.delta:g}); the ceiling of this audit is "
        f"{result.ceiling:.2f} (every canary guessed right); all bounds hold together at "
        f"{result.confidence:.0%}"
    )
    return table


def verdict(result: PrivacyAuditResult) -> str:
    """One line a privacy officer can act on; never "passed" where the audit could not fail."""
    bound = result.epsilon_lower_bound
    if result.accounted_epsilon is None:
        return (
            f"empirical epsilon >= {bound:.2f} at {result.confidence:.0%}: without DP, this is how "
            "much the canaries alone show leaks"
        )
    if result.contradicts_accounting:
        return (
            f"[bold red]PRIVACY BUG[/bold red]: the measured lower bound {bound:.2f} exceeds the "
            f"accounted epsilon {result.accounted_epsilon:.2f}; the DP implementation or its "
            "accounting is wrong for this configuration"
        )
    if result.ceiling <= result.accounted_epsilon:
        return (
            f"lower bound {bound:.2f} <= accounted {result.accounted_epsilon:.2f}, but this audit "
            f"could show at most {result.ceiling:.2f}: it could not have found a bug that leaks "
            "more than that; a lower bound is not a proof"
        )
    return (
        f"lower bound {bound:.2f} <= accounted {result.accounted_epsilon:.2f}: no contradiction "
        "found; a lower bound is not a proof of privacy"
    )


_fixed = list(inspect.signature(privacy, eval_str=True).parameters.values())[:-1]
privacy.__signature__ = inspect.Signature(_fixed + field_options(list(GROUPS), {"resume"}))
