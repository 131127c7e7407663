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

    from fedward.server.cli import deployment_table, round_line

    def row(number: int, scores: dict) -> dict:
        return {"round": number, "status": "ok", "global": scores, "hospitals": {}}

    older = row(1, {"accuracy": 0.7, "macro_f1": 0.61})
    newer = row(2, {"accuracy": 0.8, "macro_f1": 0.74, "hospital_mean_macro_f1": 0.69})
    assert "macro_f1 0.610*" in round_line(older, "classification")
    assert "macro_f1 0.740;" in round_line(newer, "classification")
    console = Console(width=200, record=True)
    console.print(deployment_table([older, newer], "classification"))
    text = console.export_text()
    assert "0.610*" in text and "0.740*" not in text
    assert "* macro_f1 recorded before fedward pooled the hospitals' counts" in text


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("seeded_dp_noise = true", "'seeded_dp_noise': simulation only"),
        ("evaluate_only = true", "'evaluate_only': simulation only"),
    ],
)
def test_run_refuses_what_is_for_simulation_only(tmp_path, line, expected):
    config = tmp_path / "run.toml"
    config.write_text(f'labels = ["cardio", "respiratory"]\nout = "{tmp_path / "out"}"\n{line}\n')
    _one_line_error(_fedward("run", "--config", str(config)), expected)
    assert not (tmp_path / "out").exists()
