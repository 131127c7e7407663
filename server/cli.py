"""The coordinator's commands: `fedward certs`, `fedward keys`, `fedward server`, `fedward run`,
`fedward audit`. Only this module prints; server/deploy.py does the work.

`simulation/cli.py` mounts these on the `fedward` command, whose `main()` turns a `FedwardError`
into one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedward.common.config import LocalSettings, RunConfig, TaskSpec
from fedward.common.errors import ConfigError
from fedward.common.files import audit_log
from fedward.common.files.output_paths import check_output_file, check_output_folder
from fedward.common.tasks import Task
from fedward.server import deploy
from fedward.server.app import kept_round, trained_a_round
from fedward.server.tracking import open_tracker

log = logging.getLogger(__name__)
console = Console()
error_console = Console(stderr=True)

certs_app = typer.Typer(
    no_args_is_help=True, help="TLS certificates for the coordinator's SuperLink."
)
keys_app = typer.Typer(no_args_is_help=True, help="SuperNode authentication keys for hospitals.")
server_app = typer.Typer(
    no_args_is_help=True, help="The coordinator's SuperLink: start it, admit hospitals."
)
audit_app = typer.Typer(
    no_args_is_help=True,
    help="Audits: verify a hash-chained audit log; measure DP privacy from outside.",
)

ServerOption = Annotated[str, typer.Option("--server", help="The SuperLink as HOST:PORT.")]
CaOption = Annotated[
    Path, typer.Option("--ca", help="CA certificate that signed the SuperLink's certificate.")
]
InsecureOption = Annotated[
    bool, typer.Option("--insecure", help="Plain HTTP, for a SuperLink started with --insecure.")
]


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# --- certs and keys --------------------------------------------------------------------------


@certs_app.command("init")
def certs_init(
    out: Annotated[
        Path, typer.Option("--out", help="Folder for ca.crt, ca.key, server.pem, server.key.")
    ],
    server_name: Annotated[
        list[str],
        typer.Option(
            "--server-name",
            help="DNS name or IP address hospitals dial (repeat for each, e.g. --server-name "
            "fl.example.org --server-name 10.0.0.5).",
        ),
    ],
    days: Annotated[int, typer.Option(help="Validity of the server certificate in days.")] = 365,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """Create a private CA and the SuperLink's certificate (no openssl needed)."""
    check_output_folder(out, "--out")
    from fedward.server.certs import init_ca_and_server

    paths = init_ca_and_server(out, server_name, days=days, overwrite=force)
    console.print(f"CA certificate:      {paths.ca_cert}  (give this to every hospital)")
    console.print(f"CA key:              {paths.ca_key}  (keep it offline; never share)")
    console.print(f"server certificate:  {paths.server_cert}  for {', '.join(server_name)}")
    console.print(f"server key:          {paths.server_key}")
    console.print(f"next: fedward server start --certs {out}")


@keys_app.command("node")
def keys_node(
    out: Annotated[Path, typer.Option("--out", help="Folder for <name>.key and <name>.pub.")],
    name: Annotated[
        str, typer.Option("--name", help="File name (e.g. the hospital's name).")
    ] = "node",
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """Create a hospital's SuperNode key pair (run it at the hospital)."""
    check_output_folder(out, "--out")
    from fedward.server.certs import make_node_keys

    paths = make_node_keys(out, name, overwrite=force)
    console.print(f"private key: {paths.private_key}  (stays at the hospital: --key)")
    console.print(f"public key:  {paths.public_key}  (send it to the coordinator)")
    console.print(f"coordinator: fedward server register {paths.public_key.name}")


# --- the SuperLink ---------------------------------------------------------------------------


@server_app.command("start")
def server_start(
    certs: Annotated[Path, typer.Option(help="Folder from `fedward certs init`.")] = Path("certs"),
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0: all; see the README on exposure).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port of the Fleet, Control and Runtime APIs.")
    ] = deploy.DEFAULT_PORT,
    database: Annotated[
        Path, typer.Option(help="SuperLink state (registered hospitals, runs).")
    ] = Path("fedward-superlink.db"),
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Turn TLS OFF (testing only; needs --no-node-auth).")
    ] = False,
    node_auth: Annotated[
        bool,
        typer.Option(
            "--node-auth/--no-node-auth", help="Admit only registered hospitals' SuperNodes."
        ),
    ] = True,
    log_file: Annotated[
        Path | None, typer.Option(help="Also write the SuperLink's log here.")
    ] = None,
) -> None:
    """Run Flower's SuperLink with TLS and SuperNode authentication (in the foreground)."""
    check_output_file(database, "--database")
    if log_file is not None:
        check_output_file(log_file, "--log-file")
    _setup_logging()
    settings = deploy.SuperLinkSettings(
        certs=None if insecure else certs,
        host=host,
        port=port,
        database=database,
        insecure=insecure,
        node_auth=node_auth,
        log_file=log_file,
    )
    command = deploy.superlink_command(settings)
    for warning in deploy.warnings_for(settings):
        log.warning(warning)
        error_console.print(f"[bold red]WARNING: {warning}[/]", highlight=False)
    security = "TLS OFF" if insecure else "TLS on"
    security += ", SuperNode authentication " + ("on" if node_auth else "OFF")
    console.print(f"fedward server: SuperLink on {host}:{port} ({security}), state {database}")
    console.print("admit a hospital: fedward server register <hospital>.pub")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, deploy.flower_env())


@server_app.command("register")
def server_register(
    public_key: Annotated[Path, typer.Argument(help="The hospital's <name>.pub.")],
    name: Annotated[
        str | None, typer.Option(help="A name for the node, kept by the SuperLink.")
    ] = None,
    server: ServerOption = f"127.0.0.1:{deploy.DEFAULT_PORT}",
    ca: CaOption = Path("certs/ca.crt"),
    insecure: InsecureOption = False,
) -> None:
    """Admit a hospital: register its SuperNode public key with the SuperLink."""
    connection = deploy.Connection(server, None if insecure else ca, insecure)
    node_id = deploy.register_node(connection, public_key, name)
    console.print(f"registered {public_key.name}: node id {node_id}")


@server_app.command("nodes")
def server_nodes(
    server: ServerOption = f"127.0.0.1:{deploy.DEFAULT_PORT}",
    ca: CaOption = Path("certs/ca.crt"),
    insecure: InsecureOption = False,
) -> None:
    """List the hospitals' SuperNodes the SuperLink knows."""
    connection = deploy.Connection(server, None if insecure else ca, insecure)
    table = Table(header_style="bold")
    for column in ("node id", "status", "online since", "offline since"):
        table.add_column(column)
    for node in deploy.list_nodes(connection):
        table.add_row(
            str(node.get("node-id", "")),
            str(node.get("status", "")),
            str(node.get("online-at", "")),
            str(node.get("offline-at", "")),
        )
    console.print(table)


# --- runs ------------------------------------------------------------------------------------


def prepare_run(config: RunConfig, resume: bool) -> RunConfig:
    """The config as submitted: labels required, `out` absolute, `resume` set; refuses to resume
    what cannot be resumed and to overwrite an unfinished run."""
    from fedward.server.resume import check_resumable, checkpoint_path, load_checkpoint, unfinished

    if config.local.evaluate_only and resume:
        raise ConfigError(
            "field 'evaluate_only': an evaluate-only run has no rounds to resume; drop --resume"
        )
    if config.simulation.colluding_hospitals:
        raise ConfigError(
            "field 'colluding_hospitals': a privacy audit's simulated colluders; remove it from "
            "the config of a deployment"
        )
    if config.simulation.seeded_dp_noise:
        raise ConfigError(
            "field 'seeded_dp_noise': simulation only (noise drawn from the run's public seed "
            "protects no one); remove it from the config of a deployment"
        )
    if not config.spec.task.labels:
        raise ConfigError(
            "field 'labels': required for a deployment, so that every hospital's model has the "
            'same outputs; list them in the config, e.g. labels = ["cardio", "respiratory"]'
        )
    out = Path(config.local.out).expanduser().resolve()
    config = config.updated(out=str(out), resume=resume)
    has_checkpoint = checkpoint_path(out).is_file()
    if resume:
        checkpoint = load_checkpoint(out)
        check_resumable(checkpoint, config.spec)
        if not unfinished(checkpoint):
            raise ConfigError(
                f"{out}: run {checkpoint.run_id} already completed all "
                f"{config.spec.federation.rounds} rounds; "
                "nothing to resume"
            )
    elif has_checkpoint:
        checkpoint = load_checkpoint(out)
        if unfinished(checkpoint):
            raise ConfigError(
                f"{out}: holds run {checkpoint.run_id}, stopped after round "
                f"{checkpoint.completed_round} of {checkpoint.config.get('rounds')}; continue it "
                "with --resume, or give another --out for a new run"
            )
    return config


def run(
    config_file: Annotated[Path, typer.Option("--config", help="TOML file with RunConfig fields.")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the stopped run in the output folder.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (overrides the config's).")
    ] = None,
    server: ServerOption = f"127.0.0.1:{deploy.DEFAULT_PORT}",
    ca: CaOption = Path("certs/ca.crt"),
    insecure: InsecureOption = False,
    detach: Annotated[bool, typer.Option("--detach", help="Submit and return at once.")] = False,
    timeout: Annotated[
        float | None, typer.Option(help="Stop following after this many seconds.")
    ] = None,
    tracking: Annotated[
        str | None,
        typer.Option(help="mlflow: record the run in <out>/mlflow.db; or an MLflow server's URI."),
    ] = None,
) -> None:
    """Submit a fedward run to the SuperLink and follow its rounds (coordinator).

    Run it on the coordinator's machine: the ServerApp writes the adapter, history.json,
    checkpoint.npz and audit.jsonl to the output folder there.
    """
    _setup_logging()
    overrides = {"out": str(out)} if out is not None else None
    config = RunConfig.from_toml(config_file, overrides=overrides)
    check_output_folder(config.local.out, "--out" if out is not None else f"{config_file}: 'out'")
    config = prepare_run(config, resume)
    connection = deploy.Connection(server, None if insecure else ca, insecure)
    if config.simulation.data:
        console.print(
            "[yellow]note: 'data' is ignored in a deployment (hospitals use their own)[/]"
        )
    if not config.spec.secagg.secure_aggregation:
        console.print("[bold red]secure aggregation is OFF for this run (debugging only)[/]")
    if tracking and detach:
        raise ConfigError("--tracking records rounds while following the run; drop --detach")
    tracker = open_tracker(tracking, config, "deployment")  # None without --tracking
    flower_run_id = deploy.submit_run(connection, config.to_flower())
    digest = config.digest()  # the run spec's: the same when resumed with another --out
    what = "resumed" if resume else "submitted"
    rounds = (
        "evaluation only (each hospital's policy decides; charged there)"
        if config.local.evaluate_only
        else f"{config.spec.federation.rounds} rounds"
    )
    console.print(
        f"fedward run: {what} as Flower run {flower_run_id}; {rounds}, task "
        f"{config.spec.task.name}, model {config.spec.model.name}; output {config.local.out}"
    )
    console.print(f"run spec sha256 (for sites' approved_run_configs): {digest}")
    if detach:
        console.print(
            f"follow: history in {config.local.out}/history.json; stop: flwr stop {flower_run_id}"
        )
        return

    rows: list[dict] = []

    def on_row(row: dict) -> None:
        rows.append(row)
        console.print(round_line(row, config.spec.task.definition), highlight=False)
        if tracker is not None:
            tracker.log_round(row)

    status = deploy.follow_run(
        connection, Path(config.local.out), flower_run_id, on_row, timeout=timeout
    )
    out_dir = Path(config.local.out)
    if tracker is not None:
        history = deploy.read_history(out_dir) or {}
        failed = str(status.get("status")) != "finished:completed"
        tracker.finish(out_dir, str(history.get("run_id", "")), failed=failed)
    _print_outputs(out_dir, rows, config.spec.task, config.spec.privacy.dp_unit, config.local)
    history_rows = (deploy.read_history(out_dir) or {}).get("rounds") or rows  # resumed: all
    _exit_unless_completed(
        status, flower_run_id, out_dir, history_rows, config.local.evaluate_only, config_file
    )


def _print_outputs(
    out_dir: Path, rows: list[dict], task: TaskSpec, dp_unit: str, local: LocalSettings
) -> None:
    """The rounds' table, the audit log's check and where the adapter is, once a run ended."""
    if rows:
        console.print(deployment_table(rows, task.definition, dp_unit))
    if (out_dir / "audit.jsonl").is_file():
        console.print(f"audit log: {audit_log.verify(out_dir / 'audit.jsonl').summary()}")
    if (out_dir / "adapter").is_dir():
        history = (deploy.read_history(out_dir) or {}).get("rounds") or rows
        kept = kept_round(history, task.definition.primary_metric, local.keep_adapter)
        console.print(
            f"adapter:   {out_dir / 'adapter'}  (PEFT format; round {kept}: "
            f"keep_adapter = {local.keep_adapter})"
        )


def _exit_unless_completed(
    status: dict,
    flower_run_id: int,
    out_dir: Path,
    history_rows: list[dict],
    evaluate_only: bool,
    config_file: Path,
) -> None:
    """Exit 1, with one line saying why, unless the run finished and trained (or, evaluate
    only, some hospital released an evaluation)."""
    state = str(status.get("status"))
    if state == "finished:completed" and evaluate_only:
        if not evaluated_by_any(history_rows):
            error_console.print(
                f"fedward: run {flower_run_id}: no hospital released an evaluation (see "
                f"'no evaluation from' above and {out_dir / 'history.json'}); a hospital answers "
                "an evaluate-only run only where its policy has allow_evaluation and "
                "evaluate_starting_adapter",
                highlight=False,
            )
            sys.exit(1)
        console.print(f"evaluated; nothing trained, so no adapter was written ({out_dir})")
        return
    if state == "finished:completed" and not trained_a_round(history_rows):
        error_console.print(
            f"fedward: run {flower_run_id} finished without training a round (every round "
            f"failed: see the status column above and {out_dir / 'history.json'}); the adapter "
            "is the untrained starting one, do not use it",
            highlight=False,
        )
        sys.exit(1)
    if state != "finished:completed":
        advice = ""
        if (out_dir / "checkpoint.npz").is_file():
            advice = f" Continue it with `fedward run --config {config_file} --resume`."
        error_console.print(
            f"fedward: run {flower_run_id} ended as {state}: "
            f"{status.get('status-details', '')}.{advice}",
            highlight=False,
        )
        sys.exit(1)


def evaluated_by_any(rows: list[dict]) -> bool:
    """Whether an evaluate-only run's history holds an evaluation some hospital released."""
    answers = [item for row in rows for item in row.get("hospitals", {}).values()]
    return any("evaluation_refused" not in item for item in answers)


def round_line(row: dict, task: Task) -> str:
    """One line per completed round, printed as it arrives (reasons as the coordinator rendered
    them from the hospitals' codes)."""
    metrics = row.get("global", {})
    headline = task.primary_metric
    trained = sorted(name for name, item in row["hospitals"].items() if item.get("trained"))
    parts = [
        f"round {row['round']}: {row['status']}",
        f"val loss {_num(metrics.get('loss'))}",
        f"{headline} {_headline_cell(metrics, task)}",
        f"trained: {', '.join(trained) or 'none'}",
    ]
    for name, reason in sorted(row.get("refused", {}).items()):
        parts.append(f"REFUSED by {name}: {reason}")
    for name, reason in sorted(row.get("rejected", {}).items()):
        parts.append(f"rejected from {name}: {reason}")
    if row.get("dropped"):
        parts.append(f"dropped: {', '.join(row['dropped'])}")
    if row.get("evaluation_refused"):
        parts.append(f"no evaluation from: {', '.join(sorted(row['evaluation_refused']))}")
    return "; ".join(parts)


def deployment_table(rows: list[dict], task: Task, dp_unit: str = "record") -> Table:
    """The round table: global metrics, who trained, who refused or dropped, epsilon (the run's
    target, per `dp_unit`)."""
    headline = task.primary_metric
    caption = f"ε: the run's target epsilon per {dp_unit}, as each hospital reports it."
    if any(_headline_cell(row.get("global", {}), task).endswith("*") for row in rows):
        caption += (
            f"\n* {headline} recorded before fedward pooled the hospitals' counts (a resumed run): "
            "the mean of the hospitals' own, not the global model's over all their rows."
        )
    table = Table(title="fedward: rounds", header_style="bold", caption=caption)
    for column in ("round", "status", "val loss", headline, "trained (ε)", "refused / dropped"):
        table.add_column(
            column, justify="right" if column in ("round", "val loss", headline) else "left"
        )
    for row in rows:
        metrics = row.get("global", {})
        trained = [
            f"{name} ({_num(item.get('epsilon'), 2)})"
            for name, item in sorted(row["hospitals"].items())
            if item.get("trained")
        ]
        missing = [f"{name}: refused" for name in sorted(row.get("refused", {}))]
        missing += [f"{name}: rejected" for name in sorted(row.get("rejected", {}))]
        missing += [f"{name}: dropped" for name in row.get("dropped", [])]
        status = (
            row["status"] if row["status"] == "ok" else f"[red]{row['status'].split(';')[0]}[/]"
        )
        table.add_row(
            str(row["round"]),
            status,
            _num(metrics.get("loss")),
            _headline_cell(metrics, task),
            ", ".join(trained) or "—",
            ", ".join(missing) or "—",
        )
    return table


def _headline_cell(metrics: dict, task: Task) -> str:
    """The round's headline score; marked `*` in a row from an older history (a run resumed
    across the change), whose global macro-F1 was the mean of the hospitals' own: such a row
    has no `hospital_mean_<score>` beside it (strategy.aggregate_evaluate)."""
    headline = task.primary_metric
    value = metrics.get(headline)
    older = headline in task.pooled_scores and f"hospital_mean_{headline}" not in metrics
    return _num(value) + ("*" if value is not None and older else "")


def _num(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


# --- audit -----------------------------------------------------------------------------------


@audit_app.command("verify")
def audit_verify(
    file: Annotated[Path, typer.Argument(help="An audit log (JSON lines).")],
    expected_last_hash: Annotated[
        str | None,
        typer.Option(help="The last hash recorded elsewhere (catches a rewritten or cut chain)."),
    ] = None,
) -> None:
    """Check every record of an audit log; report the first tampered or missing one (exit 1)."""
    result = audit_log.verify(file, expected_last_hash=expected_last_hash)
    if result.ok:
        console.print(f"{file}: {result.summary()}", highlight=False)
        return
    error_console.print(f"{file}: {result.summary()}", highlight=False)
    sys.exit(1)
