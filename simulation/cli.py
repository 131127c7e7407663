"""`fedward simulate` and `fedward predict`: a researcher's commands (mounted by fedward/cli.py).

Only the CLI prints; library code logs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fedward.common.config import RunConfig
from fedward.common.tasks import task_named

# Wide when piped to a file or log, so paths and commands are never broken across lines.
console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)


def _flags(**values: Any) -> dict[str, Any]:
    """CLI flags the user actually gave (None means: keep the config file's or default value)."""
    return {key: value for key, value in values.items() if value is not None}


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
    hospitals: Annotated[int | None, typer.Option(help="Simulated hospitals [default: 3].")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds [default: 3].")] = None,
    data: Annotated[
        str | None, typer.Option(help="CSV/JSONL (or CoNLL for NER); default: synthetic notes.")
    ] = None,
    text_column: Annotated[str | None, typer.Option(help="Text column [default: text].")] = None,
    label_column: Annotated[str | None, typer.Option(help="Label column [default: label].")] = None,
    partition: Annotated[
        str | None, typer.Option(help="iid | dirichlet | blocks | column:NAME | auto.")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet alpha [default: 0.5].")] = None,
    task: Annotated[str | None, typer.Option(help="classification | ner.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Base model folder or hub id [default: packaged MiniLM].")
    ] = None,
    epsilon: Annotated[
        float | None, typer.Option(help="Target epsilon per hospital for the run [default: 8].")
    ] = None,
    dp: Annotated[
        bool | None, typer.Option("--dp/--no-dp", help="Differential privacy [default: on].")
    ] = None,
    secure_aggregation: Annotated[
        bool | None,
        typer.Option(
            "--secure-aggregation/--no-secure-aggregation",
            help="SecAgg+ masking of updates [default: on]; off only for debugging.",
        ),
    ] = None,
    fraction: Annotated[float | None, typer.Option(help="Hospitals sampled per round.")] = None,
    min_hospitals: Annotated[
        int | None, typer.Option(help="Fewest hospitals a round may train with [default: 2].")
    ] = None,
    notes_per_hospital: Annotated[
        int | None, typer.Option(help="Synthetic notes per hospital [default: 400].")
    ] = None,
    dropout_rate: Annotated[
        float | None, typer.Option(help="Chance a sampled hospital fails mid-round [default: 0].")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes [default: what the machine holds].")
    ] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Expected batch size.")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    lora_variant: Annotated[str | None, typer.Option(help="lora | ffa.")] = None,
    out: Annotated[str | None, typer.Option(help="Output folder [default: fedward-out].")] = None,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="TOML file with RunConfig fields.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed [default: 42].")] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower/Ray logs.")] = False,
) -> None:
    """Run a federated fine-tuning across simulated hospitals on this machine."""
    quiet_libraries(verbose)
    flags = _flags(
        hospitals=hospitals,
        rounds=rounds,
        data=data,
        text_column=text_column,
        label_column=label_column,
        partition=partition,
        alpha=alpha,
        task=task,
        model=model,
        epsilon=epsilon,
        dp=dp,
        secure_aggregation=secure_aggregation,
        fraction=fraction,
        min_hospitals=min_hospitals,
        notes_per_hospital=notes_per_hospital,
        dropout_rate=dropout_rate,
        workers=workers,
        local_epochs=local_epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        lora_variant=lora_variant,
        out=out,
        seed=seed,
    )
    config = load_config(config_file, flags)
    run_simulation_with_report(config, verbose)


def run_simulation_with_report(config: RunConfig, verbose: bool = False) -> None:
    """Simulate with a progress bar and a row per round, then print the report."""
    from fedward.common.model import load_tokenizer
    from fedward.simulation.hospitals import prepare_config
    from fedward.simulation.report import round_table, save_plot
    from fedward.simulation.runner import simulate as run_simulation

    config = prepare_config(config)  # reads and checks the data before anything starts
    load_tokenizer(config.model)  # an unknown model fails here, not inside a worker
    _announce(config)
    started = time.monotonic()
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("federated training", total=config.rounds)

        def on_round(row: dict) -> None:
            metrics = row["global"]
            headline = task_named(config.task).primary_metric
            score = metrics.get(headline)
            progress.console.print(
                f"round {row['round']}: {row['status']}, val loss "
                f"{_num(metrics.get('loss'))}, {headline} {_num(score)} ({row['seconds']:.0f} s)"
            )
            progress.advance(bar)

        result = run_simulation(config, on_round=on_round, verbose=verbose)
    elapsed = time.monotonic() - started
    plot = save_plot(result.rounds, result.out / "metrics.png", config.task)
    console.print(round_table(result.rounds, config.task, title="fedward: rounds"))
    if not config.secure_aggregation:
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
    data = config.data or "synthetic clinical notes"
    privacy = (
        f"DP epsilon {config.epsilon:g}, delta {config.delta:g}"
        if config.dp
        else "[bold red]DP OFF[/]"
    )
    secagg = (
        "secure aggregation on"
        if config.secure_aggregation
        else "[bold red]secure aggregation OFF[/]"
    )
    console.print(
        f"fedward simulate: {config.hospitals} hospitals x {config.rounds} rounds, task "
        f"{config.task}, model {config.model}, data {data}; {privacy}; {secagg}"
    )


def _num(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def predict(
    texts: Annotated[list[str], typer.Argument(help="Notes to label.")],
    adapter: Annotated[Path, typer.Option(help="An adapter folder from a fedward run.")],
) -> None:
    """Label notes (or find entities) with a trained global adapter."""
    quiet_libraries(False)
    from fedward.simulation.predict import predict_texts

    for line in predict_texts(adapter, texts):
        typer.echo(line)  # plain tab-separated lines: easy to read and to parse
