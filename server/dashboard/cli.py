"""`fedward dashboard`: serve the read-only dashboard (mounted by fedward/cli.py).

Bound to 127.0.0.1 by default: only this machine can open it. Bound to any other address, it
requires a token (given with `--token`, from `FEDWARD_DASHBOARD_TOKEN`, or a random one printed
with the address), and HTTPS with the coordinator's certificate (`--certs`, the folder of
`fedward certs init`) unless `--insecure` says plain HTTP is meant.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedward.common.errors import ConfigError

console = Console()

DEFAULT_PORT = 8050


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost': addresses other machines cannot reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dashboard(
    folders: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Run folders (`--out` of fedward simulate or fedward run), or folders holding "
            "them. Default: the current folder."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; beyond 127.0.0.1 a token is required.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = DEFAULT_PORT,
    refresh: Annotated[
        int, typer.Option(help="Seconds between page reloads while a run is in progress (0: off).")
    ] = 5,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="FEDWARD_DASHBOARD_TOKEN",
            help="Token every request must carry (default beyond 127.0.0.1: a random one).",
        ),
    ] = None,
    certs: Annotated[
        Path | None,
        typer.Option(help="Serve HTTPS with server.pem and server.key from this folder."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow plain HTTP beyond 127.0.0.1.")
    ] = False,
    superlink_db: Annotated[
        Path | None,
        typer.Option(help="The SuperLink's state database: show its registered SuperNodes."),
    ] = None,
) -> None:
    """Serve a read-only web page over run folders: rounds, refusals, charts, hospitals, audit."""
    import uvicorn

    from fedward.server.dashboard.web import DashboardSettings, create_app

    if refresh < 0:
        raise ConfigError("--refresh: seconds must be 0 (off) or more")
    ssl: dict[str, str] = {}
    if certs is not None:
        cert, key = certs / "server.pem", certs / "server.key"
        for file in (cert, key):
            if not file.is_file():
                raise ConfigError(
                    f"--certs {certs}: {file.name} is missing; use the folder of "
                    "`fedward certs init`"
                )
        ssl = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    if not is_loopback(host):
        if not ssl and not insecure:
            raise ConfigError(
                f"--host {host}: beyond 127.0.0.1 the dashboard serves HTTPS only; give --certs "
                "(the coordinator's certificate folder), or --insecure for plain HTTP"
            )
        token = token or secrets.token_urlsafe(24)
    settings = DashboardSettings(
        folders=list(folders or [Path(".")]),
        refresh=refresh,
        token=token,
        superlink_db=superlink_db,
    )
    address = shown_address("https" if ssl else "http", host, port, token)
    console.print(f"fedward dashboard (read-only) at [bold]{address}[/]", soft_wrap=True)
    if token and not ssl:
        console.print("[bold red]plain HTTP: the token travels in the clear[/]")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", ws="none", **ssl)


def shown_address(scheme: str, host: str, port: int, token: str | None) -> str:
    """The address printed at start: the one the dashboard is bound to. On all interfaces
    (0.0.0.0, ::) the machine's name where it has one other machines can use, with the bound
    address beside it; never a loopback name for a dashboard that is bound beyond it."""
    query = f"?token={token}" if token else ""
    bound = f"[{host}]" if ":" in host else host
    if host not in ("0.0.0.0", "::"):
        return f"{scheme}://{bound}:{port}/{query}"
    name = socket.getfqdn()
    if not name or name.split(".")[0] == "localhost" or is_loopback(name):
        return f"{scheme}://{bound}:{port}/{query} (all interfaces: use this machine's address)"
    return f"{scheme}://{name}:{port}/{query} (bound to {bound}:{port}, all interfaces)"
