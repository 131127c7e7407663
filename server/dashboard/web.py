"""The dashboard's web app: three read-only pages rendered on the server (Starlette + Jinja2).

- `/`: the runs under the dashboard's folders (state, rounds, audit chain), every hospital's
  latest state, and the SuperLink's registered SuperNodes when its database is given;
- `/run?key=...`: one run: its round table (status, participants, refusals with the
  coordinator's rendering of reason codes, global metrics, epsilon per hospital), its two charts,
  its hospitals and the audit chain's verification;
- `/plot?key=...&chart=metrics|epsilon`: a chart as SVG.

Pages reload themselves (`<meta http-equiv="refresh">`) every `refresh` seconds while a run is
in progress, so a coordinator follows rounds as they land. Every file is read anew on each
request; nothing is cached but the folders given at start, and nothing is written.

Security. Only GET exists. A run is named by a key from the server's own scan of its folders,
never by a path from the request, so no request reaches a file outside them. Text that came from
a hospital (its name) is escaped by Jinja2's autoescape, charts are served as images (an SVG in
an `<img>` runs no script), and the Content-Security-Policy forbids scripts altogether. With a
`token`, every request must carry it (`?token=` once, which sets an HttpOnly cookie, or an
`Authorization: Bearer` header); the CLI requires one when the dashboard listens beyond
127.0.0.1.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from fedward.server.dashboard import hospital_states, nodes, plots, runs

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
COOKIE = "fedward_dashboard_token"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
        "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class DashboardSettings:
    """What `fedward dashboard` serves.

    Attributes:
        folders: Run folders, or folders holding run folders (two levels down).
        refresh: Seconds between reloads of a page while a run is in progress (0: never).
        token: When set, every request must carry it.
        superlink_db: The SuperLink's state database, for the registered SuperNodes.
    """

    folders: list[Path] = field(default_factory=lambda: [Path(".")])
    refresh: int = 5
    token: str | None = None
    superlink_db: Path | None = None


def create_app(settings: DashboardSettings) -> Starlette:
    """The dashboard as an ASGI app (serve it with uvicorn; test it with Starlette's client).

    Example:
        >>> from pathlib import Path
        >>> app = create_app(DashboardSettings(folders=[Path("fedward-out")]))
        >>> # uvicorn.run(app, host="127.0.0.1", port=8050)
    """
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.globals.update(age=runs.age, fmt=_fmt, query=urlencode)
    pages = _Pages(settings, environment)
    return Starlette(
        routes=[
            Route("/", pages.index, methods=["GET"]),
            Route("/run", pages.run_page, methods=["GET"]),
            Route("/plot", pages.plot, methods=["GET"]),
        ]
    )


@dataclass
class _Pages:
    """The dashboard's three pages, each behind the token: the runs, one run, a run's chart."""

    settings: DashboardSettings
    environment: Environment

    def page(self, name: str, status_code: int = 200, **context) -> HTMLResponse:
        template = self.environment.get_template(name)
        html = template.render(refresh=self.settings.refresh, **context)
        return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)

    def scan(self) -> tuple[list[runs.RunFolder], list[str]]:
        return runs.find_runs(self.settings.folders)

    def folder_for(self, request: Request) -> runs.RunFolder | None:
        key = request.query_params.get("key", "")
        return next((folder for folder in self.scan()[0] if folder.key == key), None)

    async def index(self, request: Request) -> Response:
        settings = self.settings
        if (denied := _check_token(request, settings.token)) is not None:
            return denied
        folders, notes = self.scan()
        views = [runs.read_run(folder) for folder in folders]
        views.sort(key=lambda view: view.last_update or 0.0, reverse=True)  # newest first
        node_list, node_problem = [], ""
        if settings.superlink_db is not None:
            node_list, node_problem = nodes.read_nodes(settings.superlink_db)
        return self.page(
            "index.html",
            views=views,
            notes=notes,
            folders=settings.folders,
            hospitals=hospital_states.latest_states(views),
            nodes=node_list,
            node_problem=node_problem,
            superlink_db=settings.superlink_db,
            auto_refresh=True,
            now=time.time(),
        )

    async def run_page(self, request: Request) -> Response:
        if (denied := _check_token(request, self.settings.token)) is not None:
            return denied
        folder = self.folder_for(request)
        if folder is None:
            key = request.query_params.get("key", "")
            return self.page("missing.html", status_code=404, key=key)
        view = runs.read_run(folder)
        unit = plots.privacy_unit(view.definition, view.config.get("dp_unit"))
        return self.page(
            "run.html",
            view=view,
            columns=plots.metric_columns(view.definition, view.rounds),
            names=runs.hospital_names(view.rounds),
            hospitals=hospital_states.hospital_states(view),
            joining=runs.worth_joining(view.rounds),
            refusals=runs.refusals,
            evaluation_refusals=runs.evaluation_refusals,
            participants=runs.participants,
            unit=unit,
            auto_refresh=view.state not in ("finished", "failed"),
            now=time.time(),
        )

    async def plot(self, request: Request) -> Response:
        if (denied := _check_token(request, self.settings.token)) is not None:
            return denied
        folder = self.folder_for(request)
        chart = request.query_params.get("chart")
        if folder is None or chart not in ("metrics", "epsilon"):
            return Response("no such chart", status_code=404, headers=SECURITY_HEADERS)
        view = runs.read_run(folder)
        if chart == "metrics":
            svg = plots.metrics_svg(view.rounds, view.definition)
        else:
            unit = plots.privacy_unit(view.definition, view.config.get("dp_unit"))
            svg = plots.epsilon_svg(view.rounds, unit, view.run_epsilon)
        return Response(svg, media_type="image/svg+xml", headers=SECURITY_HEADERS)


def _check_token(request: Request, token: str | None) -> Response | None:
    """None when the request may proceed; else the answer (a redirect that sets the cookie, or
    401). Tokens are compared in constant time."""
    if not token:
        return None
    given = request.query_params.get("token")
    if given is not None and hmac.compare_digest(given.encode(), token.encode()):
        rest = {key: value for key, value in request.query_params.items() if key != "token"}
        target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
        response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
        secure = request.url.scheme == "https"
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=secure)
        return response
    cookie = request.cookies.get(COOKIE, "")
    header = request.headers.get("authorization", "")
    bearer = header[7:] if header.lower().startswith("bearer ") else ""
    for candidate in (cookie, bearer):
        if candidate and hmac.compare_digest(candidate.encode(), token.encode()):
            return None
    return HTMLResponse(
        "<!doctype html><title>fedward dashboard</title><p>This dashboard needs its token: "
        "open the address that <code>fedward dashboard</code> printed (it ends in "
        "<code>?token=...</code>).</p>",
        status_code=401,
        headers=SECURITY_HEADERS,
    )


def _fmt(value, digits: int = 3) -> str:
    """A number for a table cell ('—' for none)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    return f"{value:.{digits}f}"
