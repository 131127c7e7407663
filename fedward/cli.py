"""The `fedward` command: one Typer app that mounts each side's commands.

`simulate`, `pretrain` and `predict` come from simulation/cli.py, `run`, `server`, `certs`,
`keys` and `audit` from server/cli.py (`audit privacy` from simulation/privacy_audit/cli.py),
`client` from client/cli.py. It lives at the package's top because it composes all three;
nothing in fedward imports it.

A `FedwardError` (bad config, bad data, unknown model, refused budget...) becomes one readable
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from fedward.client.cli import client_app
from fedward.common.errors import FedwardError
from fedward.server import cli as server_cli
from fedward.server.dashboard.cli import dashboard
from fedward.simulation import cli as simulation_cli
from fedward.simulation.privacy_audit import cli as privacy_audit_cli

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Federated, differentially private fine-tuning of transformers (a task head or LoRA "
    "adapters) for medical text.",
)
app.command()(simulation_cli.simulate)
app.command()(simulation_cli.pretrain)
app.command()(simulation_cli.predict)
app.command("run")(server_cli.run)
app.add_typer(server_cli.certs_app, name="certs")
app.add_typer(server_cli.keys_app, name="keys")
app.add_typer(server_cli.server_app, name="server")
app.add_typer(client_app, name="client")
# `fedward audit privacy` joins the audit group here: server/ never imports simulation/.
server_cli.audit_app.command("privacy")(privacy_audit_cli.privacy)
app.add_typer(server_cli.audit_app, name="audit")
app.command()(dashboard)

error_console = Console(stderr=True)


def main() -> None:
    """Console-script entry point: user errors are one line on stderr and exit code 2."""
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(code) comes back as `code`
    except FedwardError as exc:
        error_console.print(f"fedward: error: {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        error_console.print("fedward: interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors come through here in standalone_mode=False
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
