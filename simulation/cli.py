"""`fedward simulate` and `fedward predict`: a researcher's commands (mounted by fedward/cli.py).

Only the CLI prints; library code logs.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fedward.client.personalize import OWN_FOLDER
from fedward.common.config import (
    GROUPS,
    ModelSpec,
    PrivacySpec,
    RunConfig,
    SecAggSpec,
    SimulationSettings,
    TaskSpec,
)
from fedward.common.files.output_paths import check_output_folder
from fedward.common.tasks import Task

# Wide when piped to a file or log, so paths and commands are never broken across lines.
console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)
error_console = Console(stderr=True)


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
#: `colluding_hospitals` makes hospitals skip their noise: for `fedward audit privacy` only.
_NOT_SIMULATE_OPTIONS = {"resume", "colluding_hospitals"}


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


#: What `fedward pretrain` fixes: one site holding all the public data, trained without DP and
#: without secure aggregation (there is nothing private to protect, and nobody to mask from).
PRETRAIN_FIXED = {
    "hospitals": 1,
    "min_hospitals": 1,
    "fraction": 1.0,
    "partition": "iid",
    "dp": False,
    "secure_aggregation": False,
    "dropout_rate": 0.0,
}
#: Flags `fedward pretrain` does not take: it sets them itself (`PRETRAIN_FIXED`), or they only
#: mean something under DP or with several hospitals.
_NOT_PRETRAIN_OPTIONS = (
    _NOT_SIMULATE_OPTIONS
    | set(PRETRAIN_FIXED)
    | {
        "alpha",
        "notes_per_hospital",
        "target_epsilon",
        "dp_unit",
        "noise",
        "noise_hospitals",
        "noise_sample_rate",
        "server_learning_rate",
        "delta",
        "max_grad_norm",
        "secagg_neighbours",
        "secagg_threshold",
        "secagg_clip",
        "secagg_bits",
        "secagg_max_weight",
        "evaluate_only",
    }
)


def pretrain(
    config_file: Annotated[
        Path | None, typer.Option("--config", help="TOML file with any RunConfig field.")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower/Ray logs.")] = False,
    **fields: Any,
) -> None:
    """Train a starting adapter on public data: centralized, one site, without DP.

    The coordinator runs it on public labelled text it holds (no privacy cost: nothing private
    is read); the output's `adapter` folder is what a private run names as `init_adapter` and
    hospitals pin by its hash (`fedward client adapter-hash`). Same tasks, models and outputs as
    `fedward simulate`, through the same training code.
    """
    quiet_libraries(verbose)
    flags = {name: value for name, value in fields.items() if value not in (None, [])}
    config = load_config(config_file, flags)
    config = config.updated(**PRETRAIN_FIXED)  # a shared run.toml's DP settings do not apply
    check_output_folder(config.local.out, "--out")
    run_simulation_with_report(config, verbose, None, title="fedward pretrain")


_pretrain_fixed = list(inspect.signature(pretrain, eval_str=True).parameters.values())[:-1]
pretrain.__signature__ = inspect.Signature(
    _pretrain_fixed + field_options(list(GROUPS), _NOT_PRETRAIN_OPTIONS)
)


def rounds_progress() -> Progress:
    """The progress bar of a federated run: a spinner, the rounds done of all, the time."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=console,
    )


@contextmanager
def watch_progress(out: Path, progress: Progress, bar, what: str) -> Iterator[None]:
    """While the block runs, show on the bar what the hospitals of the current round are doing
    (loading the model, training, evaluating; how many are done), from the progress file the
    simulated hospitals append to (`simulation/app.py`); the file is deleted afterwards."""
    from fedward.simulation.app import PROGRESS_FILE, describe_progress

    path = out / PROGRESS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("", encoding="utf-8")  # the hospitals append to it only where it exists
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(1.0):
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError:
                continue
            now = describe_progress(lines)
            progress.update(bar, description=f"{what} ({escape(now)})" if now else what)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        progress.update(bar, description=what)
        path.unlink(missing_ok=True)


def run_simulation_with_report(
    config: RunConfig,
    verbose: bool = False,
    tracking: str | None = None,
    title: str = "fedward simulate",
) -> None:
    """Simulate with a progress bar and a row per round, then print the report."""
    from fedward.common.model import load_tokenizer
    from fedward.server.app import trained_a_round
    from fedward.server.tracking import open_tracker
    from fedward.simulation.hospitals import prepare_config
    from fedward.simulation.runner import simulate as run_simulation

    config = prepare_config(config)  # reads and checks the data before anything starts
    load_tokenizer(config.spec.model.name)  # an unknown model fails here, not inside a worker
    if config.spec.model.init_adapter:  # so does a starting adapter that does not fit the run
        from fedward.common.model import build_model

        build_model(config.spec, len(config.spec.task.labels or []))
    spec = config.spec
    _announce(
        config.simulation,
        task=spec.task,
        model=spec.model,
        privacy=spec.privacy,
        secagg=spec.secagg,
        rounds=spec.federation.rounds,
        evaluate_only=config.local.evaluate_only,
        title=title,
    )
    tracker = open_tracker(tracking, config, "simulation")  # None without --tracking
    started = time.monotonic()
    with rounds_progress() as progress:
        what = "training" if config.simulation.hospitals == 1 else "federated training"
        evaluate_only = config.local.evaluate_only
        bar = progress.add_task(
            "federated evaluation" if evaluate_only else what,
            total=1 if evaluate_only else config.spec.federation.rounds,
        )

        def on_round(row: dict) -> None:
            metrics = row["global"]
            headline = config.spec.task.definition.primary_metric
            score = metrics.get(headline)
            progress.console.print(
                f"round {row['round']}: {row['status']}, val loss "
                f"{_num(metrics.get('loss'))}, {headline} {_num(score)} ({row['seconds']:.0f} s)"
            )
            progress.advance(bar)
            if tracker is not None:
                tracker.log_round(row)

        with watch_progress(Path(config.local.out), progress, bar, progress.tasks[0].description):
            result = run_simulation(config, on_round=on_round, verbose=verbose)
    elapsed = time.monotonic() - started
    task = config.spec.task.definition
    plot = _print_rounds(result, task, config.spec.privacy, tracker)
    if not config.spec.secagg.secure_aggregation and config.simulation.hospitals > 1:
        console.print("[bold red]secure aggregation was OFF for this run (debugging only)[/]")
    if config.local.evaluate_only:
        console.print(f"evaluated in {elapsed:.0f} s; nothing trained, so no adapter was written")
        console.print(f"  history:  {(result.out / 'history.json').resolve()}")
        return
    if not trained_a_round(result.rounds):
        console.print(f"history:  {(result.out / 'history.json').resolve()}")
        console.print(f"plot:     {plot.resolve()}")
        error_console.print(
            f"fedward: error: no round trained in {elapsed:.0f} s (every round failed: see the "
            f"status column above and {result.out / 'history.json'}); the adapter in "
            f"{result.adapter_dir} is the untrained starting one, do not use it",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    console.print(f"finished in {elapsed:.0f} s")
    _print_outputs(result, plot, task, config.local.keep_adapter)


def _print_rounds(result, task: Task, privacy: PrivacySpec, tracker) -> Path:
    """The run's plot (saved), the tracker's last word, the table of rounds and, where each
    hospital fitted its own model, what joining gave it; the plot's path."""
    from fedward.simulation.report import round_table, save_plot, worth_joining_table

    unit = privacy.dp_unit
    plot = save_plot(result.rounds, result.out / "metrics.png", task, unit)
    if tracker is not None:
        tracker.finish(result.out, result.run_id)
        console.print(f"tracked in MLflow: {tracker.uri} (run {tracker.run_id})")
    table = round_table(
        result.rounds,
        task,
        title="fedward: rounds",
        dp_unit=unit,
        delta=privacy.delta,
    )
    console.print(table)
    joined = worth_joining_table(result.rounds, task)
    if joined is not None:
        console.print(joined)
    return plot


def _print_outputs(result, plot: Path, task: Task, keep_adapter: str) -> None:
    """Where the run's outputs are, and how to use its adapter."""
    console.print(f"output folder: [bold]{result.out.resolve()}[/]")
    kept = kept_adapter_note(result.rounds, task, keep_adapter)
    console.print(f"  adapter:  {result.adapter_dir.resolve()}  (PEFT format; {kept})")
    console.print(f"  history:  {(result.out / 'history.json').resolve()}")
    console.print(f"  plot:     {plot.resolve()}")
    own = result.out / OWN_FOLDER
    if own.is_dir():
        console.print(
            f"  own:      {own.resolve()}/<hospital>  (each hospital's own adapter: not DP)"
        )
    console.print("use it:")
    console.print(f'  fedward predict --adapter {result.adapter_dir} "your clinical note"')
    console.print(
        "  python: fedward.common.model.load_adapter_for_inference("
        f"'{result.adapter_dir}')  (PEFT format, labels in fedward.json)"
    )


def kept_adapter_note(rounds: list[dict], task: Task, keep_adapter: str) -> str:
    """Which round's adapter the output holds, and by which rule (`keep_adapter`)."""
    from fedward.server.app import kept_round

    score = task.primary_metric
    kept = kept_round(rounds, score, keep_adapter)
    of = f"round {kept} of {len(rounds)}"
    value = next((row["global"].get(score) for row in rounds if row["round"] == kept), None)
    if keep_adapter == "last" or value is None:
        return f"{of}, the last"
    return f"{of}, the best {score} {value:.3f}; --keep-adapter last keeps the last"


def _announce(
    simulation: SimulationSettings,
    *,
    task: TaskSpec,
    model: ModelSpec,
    privacy: PrivacySpec,
    secagg: SecAggSpec,
    rounds: int,
    evaluate_only: bool,
    title: str = "fedward simulate",
) -> None:
    """The run's headline before it starts: hospitals, rounds, task, model, data, privacy and
    secure aggregation, what trains, and the warnings a simulation's settings call for."""
    data = simulation.data or "synthetic clinical notes"
    dp_line = (
        f"DP epsilon {privacy.target_epsilon:g} per {privacy.dp_unit}, delta {privacy.delta:g}"
        if privacy.dp
        else "[bold red]DP OFF[/]"
    )
    secagg_line = (
        "secure aggregation on"
        if secagg.secure_aggregation
        else "[bold red]secure aggregation OFF[/]"
    )
    how_long = "evaluation only" if evaluate_only else f"{rounds} rounds"
    console.print(
        f"{title}: {simulation.hospitals} hospitals x {how_long}, task "
        f"{task.name}, model {model.name}, data {data}; {dp_line}; {secagg_line}"
    )
    if simulation.colluding_hospitals:
        console.print(
            f"[bold yellow]{simulation.colluding_hospitals} hospitals collude and add no "
            "noise share (colluding_hospitals): the epsilon printed is the run's target, not what "
            "the honest hospitals get; for privacy audits[/]"
        )
    if privacy.dp and simulation.seeded_dp_noise:
        console.print(
            "[bold yellow]DP noise seeded from the run's seed (--seeded-dp-noise): reproducible "
            "figures, no privacy; simulation only[/]"
        )
    console.print(f"trains: {what_trains(model, task)}")
    if model.init_adapter:
        from fedward.common.model import starting_adapter_record
        from fedward.common.warm_start import LabelMapping

        start = starting_adapter_record(model, task)
        mapping = LabelMapping(**{k: tuple(v) for k, v in start["labels"].items()})
        console.print(
            f"starts from adapter {start['path']} (sha256 {start['sha256'][:16]}...); labels: "
            f"{mapping.describe()}"
        )


def what_trains(model: ModelSpec, task_spec: TaskSpec) -> str:
    """One line saying what trains, and whether it is the task's default (the README's why)."""
    variant = model.lora_variant
    task = task_spec.definition
    warm = bool(model.init_adapter)
    default = task.warm_start_lora_variant if warm else task.lora_variant
    layers = model.lora_layers
    where = "all layers" if not layers else f"the top {layers} layers"
    described = {
        "head": "the task head alone, on the frozen encoder",
        "lora": f"LoRA (rank {model.lora_rank}) in {where} and the task head",
        "ffa": f"FFA-LoRA (B only, rank {model.lora_rank}) in {where} and the head",
    }[variant]
    if model.init_adapter and variant in ("head", "ffa"):
        frozen = "LoRA factors" if variant == "head" else "A factors"
        described += f", the starting adapter's {frozen} frozen in it"
    start = " from a starting adapter" if warm else ""
    default_note = f" (the {task.name} default{start})"
    return described + (default_note if variant == default else "")


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
