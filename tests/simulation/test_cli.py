"""The `fedward` console script as a user runs it: real processes, real exit codes and output.

Every user error must end with exit code 2 and exactly one line on stderr that names the file
(and line) or the field, with no traceback, before anything is written to the output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FEDWARD = shutil.which("fedward") or str(Path(sys.executable).parent / "fedward")


def _fedward(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [FEDWARD, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def _assert_one_line_error(result: subprocess.CompletedProcess, out: Path, *expected: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("fedward: error: ")
    for words in expected:
        assert words in line, line
    assert not out.exists(), "the output folder was created for a run that never started"
    return line


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_console_script_is_installed():
    assert Path(FEDWARD).is_file(), "install the project (pip install -e .) to get `fedward`"
    result = _fedward("--help")
    assert result.returncode == 0 and "simulate" in result.stdout


def test_missing_data_file(tmp_path):
    data = tmp_path / "absent.csv"
    result = _fedward("simulate", "--data", str(data), "--out", str(tmp_path / "out"))
    _assert_one_line_error(result, tmp_path / "out", str(data), "file not found")


def test_data_path_is_a_folder(tmp_path):
    data = tmp_path / "notes"
    data.mkdir()
    result = _fedward("simulate", "--data", str(data), "--out", str(tmp_path / "out"))
    _assert_one_line_error(result, tmp_path / "out", str(data), "folder")


def test_missing_column_lists_the_columns_present(tmp_path):
    data = _csv(tmp_path / "notes.csv", "note,diagnosis\ncough,pneumonia\nfever,pneumonia\n")
    result = _fedward("simulate", "--data", str(data), "--out", str(tmp_path / "out"))
    _assert_one_line_error(result, tmp_path / "out", f"{data}:2", "'text'", "diagnosis, note")


def test_missing_column_given_by_flag(tmp_path):
    data = _csv(tmp_path / "notes.csv", "text,label\ncough,pneumonia\nfever,pneumonia\n")
    result = _fedward(
        "simulate", "--data", str(data), "--label-column", "dx", "--out", str(tmp_path / "out")
    )
    _assert_one_line_error(result, tmp_path / "out", f"{data}:2", "'dx'")


def test_empty_data_file(tmp_path):
    data = _csv(tmp_path / "notes.csv", "")
    result = _fedward("simulate", "--data", str(data), "--out", str(tmp_path / "out"))
    _assert_one_line_error(result, tmp_path / "out", str(data), "empty")


def test_label_with_too_few_examples(tmp_path):
    rows = "".join(f"note {i},flu\n" for i in range(10)) + "spots,measles\n"
    data = _csv(tmp_path / "notes.csv", "text,label\n" + rows)
    result = _fedward("simulate", "--data", str(data), "--out", str(tmp_path / "out"))
    _assert_one_line_error(result, tmp_path / "out", str(data), "'measles' (1)")


def test_text_that_is_not_utf8(tmp_path):
    data = tmp_path / "notes.csv"
    data.write_bytes(b"text,label\ncough,flu\nfi\xe8vre,flu\n")
    result = _fedward("simulate", "--data", str(data), "--out", str(tmp_path / "out"))
    _assert_one_line_error(result, tmp_path / "out", f"{data}:3", "UTF-8")


def test_malformed_jsonl_line(tmp_path):
    data = tmp_path / "notes.jsonl"
    data.write_text('{"text": "cough", "label": "flu"}\n{"text": "fever"\n', encoding="utf-8")
    result = _fedward("simulate", "--data", str(data), "--out", str(tmp_path / "out"))
    _assert_one_line_error(result, tmp_path / "out", f"{data}:2", "JSON")


def test_unknown_model_path(tmp_path):
    model = tmp_path / "no-such-model"
    result = _fedward("simulate", "--model", str(model), "--out", str(tmp_path / "out"))
    _assert_one_line_error(result, tmp_path / "out", "field 'model'", str(model))


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--rounds", "0"], "'rounds'"),
        (["--target-epsilon", "-1"], "'target_epsilon'"),
        (["--partition", "bogus"], "'partition'"),
        (
            ["--hospitals", "1"],
            "min_hospitals (2) is more than hospitals (1); pass --min-hospitals 1",
        ),
    ],
)
def test_invalid_config_value_on_the_command_line(tmp_path, flags, field):
    result = _fedward("simulate", *flags, "--out", str(tmp_path / "out"))
    _assert_one_line_error(result, tmp_path / "out", field)


def test_invalid_config_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("rounds = 2\nlora_target_modules = []\nroundz = 3\n", encoding="utf-8")
    result = _fedward("simulate", "--config", str(config), "--out", str(tmp_path / "out"))
    line = _assert_one_line_error(
        result, tmp_path / "out", str(config), "'lora_target_modules'", "'roundz'"
    )
    assert "unknown field 'roundz' (did you mean 'rounds'?)" in line
    assert "known fields" not in line and "secagg_bits" not in line  # not every field there is

    config.write_text("rounds = = 2\n", encoding="utf-8")
    result = _fedward("simulate", "--config", str(config), "--out", str(tmp_path / "out"))
    _assert_one_line_error(result, tmp_path / "out", str(config), "not valid TOML")


def test_missing_config_file(tmp_path):
    config = tmp_path / "absent.toml"
    result = _fedward("simulate", "--config", str(config), "--out", str(tmp_path / "out"))
    _assert_one_line_error(result, tmp_path / "out", str(config), "not found")


def test_predict_with_a_folder_that_is_not_an_adapter(tmp_path):
    result = _fedward("predict", "--adapter", str(tmp_path), "a note")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(tmp_path) in result.stderr and "not a fedward adapter folder" in result.stderr


def test_simulate_writes_adapter_history_and_plot_and_says_where(tiny_model_dir, tmp_path):
    config = tmp_path / "fast.toml"
    config.write_text(
        'notes_per_hospital = 40\nmax_length = 64\ndevice = "cpu"\n', encoding="utf-8"
    )
    out = tmp_path / "out"
    result = _fedward(
        "simulate",
        "--config", str(config),
        "--model", tiny_model_dir,
        "--hospitals", "2",
        "--rounds", "2",
        "--out", str(out),
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "fedward.json").is_file()
    assert (out / "metrics.png").read_bytes().startswith(b"\x89PNG")
    assert not (out / ".progress.jsonl").exists()  # the progress bar's file is cleaned up
    history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    assert [row["round"] for row in history["rounds"]] == [1, 2]
    assert all(row["secure_aggregation"] for row in history["rounds"])  # on by default

    report = result.stdout
    assert "round 1: ok" in report and "round 2: ok" in report
    # <out>/adapter is the best round's (keep_adapter = best), and the report says which
    scores = {row["round"]: row["global"]["macro_f1"] for row in history["rounds"]}
    best = max(scores, key=lambda number: (scores[number], number))  # a tie: the later round
    assert f"round {best} of 2, the best macro_f1 {scores[best]:.3f}" in report
    assert str(out.resolve()) in report.replace("\n", "")
    # Paths must survive a log file or a pipe: a user copies the printed command as it is.
    commands = [line for line in report.splitlines() if "fedward predict --adapter" in line]
    assert commands and f"--adapter {out / 'adapter'} " in commands[0], (
        "the printed `fedward predict` command is wrapped across lines:\n" + report
    )


def test_out_that_is_an_existing_file_is_one_line_naming_it_and_the_flag(tmp_path):
    out = _csv(tmp_path / "results", "an existing regular file\n")
    result = _fedward("simulate", "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"fedward: error: --out {out}: is a file, not a folder; give a folder path (it is "
        "created if missing)"
    ]
    assert out.read_text() == "an existing regular file\n"  # left alone


def test_a_blank_patient_cell_is_one_line_naming_file_line_and_fix(tmp_path):
    rows = "".join(f"note {i} cough,flu,p{i % 7}\n" for i in range(20))
    rows += "note twenty fever,cold,\n"  # line 22: no patient
    rows += "".join(f"note {i} fever,cold,p{i % 5}\n" for i in range(20))
    data = _csv(tmp_path / "notes.csv", "text,label,patient_id\n" + rows)
    result = _fedward(
        "simulate", "--data", str(data), "--patient-column", "patient_id",
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    line = _assert_one_line_error(result, tmp_path / "out", f"{data}:22", "'patient_id'")
    assert "fill in the patient of every record" in line


def test_a_run_in_which_no_round_trained_fails_and_offers_nothing_to_use(tiny_model_dir, tmp_path):
    # Seed 42, round 1, rate 0.99: hospital-0 drops at share_keys, hospital-1 at train, so the
    # round has fewer than min_hospitals (2) updates and fails (simulation/app.dropout_stage).
    config = tmp_path / "fast.toml"
    config.write_text(
        'notes_per_hospital = 40\nmax_length = 64\ndevice = "cpu"\n', encoding="utf-8"
    )
    out = tmp_path / "out"
    result = _fedward(
        "simulate",
        "--config", str(config),
        "--model", tiny_model_dir,
        "--hospitals", "2",
        "--min-hospitals", "2",
        "--rounds", "1",
        "--dropout-rate", "0.99",
        "--out", str(out),
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "round 1: failed" in result.stdout
    assert "use it" not in result.stdout and "fedward predict" not in result.stdout
    summary = " ".join(result.stdout.split())
    assert "DP was OFF" not in summary
    # the strategy's warnings (one per failed hospital) come first; the verdict is the last line
    verdict = result.stderr.strip().splitlines()[-1]
    assert verdict.startswith("fedward: error: no round trained"), result.stderr
    assert f"{out / 'adapter'} is the untrained starting one" in verdict


def test_evaluate_only_scores_the_starting_adapter_on_every_hospital_and_trains_nothing(
    tiny_model_dir, tmp_path
):
    config = tmp_path / "fast.toml"
    config.write_text(
        'notes_per_hospital = 40\nmax_length = 64\ndevice = "cpu"\n', encoding="utf-8"
    )
    out = tmp_path / "out"
    result = _fedward(
        "simulate",
        "--config", str(config),
        "--model", tiny_model_dir,
        "--hospitals", "2",
        "--evaluate-only",
        "--out", str(out),
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 hospitals x evaluation only" in result.stdout
    assert "round 0: evaluated" in result.stdout
    history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    [row] = history["rounds"]
    assert row["round"] == 0 and row["status"] == "evaluated"
    assert row["global"]["macro_f1"] is not None
    assert sorted(row["hospitals"]) == ["hospital-0", "hospital-1"]
    assert not any(item.get("trained") for item in row["hospitals"].values())
    assert not (out / "adapter").exists() and "use it" not in result.stdout
