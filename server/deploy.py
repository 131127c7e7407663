"""The coordinator's side of a deployment, on Flower's own programs (flwr 1.41).

- `superlink_command`: the `flower-superlink` command line: HTTPS (TLS) and SuperNode
  authentication on by default, a state database so registrations and runs survive a restart,
  and no runtime dependency installation (fedward is pip-installed on both sides).
- `register_node`, `list_nodes`, `submit_run`, `run_status`, `stop_run`: the `flwr` CLI against
  the SuperLink's Control API, through a private `$FLWR_HOME/config.toml` holding one connection.
- `app_pyproject` / `write_app`: the Flower app folder `flwr run` bundles into a FAB. It holds a
  pyproject.toml only: components `server.app:app` / `client.app:app`, found on the installed
  fedward package (Flower imports components from the FAB folder first, then from sys.path),
  and the run's whole config as the app's config table.
- `follow_run`: watches `<out>/history.json` (written by the ServerApp after each round) and the
  run's Flower status until the run ends; the CLI draws the round table from it.

Security: in flwr 1.41 the Control API (register nodes, start runs) is served on the SAME port as
the Fleet API that hospitals dial, and open-source Flower does not authenticate it. Only the
`/v1/fleet/` paths should be reachable from outside the coordinator (firewall / reverse proxy);
see the README.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedward.common.config import RunConfig, flat_names
from fedward.common.errors import ConfigError, FedwardError
from fedward.common.programs import flower_env, flower_program

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000
#: Name of the one SuperLink connection in fedward's private FLWR_HOME.
CONNECTION = "fedward"
#: Name of the generated Flower app (a FAB project name: letters, digits, hyphens).
APP_NAME = "fedward-deployment"
#: Flower run statuses that mean the run is over.
FINISHED = "finished"
#: A value of Flower's run config (`RunConfig.to_flower`: lists as JSON, None left out).
FlowerValue = bool | int | float | str


class FlowerCommandError(FedwardError):
    """A Flower program refused or failed; the message carries Flower's own explanation."""


# --- programs --------------------------------------------------------------------------------


# --- the SuperLink ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SuperLinkSettings:
    """How `fedward server start` runs Flower's SuperLink.

    Attributes:
        certs: Folder with `ca.crt`, `server.pem`, `server.key` (`fedward certs init`).
        host: Interface to listen on (Flower's default 127.0.0.1: reachable from this machine
            only; use the address hospitals dial, or 0.0.0.0, behind a firewall).
        port: The one port of the Fleet, Control and Runtime APIs.
        database: SQLite file of the SuperLink's state (registered nodes, runs); None keeps it
            in memory, so a restart forgets every registered hospital.
        insecure: Plain HTTP, no TLS. Testing only; cannot authenticate nodes.
        node_auth: Admit only SuperNodes whose public key was registered.
        log_file: Where the SuperLink writes its (rotated) log, besides the console.
    """

    certs: Path | None = Path("certs")
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    database: Path | None = Path("fedward-superlink.db")
    insecure: bool = False
    node_auth: bool = True
    log_file: Path | None = None


def superlink_command(settings: SuperLinkSettings) -> list[str]:
    """The `flower-superlink` command line for `settings`; `ConfigError` for unsafe or
    impossible combinations (auth without TLS, missing certificate files)."""
    if not 0 < settings.port < 65536:
        raise ConfigError(f"--port {settings.port}: not a TCP port (1-65535)")
    command = [flower_program("flower-superlink"), "--host", settings.host]
    command += ["--port", str(settings.port), "--disable-runtime-dependency-installation"]
    if settings.insecure:
        if settings.node_auth:
            raise ConfigError(
                "--insecure turns TLS off, and SuperNode authentication needs TLS: add "
                "--no-node-auth to run without both (local testing only), or drop --insecure"
            )
        command.append("--insecure")
    else:
        if settings.certs is None:
            raise ConfigError("--certs: give the folder made by `fedward certs init`")
        files = [
            settings.certs / "ca.crt",
            settings.certs / "server.pem",
            settings.certs / "server.key",
        ]
        missing = [str(path) for path in files if not path.is_file()]
        if missing:
            raise ConfigError(
                f"{missing[0]}: TLS file not found; create the CA and server certificate with "
                f"`fedward certs init --out {settings.certs} --server-name HOST`"
            )
        command += ["--ssl-ca-certfile", str(files[0]), "--ssl-certfile", str(files[1])]
        command += ["--ssl-keyfile", str(files[2])]
    if settings.node_auth:
        command.append("--enable-supernode-auth")
    if settings.database is not None:
        settings.database.parent.mkdir(parents=True, exist_ok=True)
        command += ["--database", str(settings.database)]
    if settings.log_file is not None:
        command += ["--log-file", str(settings.log_file)]
    return command


def warnings_for(settings: SuperLinkSettings) -> list[str]:
    """What an operator must be told before this SuperLink starts (logged loudly)."""
    warnings = []
    if settings.insecure:
        warnings.append(
            "INSECURE MODE: TLS is OFF and SuperNode authentication is OFF. Model updates, "
            "metrics and control requests travel in plain text and ANY machine that reaches "
            f"port {settings.port} can join as a hospital. Local testing only."
        )
    elif not settings.node_auth:
        warnings.append(
            "SuperNode authentication is OFF: any machine that trusts the CA and reaches the "
            "port can join as a hospital."
        )
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        warnings.append(
            f"listening on {settings.host}:{settings.port}: Flower 1.41 serves its Control API "
            "(register nodes, start and stop runs) on this same port WITHOUT authentication. "
            "Let hospitals reach only the /v1/fleet/ paths (firewall or reverse proxy)."
        )
    if settings.database is None:
        warnings.append("no --database: registered hospitals and runs are forgotten on restart")
    return warnings


# --- the flwr CLI (Control API) --------------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    """How the coordinator's tools reach the SuperLink's Control API.

    Attributes:
        address: host:port of the SuperLink.
        root_certificates: The CA certificate (`ca.crt`) that signed the server's certificate.
        insecure: Plain HTTP (only for a SuperLink started with --insecure).
    """

    address: str = f"127.0.0.1:{DEFAULT_PORT}"
    root_certificates: Path | None = Path("certs/ca.crt")
    insecure: bool = False

    def config_toml(self) -> str:
        """`$FLWR_HOME/config.toml` with this connection as the default SuperLink."""
        lines = [
            "[superlink]",
            f"default = {toml_value(CONNECTION)}",
            "",
            f"[superlink.{CONNECTION}]",
        ]
        lines.append(f"address = {toml_value(self.address)}")
        if self.insecure:
            lines.append("insecure = true")
        else:
            if self.root_certificates is None or not self.root_certificates.is_file():
                raise ConfigError(
                    f"--ca {self.root_certificates}: CA certificate not found; pass the ca.crt "
                    "made by `fedward certs init` (or --insecure for a plain-HTTP SuperLink)"
                )
            lines.append(f"root-certificates = {toml_value(str(self.root_certificates.resolve()))}")
        return "\n".join(lines) + "\n"


@contextlib.contextmanager
def flwr_home(connection: Connection) -> Iterator[dict[str, str]]:
    """A throw-away FLWR_HOME holding `connection`; yields the environment to run `flwr` in.

    Private, so fedward never edits the user's own ~/.flwr/config.toml.
    """
    with tempfile.TemporaryDirectory(prefix="fedward-flwr-") as home:
        Path(home, "config.toml").write_text(connection.config_toml(), encoding="utf-8")
        yield flower_env({"FLWR_HOME": home})


def flwr_cli(connection: Connection, args: list[str], timeout: float = 120.0) -> dict[str, Any]:
    """Run `flwr <args> <connection> --format json` and return its JSON answer.

    Raises `FlowerCommandError` with Flower's message when the command fails.
    """
    with flwr_home(connection) as env:
        command = [flower_program("flwr"), *args, CONNECTION, "--format", "json"]
        log.debug("running %s", " ".join(command))
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, env=env, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise FlowerCommandError(
                f"`flwr {args[0]}` did not answer within {timeout:.0f} s; is the SuperLink at "
                f"{connection.address} running?"
            ) from None
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict) or not answer.get("success", False):
        message = (answer or {}).get("error-message") if isinstance(answer, dict) else None
        message = message or (
            done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}"
        )
        raise FlowerCommandError(f"`flwr {' '.join(args[:2])}` failed: {_one_paragraph(message)}")
    return answer


def register_node(connection: Connection, public_key: Path, name: str | None = None) -> int:
    """Admit a hospital: register its SuperNode public key; returns the node id."""
    if not public_key.is_file():
        raise ConfigError(f"{public_key}: public key not found (the hospital's `<name>.pub`)")
    args = ["supernode", "register", str(public_key)]
    if name:
        args += ["--name", name]
    answer = flwr_cli(connection, args)
    return int(answer["node-id"])


def list_nodes(connection: Connection) -> list[dict[str, Any]]:
    """The SuperNodes the SuperLink knows (registered, online or not)."""
    answer = flwr_cli(connection, ["supernode", "list"])
    return list(answer.get("nodes", []))


def run_status(connection: Connection, flower_run_id: int) -> dict[str, Any]:
    """Flower's record of one run: 'status' ('running', 'finished:completed', ...), details."""
    answer = flwr_cli(connection, ["list", "--run-id", str(flower_run_id)])
    runs = answer.get("runs") or []
    if not runs:
        raise FlowerCommandError(f"the SuperLink knows no run {flower_run_id}")
    return dict(runs[0])


def stop_run(connection: Connection, flower_run_id: int) -> None:
    """Ask the SuperLink to stop a run."""
    flwr_cli(connection, ["stop", str(flower_run_id)])


# --- the app bundle ---------------------------------------------------------------------------


def toml_value(value: bool | float | str) -> str:
    """A scalar as a TOML value (strings as basic strings, JSON escaping is valid TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def app_config_table(run_config: Mapping[str, FlowerValue]) -> dict[str, FlowerValue]:
    """Every RunConfig field as Flower app config ('-' for '_'; lists as JSON; None as ""):
    `run_config` is the run's Flower form (`RunConfig.to_flower`), the fields it lacks empty."""
    table = {}
    for name in flat_names(RunConfig):
        key = name.replace("_", "-")
        table[key] = run_config.get(key, "")
    return table


def app_pyproject(run_config: Mapping[str, FlowerValue]) -> str:
    """pyproject.toml of the Flower app `fedward run` submits: components and the run config
    (`RunConfig.to_flower`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        fedward_version = version("fedward")
    except PackageNotFoundError:
        fedward_version = "0.0.0"
    lines = [
        "# Generated by `fedward run`: the fedward deployment app with one run's configuration.",
        "# The code is the fedward package installed on the coordinator and on every hospital.",
        "[build-system]",
        'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f'name = "{APP_NAME}"',
        f"version = {toml_value(fedward_version)}",
        'description = "fedward: federated DP LoRA fine-tuning across hospitals"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedward"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedward.server.app:app"',
        'clientapp = "fedward.client.app:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {toml_value(value)}" for key, value in app_config_table(run_config).items()]
    return "\n".join(lines) + "\n"


def write_app(folder: Path, run_config: Mapping[str, FlowerValue]) -> Path:
    """Write the app folder (`<folder>/fedward-deployment/pyproject.toml`) for the run config
    `run_config` (`RunConfig.to_flower`); returns its path."""
    app_dir = folder / APP_NAME
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(app_pyproject(run_config), encoding="utf-8")
    return app_dir


def submit_run(connection: Connection, run_config: Mapping[str, FlowerValue]) -> int:
    """Submit a new Flower run of the fedward app with `run_config` (`RunConfig.to_flower`);
    returns Flower's run id."""
    with tempfile.TemporaryDirectory(prefix="fedward-app-") as folder:
        app_dir = write_app(Path(folder), run_config)
        answer = flwr_cli(connection, ["run", str(app_dir)])
    return int(answer["run-id"])


# --- following a run -------------------------------------------------------------------------


def read_history(out: Path) -> dict[str, Any] | None:
    """`<out>/history.json`, or None while it does not exist (or is being replaced)."""
    try:
        return json.loads((out / "history.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def follow_run(
    connection: Connection,
    out: Path,
    flower_run_id: int,
    on_row: Callable[[dict], None],
    poll_seconds: float = 1.0,
    status_seconds: float = 10.0,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Call `on_row` for each round the run completes, until Flower reports it finished.

    Rows are read from `<out>/history.json` of this Flower run only (an older history in the
    folder is ignored). Returns Flower's final record of the run ('status', 'status-details').
    """
    seen = 0
    started = time.monotonic()
    next_status = started
    while True:
        rows, seen = _new_rows(read_history(out), flower_run_id, seen)
        for row in rows:
            on_row(row)
        now = time.monotonic()
        if now >= next_status:
            status = run_status(connection, flower_run_id)
            if str(status.get("status", "")).startswith(FINISHED):
                rows, seen = _new_rows(read_history(out), flower_run_id, seen)
                for row in rows:
                    on_row(row)
                return status
            next_status = now + status_seconds
        if timeout is not None and now - started > timeout:
            raise FlowerCommandError(
                f"run {flower_run_id} still not finished after {timeout:.0f} s; it goes on at "
                "the SuperLink (`fedward run --resume` continues it if it stops)"
            )
        time.sleep(poll_seconds)


def _new_rows(
    history: dict[str, Any] | None, flower_run_id: int, seen: int
) -> tuple[list[dict], int]:
    """Rows of `history` not shown yet, and the new count of rows shown.

    Only a history written by this Flower run counts, and a resumed run's inherited rounds
    (before its `first_round`) are not new.
    """
    if history is None or str(history.get("flower_run_id")) != str(flower_run_id):
        return [], seen
    rows = history.get("rounds", [])
    start = max(seen, _rows_before(history, rows))
    return rows[start:], max(seen, len(rows))


def _rows_before(history: dict[str, Any], rows: list[dict]) -> int:
    """Rows a resumed run inherited: those before its `first_round`."""
    first = history.get("first_round")
    if isinstance(first, int):
        return sum(1 for row in rows if row.get("round", 0) < first)
    return 0


def _one_paragraph(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Using SuperLink:")]
    return " ".join(lines)
