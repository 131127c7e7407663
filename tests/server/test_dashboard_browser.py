"""`fedward dashboard` in a real browser: headless Chromium driven by Selenium.

A short simulation (the tiny model, 2 hospitals, 2 rounds) writes a run folder; beside it, a run
whose history and audit log hold a refusal, written by the coordinator's own writers (a simulated
hospital never refuses). The dashboard serves both over a real socket; the browser opens the
pages, reads the round table, the epsilon column, a chart and the refusal, and watches a run in
progress reload itself when a round lands. A screenshot goes to the test's folder, or to
`$FEDWARD_DASHBOARD_SCREENSHOT` (how docs/img/dashboard.png is made).

Needs Chromium and its driver (Debian: `apt-get install chromium chromium-driver`) and Selenium
(in the dev extra); skipped with the reason when either is missing. No browser is downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from fedward.common.config import RunConfig
from fedward.common.files.audit_log import AuditLog
from fedward.server.app import history_row, round_audit_fields, write_history
from fedward.server.dashboard.web import DashboardSettings, create_app

CHROMIUM = os.environ.get("FEDWARD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (
    os.environ.get("FEDWARD_CHROMEDRIVER")
    or shutil.which("chromedriver")
    or "/usr/bin/chromedriver"
)


def _browser_missing() -> str:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            return (
                f"no browser: {path} is not installed (Debian/Ubuntu: "
                "`sudo apt-get install chromium chromium-driver`)"
            )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return 'selenium is not installed (pip install -e ".[dev]")'
    return ""


pytestmark = pytest.mark.skipif(bool(_browser_missing()), reason=_browser_missing() or "-")


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory) -> Path:
    """runs/sim: a real simulation; runs/refused: a run in which a hospital refused."""
    from test_dashboard import BUDGET_REFUSAL, write_run

    from fedward.simulation.runner import simulate

    root = tmp_path_factory.mktemp("runs")
    config = RunConfig(
        model=tiny_model_dir,
        hospitals=2,
        min_hospitals=2,
        rounds=2,
        notes_per_hospital=40,
        max_length=64,
        device="cpu",
        secure_aggregation=False,
        out=str(root / "sim"),
    )
    simulate(config)
    write_run(root / "refused", refusals={2: {"hospital-1": BUDGET_REFUSAL}})
    return root


class _Server:
    """The dashboard on a real socket (uvicorn in a thread), on a free port of 127.0.0.1."""

    def __init__(self, settings: DashboardSettings) -> None:
        import uvicorn

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(
            create_app(settings), log_level="warning", lifespan="off", ws="none"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started, "the dashboard did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="fedward-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1400,1700",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def dashboard(folders):
    with _Server(DashboardSettings(folders=[folders], refresh=0)) as server:
        yield server


def _cells(browser, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, selector)]


def test_the_simulation_shows_its_rounds_epsilon_and_charts(browser, dashboard, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(dashboard.url + "/")
    runs = browser.find_element(By.ID, "runs")
    assert "sim" in runs.text and "refused" in runs.text and "finished" in runs.text
    browser.find_element(By.LINK_TEXT, "sim").click()

    assert browser.find_element(By.ID, "run-state").text == "finished"
    assert "verifies" in browser.find_element(By.ID, "audit").text
    rows = browser.find_elements(By.CSS_SELECTOR, "#rounds tbody tr")
    assert [row.get_attribute("data-round") for row in rows] == ["1", "2"]
    assert _cells(browser, "#rounds tbody td.status") == ["ok", "ok"]
    headers = _cells(browser, "#rounds th.epsilon-head")
    assert headers == ["ε hospital-0", "ε hospital-1"]
    for name in ("hospital-0", "hospital-1"):
        column = _cells(browser, f'#rounds td.epsilon[data-hospital="{name}"]')
        epsilons = [float(value) for value in column]  # numbers, not '·' or 'refused'
        assert 0 < epsilons[0] < epsilons[1] <= 8.0 * 1.001
    # the synthetic notes have patients: the simulation's default unit is the patient
    assert (
        "unit one patient (all of a patient's records)"
        in browser.find_element(By.TAG_NAME, "main").text
    )

    for chart in ("plot-metrics", "plot-epsilon"):
        image = browser.find_element(By.ID, chart)
        loaded = browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", image
        )
        assert loaded and loaded > 100, f"{chart} did not load in the browser"
        assert image.size["width"] > 100

    screenshot = Path(os.environ.get("FEDWARD_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000


def test_a_refusal_is_shown_with_its_reason(browser, dashboard):
    from selenium.webdriver.common.by import By

    browser.get(dashboard.url + "/")
    browser.find_element(By.LINK_TEXT, "refused").click()
    (refusal,) = browser.find_elements(By.CSS_SELECTOR, '#rounds tr[data-round="2"] li.refusal')
    assert refusal.get_attribute("data-hospital") == "hospital-1"
    assert "the hospital's privacy budget would be exceeded; nothing was released" in refusal.text
    assert refusal.find_element(By.CLASS_NAME, "reason-code").text == "[budget.exceeded]"
    cell = browser.find_element(
        By.CSS_SELECTOR, '#rounds tr[data-round="2"] td.epsilon[data-hospital="hospital-1"]'
    )
    assert cell.text == "refused"
    hospital = browser.find_element(
        By.CSS_SELECTOR, '#run-hospitals tr[data-hospital="hospital-1"]'
    )
    cells = [cell.text for cell in hospital.find_elements(By.TAG_NAME, "td")]
    assert cells[3] == "2"  # the rounds it refused
    assert cells[-1].endswith("[budget.exceeded]")  # its last refusal, with the reason


def test_a_run_in_progress_reloads_as_rounds_land(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from test_dashboard import ARRAYS, RUN_ID, _evaluation, _outcome

    from fedward.server.app import run_start_fields

    config = RunConfig(rounds=3, out=str(tmp_path), labels=["asthma", "sepsis"])
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("run.start", **run_start_fields(config, RUN_ID, "17", ARRAYS))
    rows: list[dict] = []

    def land(number: int) -> None:
        rows.append(
            history_row(
                number,
                _outcome(number, {}),
                _evaluation(number),
                config.spec.privacy,
                config.spec.secagg.secure_aggregation,
                3.0,
            )
        )
        write_history(tmp_path, config.flat(), RUN_ID, rows, "17")
        log.append("round", **round_audit_fields(rows[-1], RUN_ID, "c" * 64, "a" * 64))

    land(1)
    with _Server(DashboardSettings(folders=[tmp_path], refresh=1)) as server:
        browser.get(server.url + "/run?key=0")
        assert browser.find_element(By.ID, "run-state").text == "in progress"
        assert re.match(r"1 of 3", browser.find_element(By.ID, "round-count").text)
        land(2)  # the browser is not told: the page reloads itself
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if browser.find_element(By.ID, "round-count").text.startswith("2 of 3"):
                    break
            except Exception:  # the page is being replaced under us
                pass
            time.sleep(0.2)
        assert browser.find_element(By.ID, "round-count").text.startswith("2 of 3")
