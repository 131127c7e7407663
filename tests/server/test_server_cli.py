"""The coordinator's commands as a user runs them: an output path that cannot be written is one
line naming the path and the flag, exit code 2, before anything else happens (no SuperLink is
needed to see it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FEDWARD = shutil.which("fedward") or str(Path(sys.executable).parent / "fedward")


def _fedward(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [FEDWARD, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def _one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedward: error: "), result.stderr
    for words in expected:
        assert words in lines[0], lines[0]
    return lines[0]


def _file(path: Path) -> Path:
    path.write_text("an existing regular file\n")
    return path


def test_certs_init_into_an_existing_file(tmp_path):
    out = _file(tmp_path / "certs")
    result = _fedward("certs", "init", "--out", str(out), "--server-name", "localhost")
    _one_line_error(result, f"--out {out}: is a file, not a folder")


def test_keys_node_under_an_existing_file(tmp_path):
    out = _file(tmp_path / "keys") / "hospital-a"
    result = _fedward("keys", "node", "--out", str(out), "--name", "hospital-a")
    _one_line_error(result, f"--out {out}: {tmp_path / 'keys'} is a file, not a folder")


def test_server_start_with_its_database_under_a_file_or_its_log_a_folder(tmp_path):
    database = _file(tmp_path / "state") / "superlink.db"
    result = _fedward(
        "server", "start", "--insecure", "--no-node-auth", "--database", str(database)
    )
    _one_line_error(result, f"--database {database}: {tmp_path / 'state'} is a file")
    result = _fedward(
        "server", "start", "--insecure", "--no-node-auth",
        "--database", str(tmp_path / "ok.db"), "--log-file", str(tmp_path),
    )  # fmt: skip
    _one_line_error(result, f"--log-file {tmp_path}: is a folder, not a file")
    assert not (tmp_path / "ok.db").exists()


def test_run_with_out_an_existing_file_by_flag_or_in_the_config(tmp_path):
    out = _file(tmp_path / "run-out")
    config = tmp_path / "run.toml"
    config.write_text(f'labels = ["cardio", "respiratory"]\nout = "{out}"\n')
    _one_line_error(_fedward("run", "--config", str(config)), f"{config}: 'out' {out}: is a file")
    result = _fedward("run", "--config", str(config), "--out", str(out))
    _one_line_error(result, f"--out {out}: is a file, not a folder")


def test_a_resumed_runs_older_rows_mark_their_macro_f1_as_the_hospital_mean():
    """A run checkpointed before the global macro-F1 was pooled keeps its rows on --resume;
    their figure was the mean of the hospitals' own, and the table says so."""
    from rich.console import Console

    from fedward.common.tasks import CLASSIFICATION
    from fedward.server.cli import deployment_table, round_line

    def row(number: int, scores: dict) -> dict:
        return {"round": number, "status": "ok", "global": scores, "hospitals": {}}

    older = row(1, {"accuracy": 0.7, "macro_f1": 0.61})
    newer = row(2, {"accuracy": 0.8, "macro_f1": 0.74, "hospital_mean_macro_f1": 0.69})
    assert "macro_f1 0.610*" in round_line(older, CLASSIFICATION)
    assert "macro_f1 0.740;" in round_line(newer, CLASSIFICATION)
    console = Console(width=200, record=True)
    console.print(deployment_table([older, newer], CLASSIFICATION))
    text = console.export_text()
    assert "0.610*" in text and "0.740*" not in text
    assert "* macro_f1 recorded before fedward pooled the hospitals' counts" in text


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("seeded_dp_noise = true", "'seeded_dp_noise': simulation only"),
    ],
)
def test_run_refuses_what_is_for_simulation_only(tmp_path, line, expected):
    config = tmp_path / "run.toml"
    config.write_text(f'labels = ["cardio", "respiratory"]\nout = "{tmp_path / "out"}"\n{line}\n')
    _one_line_error(_fedward("run", "--config", str(config)), expected)
    assert not (tmp_path / "out").exists()


def _evaluate_only_run(tmp_path, monkeypatch, answers: dict) -> tuple[int, str, str]:
    """`fedward run` of an evaluate-only config against a SuperLink played here: the run's one
    row (round 0) is what the hospitals answered (`answers`: name -> metrics, or None for a
    refusal). Returns (exit code, stdout, stderr)."""
    from fedward.common.config import RunConfig
    from fedward.server import cli as server_cli
    from fedward.server import deploy
    from fedward.server.app import write_history

    out = tmp_path / "out"
    config_file = tmp_path / "run.toml"
    config_file.write_text(
        f'labels = ["cardio", "respiratory"]\nout = "{out}"\nevaluate_only = true\n'
    )
    hospitals = {
        name: metrics if metrics is not None else {"evaluation_refused": "evaluation refused"}
        for name, metrics in answers.items()
    }
    row = {
        "round": 0, "status": "evaluated", "global": {}, "hospitals": hospitals, "refused": {},
        "rejected": {}, "dropped": [], "seconds": 1.0,
        "evaluation_refused": {n: "evaluation refused" for n, m in answers.items() if m is None},
    }  # fmt: skip
    submitted = []

    def submit_run(connection, run_config):
        submitted.append(run_config)
        return 5

    def follow_run(connection, folder, flower_run_id, on_row, timeout=None):
        write_history(folder, RunConfig.from_toml(config_file).flat(), "run-a", [row], "5", 0)
        on_row(row)
        return {"status": "finished:completed"}

    monkeypatch.setattr(deploy, "submit_run", submit_run)
    monkeypatch.setattr(deploy, "follow_run", follow_run)
    code = 0
    try:
        server_cli.run(config_file=config_file, insecure=True)
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert [run_config["evaluate-only"] for run_config in submitted] == [True]
    return code, *_captured(server_cli)


def _captured(server_cli) -> tuple[str, str]:
    return server_cli.console.file.getvalue(), server_cli.error_console.file.getvalue()


@pytest.fixture
def recorded_consoles(monkeypatch):
    """The coordinator's consoles, recorded (wide: one line a message)."""
    import io

    from rich.console import Console

    from fedward.server import cli as server_cli

    monkeypatch.setattr(server_cli, "console", Console(file=io.StringIO(), width=400))
    monkeypatch.setattr(server_cli, "error_console", Console(file=io.StringIO(), width=400))


@pytest.mark.usefixtures("recorded_consoles")
def test_run_submits_an_evaluate_only_run_and_reports_it_without_an_adapter(tmp_path, monkeypatch):
    """Issue 41, item 9: `fedward run` no longer refuses `evaluate_only`; a run that one hospital
    answered ends with exit 0 and says nothing trained; one that every hospital refused, 1."""
    code, out, err = _evaluate_only_run(
        tmp_path, monkeypatch, {"st-mary": {"accuracy": 0.7, "num_examples": 41.3}, "st-ann": None}
    )
    assert code == 0, out + err
    assert "evaluation only" in out
    assert "round 0: evaluated" in out and "no evaluation from: st-ann" in out
    assert "nothing trained, so no adapter was written" in out
    assert "use it" not in out and not (tmp_path / "out" / "adapter").exists()


@pytest.mark.usefixtures("recorded_consoles")
def test_an_evaluate_only_run_that_every_hospital_refused_fails(tmp_path, monkeypatch):
    code, _, err = _evaluate_only_run(tmp_path, monkeypatch, {"st-mary": None, "st-ann": None})
    assert code == 1
    assert "no hospital released an evaluation" in err
    assert "evaluate_starting_adapter" in err


def test_an_evaluate_only_run_cannot_be_resumed(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'labels = ["cardio", "respiratory"]\nout = "{tmp_path / "out"}"\nevaluate_only = true\n'
    )
    result = _fedward("run", "--config", str(config), "--resume")
    _one_line_error(result, "'evaluate_only': an evaluate-only run has no rounds to resume")
