"""`fedward simulate` and `fedward predict`: a researcher's commands (mounted by fedward/cli.py).

Only the CLI prints; library code logs.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fedward.common.config import GROUPS, RunConfig
from fedward.common.files.output_paths import check_output_folder
from fedward.common.tasks import task_named

# Wide when piped to a file or log, so paths and commands are never broken across lines.
console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)


def load_config(config_file: Path | None, flags: dict[str, Any]) -> RunConfig:
    """Defaults < TOML file < CLI flags; a bad value raises `ConfigError` naming the field."""
    if config_file is not None:
        return RunConfig.from_toml(config_file, overrides=flags)
    return RunConfig.build(flags, source="command line")


def quiet_libraries(verbose: bool) -> None:
    """Keep Flower, Ray and transformers to warnings unless --verbose."""
    if not verbose:
        warnings.filterwarnings("ignore")  # library deprecation chatter; --verbose shows it
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import flwr.common.logger  # noqa: F401  (sets Flower's own levels on import: do it first)

    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in ("flwr", "ray", "transformers", "opacus", "peft"):
        # Flower logs every failed ClientApp (simulated dropouts too) with a Ray traceback; the
        # strategy already logs one readable line per failure, so keep Flower quiet.
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.CRITICAL)
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def simulate(
    config_file: Annotated[
        Path | None, typer.Option("--config", help="TOML file with any RunConfig field.")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower/Ray logs.")] = False,
    tracking: Annotated[
        str | None,
        typer.Option(help="mlflow: record the run in <out>/mlflow.db; or an MLflow server's URI."),
    ] = None,
    **fields: Any,
) -> None:
    """Run a federated fine-tuning across simulated hospitals on this machine."""
    quiet_libraries(verbose)
    flags = {name: value for name, value in fields.items() if value not in (None, [])}
    config = load_config(config_file, flags)
    check_output_folder(config.local.out, "--out")  # before minutes of work, not after
    run_simulation_with_report(config, verbose, tracking)


#: Shorter spellings kept for the flags users type most.
_ALIASES = {"learning_rate": ("--lr",)}
#: RunConfig fields that are not simulation options (`fedward run --resume` sets it).
_NOT_SIMULATE_OPTIONS = {"resume"}


def field_options(groups: list[type[BaseModel]], skip: set[str]) -> list[inspect.Parameter]:
    """One CLI option per field of `groups`: its flag, type, description and default all come
    from the field, so the CLI keeps no second list of defaults (given values only override)."""
    parameters = []
    for group in groups:
        panel = (group.__doc__ or group.__name__).strip().splitlines()[0]
        for field_name, field in group.model_fields.items():
            name = field.alias or field_name  # the flat name: --task, --model
            if name in skip or any(p.name == name for p in parameters):
                continue
            flag = "--" + name.replace("_", "-")
            default = field.get_default(call_default_factory=True)
            shown = json.dumps(default) if isinstance(default, list | str) else default
            shown = "unset" if default is None else shown
            help_text = f"{field.description} (default: {shown})"
            kind = _option_type(field.annotation)
            if kind is bool:
                declarations = (f"{flag}/--no-{flag[2:]}",)
            else:
                declarations = (flag, *_ALIASES.get(name, ()))
            option = typer.Option(*declarations, help=help_text, rich_help_panel=panel)
            parameters.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[kind | None, option],
                )
            )
    return parameters


def _option_type(annotation: Any) -> type:
    """The click-level type of a field: bool, int, float, list[str] (repeatable) or str."""
    args = [arg for arg in get_args(annotation) if arg is not type(None)]
    if get_origin(annotation) is list or any(get_origin(arg) is list for arg in args):
        return list[str]
    for kind in (bool, int, float):
        if annotation is kind or kind in args:
            return kind
    return str  # str, Literal[...] (pydantic checks the choice and names the field)


_fixed = list(inspect.signature(simulate, eval_str=True).parameters.values())[:-1]
simulate.__signature__ = inspect.Signature(
    _fixed + field_options(list(GROUPS), _NOT_SIMULATE_OPTIONS)
)


def run_simulation_with_report(
    config: RunConfig, verbose: bool = False, tracking: str | None = None
) -> None:
    """Simulate with a progress bar and a row per round, then print the report."""
    from fedward.common.model import load_tokenizer
    from fedward.server.tracking import open_tracker
    from fedward.simulation.hospitals import prepare_config
    from fedward.simulation.report import round_table, save_plot
    from fedward.simulation.runner import simulate as run_simulation

    config = prepare_config(config)  # reads and checks the data before anything starts
    load_tokenizer(config.spec.model.name)  # an unknown model fails here, not inside a worker
    _announce(config)
    tracker = open_tracker(tracking, config, "simulation")  # None without --tracking
    started = time.monotonic()
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("federated training", total=config.spec.federation.rounds)

        def on_round(row: dict) -> None:
            metrics = row["global"]
            headline = task_named(config.spec.task.name).primary_metric
            score = metrics.get(headline)
            progress.console.print(
                f"round {row['round']}: {row['status']}, val loss "
                f"{_num(metrics.get('loss'))}, {headline} {_num(score)} ({row['seconds']:.0f} s)"
            )
            progress.advance(bar)
            if tracker is not None:
                tracker.log_round(row)

        result = run_simulation(config, on_round=on_round, verbose=verbose)
    elapsed = time.monotonic() - started
    unit = config.spec.privacy.dp_unit
    plot = save_plot(result.rounds, result.out / "metrics.png", config.spec.task.name, unit)
    if tracker is not None:
        tracker.finish(result.out, result.run_id)
        console.print(f"tracked in MLflow: {tracker.uri} (run {tracker.run_id})")
    table = round_table(
        result.rounds,
        config.spec.task.name,
        title="fedward: rounds",
        dp_unit=unit,
        delta=config.spec.privacy.delta,
    )
    console.print(table)
    if not config.spec.secagg.secure_aggregation:
        console.print("[bold red]secure aggregation was OFF for this run (debugging only)[/]")
    console.print(f"finished in {elapsed:.0f} s")
    console.print(f"output folder: [bold]{result.out.resolve()}[/]")
    console.print(f"  adapter:  {result.adapter_dir.resolve()}  (PEFT format)")
    console.print(f"  history:  {(result.out / 'history.json').resolve()}")
    console.print(f"  plot:     {plot.resolve()}")
    console.print("use it:")
    console.print(f'  fedward predict --adapter {result.adapter_dir} "your clinical note"')
    console.print(
        "  python: fedward.common.model.load_adapter_for_inference("
        f"'{result.adapter_dir}')  (PEFT format, labels in fedward.json)"
    )


def _announce(config: RunConfig) -> None:
    data = config.simulation.data or "synthetic clinical notes"
    privacy = (
        f"DP epsilon {config.spec.privacy.target_epsilon:g} per {config.spec.privacy.dp_unit}, "
        f"delta {config.spec.privacy.delta:g}"
        if config.spec.privacy.dp
        else "[bold red]DP OFF[/]"
    )
    secagg = (
        "secure aggregation on"
        if config.spec.secagg.secure_aggregation
        else "[bold red]secure aggregation OFF[/]"
    )
    console.print(
        f"fedward simulate: {config.simulation.hospitals} hospitals x "
        f"{config.spec.federation.rounds} rounds, task "
        f"{config.spec.task.name}, model {config.spec.model.name}, data {data}; {privacy}; {secagg}"
    )


def _num(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def predict(
    texts: Annotated[list[str], typer.Argument(help="Notes to label.")],
    adapter: Annotated[Path, typer.Option(help="An adapter folder from a fedward run.")],
    top: Annotated[
        int,
        typer.Option(
            min=1,
            help="Labels shown per note, most likely first, each with its probability "
            "(classification; NER lists every entity found).",
        ),
    ] = 3,
) -> None:
    """Label notes (or find entities) with a trained global adapter."""
    quiet_libraries(False)
    from fedward.simulation.predict import predict_texts

    # the note, then one indented line per label (or entity); a blank line between notes
    typer.echo("\n\n".join(predict_texts(adapter, texts, top=top)))
