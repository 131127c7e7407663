"""`fedward dashboard` over run folders written by the coordinator's own writers.

Each test builds a run folder with server/app.py's `write_history`, `history_row`,
`run_start_fields` and `round_audit_fields` and the real `AuditLog`, then reads the pages through
Starlette's test client (no sockets). What a coordinator meets in practice is covered: a folder
that is not a run, a half-written history, a run in progress, a missing or tampered audit log,
a refusal with its reason code, a hospital name with markup in it, and the token.
"""

from __future__ import annotations

import html
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from starlette.testclient import TestClient

from fedward.common.config import RunConfig
from fedward.common.errors import ConfigError
from fedward.common.files.audit_log import AuditLog
from fedward.common.protocol.reasons import Reason
from fedward.server.app import history_row, round_audit_fields, run_start_fields, write_history
from fedward.server.dashboard.cli import dashboard, is_loopback
from fedward.server.dashboard.runs import RunFolder, find_runs, read_run
from fedward.server.dashboard.web import DashboardSettings, create_app
from fedward.server.strategy import EvaluateOutcome, TrainOutcome

RUN_ID = "5f1c0ffee0dd4a11b7e2d3c4b5a69788"
ARRAYS = {"lora_A": np.zeros((2, 2), np.float32)}
BUDGET_REFUSAL = Reason("budget.exceeded").render()


def _outcome(round_number: int, refused: dict[str, str], status: str = "ok") -> TrainOutcome:
    trained = {
        name: {
            "num_examples": 30.0,
            "train_loss": 2.0 - 0.1 * round_number,
            "epsilon": 2.5 * round_number,
        }
        for name in ("hospital-0", "hospital-1", "hospital-2")
        if name not in refused
    }
    return TrainOutcome(
        arrays=ARRAYS, status=status, hospitals=trained, refused=refused, train_loss=1.9
    )


def _evaluation(round_number: int) -> EvaluateOutcome:
    metrics = {
        "loss": 2.3 - 0.1 * round_number,
        "accuracy": 0.2 * round_number,
        "macro_f1": 0.1 * round_number,
    }
    return EvaluateOutcome(metrics=metrics, hospitals={})


def write_run(
    out: Path,
    rounds: int = 3,
    planned: int = 3,
    refusals: dict[int, dict[str, str]] | None = None,
    finished: bool = True,
    audit: bool = True,
    status: str = "ok",
) -> RunConfig:
    """A run folder as the ServerApp leaves it after `rounds` rounds (of `planned`)."""
    config = RunConfig(rounds=planned, out=str(out), labels=["asthma", "sepsis"])
    refusals = refusals or {}
    log = AuditLog(out / "audit.jsonl")
    if audit:
        log.append("run.start", **run_start_fields(config, RUN_ID, "17", ARRAYS))
    rows = []
    for number in range(1, rounds + 1):
        outcome = _outcome(number, refusals.get(number, {}), status)
        row = history_row(
            number,
            outcome,
            _evaluation(number),
            config.spec.privacy,
            config.spec.secagg.secure_aggregation,
            12.5,
        )
        rows.append(row)
        write_history(out, config.flat(), RUN_ID, rows, "17")
        if audit:
            log.append("round", **round_audit_fields(row, RUN_ID, "c" * 64, "a" * 64))
    if audit and finished:
        log.append("run.end", run_id=RUN_ID, flower_run_id="17", rounds=rounds, failed_rounds=[])
    return config


def _client(*folders: Path, **settings) -> TestClient:
    return TestClient(create_app(DashboardSettings(folders=list(folders), **settings)))


def _run_page(client: TestClient, key: str = "0") -> str:
    """The run page's HTML with entities unescaped (the reason texts hold apostrophes)."""
    response = client.get("/run", params={"key": key})
    assert response.status_code == 200
    return html.unescape(response.text)


def test_a_finished_run_shows_rounds_epsilon_refusals_and_a_verified_chain(tmp_path):
    write_run(tmp_path / "run", refusals={2: {"hospital-1": BUDGET_REFUSAL}})
    client = _client(tmp_path)
    index = client.get("/")
    assert index.status_code == 200
    assert "finished" in index.text and "verifies" in index.text
    assert 'http-equiv="refresh"' in index.text  # the index follows new runs

    page = _run_page(client, "0/run")
    assert 'id="rounds"' in page and page.count('<tr data-round="') == 3
    assert "the hospital's privacy budget would be exceeded; nothing was released" in page
    assert "[budget.exceeded]" in page
    assert ">7.50<" in page  # hospital-0's epsilon after round 3
    assert "audit log intact: 5 records" in page
    assert 'http-equiv="refresh"' not in page  # a finished run does not reload
    for chart in ("metrics", "epsilon"):
        svg = client.get("/plot", params={"key": "0/run", "chart": chart})
        assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
        assert svg.text.lstrip().startswith("<?xml") and "<svg" in svg.text


def test_a_folder_that_is_not_a_run_is_said_so(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run", encoding="utf-8")
    page = _client(tmp_path).get("/")
    assert page.status_code == 200
    assert "not a fedward run folder" in page.text
    missing = _client(tmp_path / "nowhere").get("/")
    assert missing.status_code == 200 and "no such folder" in missing.text
    assert find_runs([tmp_path])[0] == []
    view = read_run(RunFolder("0", tmp_path))  # a run folder that was emptied since the scan
    assert view.state == "not a run" and "is not a fedward run folder" in view.problems[0]


def test_a_half_written_history_falls_back_to_the_audit_log(tmp_path):
    write_run(tmp_path, refusals={1: {"hospital-2": BUDGET_REFUSAL}}, finished=False)
    text = (tmp_path / "history.json").read_text(encoding="utf-8")
    (tmp_path / "history.json").write_text(text[: len(text) // 2], encoding="utf-8")

    page = _run_page(_client(tmp_path))
    assert "history.json is half-written or damaged" in page
    assert "the rounds shown come from audit.jsonl" in page
    assert page.count('<tr data-round="') == 3  # rows rebuilt from the audit records
    assert "[budget.exceeded]" in page
    assert ">7.50<" in page


def test_a_run_in_progress_says_so_and_reloads(tmp_path):
    write_run(tmp_path, rounds=1, planned=3, finished=False)
    client = _client(tmp_path, refresh=7)
    page = _run_page(client)
    assert 'id="run-state">in progress<' in page
    assert "1 of 3 recorded" in page
    assert '<meta http-equiv="refresh" content="7">' in page


def test_a_run_that_has_not_finished_a_round_yet(tmp_path):
    AuditLog(tmp_path / "audit.jsonl").append(
        "run.start", **run_start_fields(RunConfig(labels=["a", "b"]), RUN_ID, "1", ARRAYS)
    )
    page = _run_page(_client(tmp_path))
    assert "no history.json yet" in page
    assert "No round recorded yet: the run is in progress" in page


def test_a_missing_audit_log_is_shown_and_the_rounds_still_are(tmp_path):
    write_run(tmp_path, audit=False)
    (tmp_path / "audit.jsonl").unlink(missing_ok=True)
    page = _run_page(_client(tmp_path))
    assert "no audit log (audit.jsonl is missing): the chain cannot be verified" in page
    assert page.count('<tr data-round="') == 3
    assert 'id="run-state">finished<' in page  # every planned round is in the history


def test_a_tampered_audit_log_does_not_verify(tmp_path):
    write_run(tmp_path)
    lines = (tmp_path / "audit.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    record = json.loads(lines[1])
    record["fields"]["participants"] = ["hospital-9"]
    lines[1] = json.dumps(record) + "\n"
    (tmp_path / "audit.jsonl").write_text("".join(lines), encoding="utf-8")
    page = _run_page(_client(tmp_path))
    assert "does not verify" in page and "audit log broken at line 2" in page


def test_a_hospital_name_with_markup_is_escaped(tmp_path):
    write_run(tmp_path, refusals={1: {"<script>alert(1)</script>": BUDGET_REFUSAL}})
    page = _client(tmp_path).get("/run", params={"key": "0"}).text
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "script-src" not in page  # no scripts are allowed at all (CSP default-src 'none')


def test_an_unknown_run_key_is_a_404_page_not_a_file(tmp_path):
    write_run(tmp_path / "run")
    client = _client(tmp_path)
    for key in ("../../etc", "0/../..", "9"):
        assert client.get("/run", params={"key": key}).status_code == 404
        assert client.get("/plot", params={"key": key, "chart": "metrics"}).status_code == 404
    assert client.post("/").status_code == 405  # read-only


def test_the_token_is_required_when_set(tmp_path):
    write_run(tmp_path)
    client = _client(tmp_path, token="s3cret-token")
    assert client.get("/").status_code == 401
    assert client.get("/run", params={"key": "0"}).status_code == 401
    assert client.get("/", params={"token": "wrong"}).status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    entered = client.get(
        "/run", params={"key": "0", "token": "s3cret-token"}, follow_redirects=False
    )
    assert entered.status_code == 303 and "token" not in entered.headers["location"]
    assert client.get(entered.headers["location"]).status_code == 200  # the cookie carries it


def test_beyond_localhost_the_command_wants_tls_or_insecure(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    with pytest.raises(ConfigError, match="HTTPS only"):
        dashboard(
            [tmp_path],
            host="0.0.0.0",
            port=0,
            refresh=5,
            token=None,
            certs=None,
            insecure=False,
            superlink_db=None,
        )
    with pytest.raises(ConfigError, match="server.pem is missing"):
        dashboard(
            [tmp_path],
            host="0.0.0.0",
            port=0,
            refresh=5,
            token=None,
            certs=tmp_path,
            insecure=False,
            superlink_db=None,
        )


def test_registered_supernodes_are_read_from_the_superlink_database(tmp_path):
    database = tmp_path / "fedward-superlink.db"
    with sqlite3.connect(database) as connection:
        connection.execute(
            "CREATE TABLE node (node_id INTEGER, name TEXT, status TEXT, registered_at TEXT, "
            "last_activated_at TEXT, online_until REAL)"
        )
        connection.execute(
            "INSERT INTO node VALUES (11, 'st-marys', 'online', '2026-01-01', '2026-01-02', ?)",
            (time.time() + 60,),
        )
        connection.execute(
            "INSERT INTO node VALUES (12, 'general', 'registered', '2026-01-01', NULL, NULL)"
        )
    write_run(tmp_path / "run")
    page = _client(tmp_path, superlink_db=database).get("/").text
    assert 'id="nodes"' in page and "st-marys" in page and "general" in page
    assert page.count('<span class="ok">yes</span>') == 1

    other = tmp_path / "other.db"
    sqlite3.connect(other).close()
    page = _client(tmp_path, superlink_db=other).get("/").text
    assert "node table cannot be read (no such table: node)" in page


def test_the_runs_epsilon_is_on_the_page_in_the_shares_and_on_the_chart(tmp_path):
    # history.json, as the ServerApp writes it, holds the run's epsilon as `target_epsilon`
    config = write_run(tmp_path / "run", audit=False)
    assert config.spec.privacy.target_epsilon == 8.0
    client = _client(tmp_path / "run")
    page = " ".join(_run_page(client).split())
    assert 'DP, run\'s ε <span id="run-epsilon">8.0</span>' in page
    assert "7.50 of 8.0 (94%)" in page  # each hospital's epsilon against the run's
    svg = client.get("/plot", params={"key": "0", "chart": "epsilon"}).text
    assert 'id="run-epsilon"' in svg  # the budget line


def test_a_run_whose_rounds_all_failed_is_not_shown_as_finished(tmp_path):
    write_run(tmp_path / "run", status="failed: 0 usable update(s), fewer than min_hospitals (2)")
    client = _client(tmp_path)
    page = _run_page(client, "0/run")
    assert '<span class="state state-failed" id="run-state">failed</span>' in page
    assert 'class="state state-finished"' not in client.get("/").text
    assert 'http-equiv="refresh"' not in page  # it is over: no reloading


def test_a_hospital_name_in_matplotlib_math_syntax_is_drawn_as_plain_text(tmp_path):
    write_run(tmp_path, refusals={1: {r"$\notacommand{x}$": BUDGET_REFUSAL}})
    client = _client(tmp_path)
    for chart in ("metrics", "epsilon"):
        response = client.get("/plot", params={"key": "0", "chart": chart})
        assert response.status_code == 200, chart


def _rounds_of(tmp_path: Path) -> list[dict]:
    write_run(tmp_path, refusals={2: {"hospital-1": BUDGET_REFUSAL}})
    return read_run(RunFolder("0", tmp_path)).rounds


def test_the_charts_labels_fit_the_figure_and_the_metrics_axis_is_named(tmp_path):
    from fedward.common.tasks import CLASSIFICATION
    from fedward.server.dashboard import plots

    rounds = _rounds_of(tmp_path)
    metrics = plots.metrics_figure(rounds, CLASSIFICATION)
    assert metrics.axes[0].get_ylabel()
    figure = plots.epsilon_figure(rounds, plots.privacy_unit(CLASSIFICATION, "patient"), 8.0)
    label = figure.axes[0].yaxis.label
    assert "all of a patient's records" in label.get_text().replace("\n", " ")
    extent = label.get_window_extent(FigureCanvasAgg(figure).get_renderer())
    assert extent.y0 >= 0 and extent.y1 <= figure.bbox.height, "the ε label is cut off"


def test_hospitals_with_the_same_epsilon_share_one_named_line():
    from fedward.server.dashboard.plots import epsilon_lines

    same, other, nan = [1.0, 2.0], [1.5, 3.0], float("nan")
    lines = epsilon_lines({"hospital-0": same, "hospital-1": same, "hospital-2": other})
    assert [label for label, _ in lines] == ["hospital-0, hospital-1", "hospital-2"]
    lines = epsilon_lines({f"hospital-{i}": [nan, 2.0] for i in range(5)})
    assert [label for label, _ in lines] == ["all hospitals (5)"]


def test_a_dashboard_on_all_interfaces_prints_the_address_it_is_bound_to(monkeypatch):
    from fedward.server.dashboard import cli

    monkeypatch.setattr(cli.socket, "getfqdn", lambda: "localhost")  # a container's usual name
    shown = cli.shown_address("https", "0.0.0.0", 8443, "t0k")
    assert shown.startswith("https://0.0.0.0:8443/?token=t0k") and "localhost" not in shown
    monkeypatch.setattr(cli.socket, "getfqdn", lambda: "coordinator.example.org")
    shown = cli.shown_address("https", "::", 8443, None)
    assert shown.startswith("https://coordinator.example.org:8443/") and "[::]:8443" in shown
    assert cli.shown_address("http", "127.0.0.1", 8080, None) == "http://127.0.0.1:8080/"


def test_each_hospitals_alone_global_and_own_figures_are_on_the_run_page(tmp_path):
    write_run(tmp_path / "run", audit=False)
    path = tmp_path / "run" / "history.json"
    history = json.loads(path.read_text(encoding="utf-8"))
    last = history["rounds"][-1]["hospitals"]
    last["hospital-0"].update(personal_alone=0.712, personal_global=0.655, personal_own=0.781)
    path.write_text(json.dumps(history), encoding="utf-8")
    page = " ".join(_run_page(_client(tmp_path / "run")).split())
    assert 'id="worth-joining"' in page
    row = page.split('<tr data-hospital="hospital-0"> <td>hospital-0</td> <td class="num">')[-1]
    assert row.startswith('0.712</td> <td class="num">0.655</td> <td class="num">0.781</td>')
    assert "+6.9 pts" in row
    assert '<tr data-hospital="hospital-1"> <td>hospital-1</td> <td class="num">' not in page
