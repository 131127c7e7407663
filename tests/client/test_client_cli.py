"""`fedward client start` as hospital IT runs it: a ledger or audit-log path that cannot be
written is one line naming the path and the flag, exit code 2, before the SuperNode starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

FEDWARD = shutil.which("fedward") or str(Path(sys.executable).parent / "fedward")


def _start(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        FEDWARD, "client", "start", "--server", "127.0.0.1:9", "--insecure",
        "--data", str(tmp_path / "notes.csv"), "--policy", str(tmp_path / "policy.toml"), *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def _one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == [f"fedward: error: {expected}"]


def test_ledger_that_is_an_existing_file(tmp_path):
    ledger = tmp_path / "ledger"
    ledger.write_text("an existing regular file\n")
    _one_line_error(
        _start(tmp_path, "--ledger", str(ledger)),
        f"--ledger {ledger}: is a file, not a folder; give a folder path (it is created if "
        "missing)",
    )


def test_audit_log_that_is_a_folder(tmp_path):
    _one_line_error(
        _start(tmp_path, "--ledger", str(tmp_path / "ledger"), "--audit-log", str(tmp_path)),
        f"--audit-log {tmp_path}: is a folder, not a file; give a file path",
    )
    assert not (tmp_path / "ledger").exists()


def test_hospital_it_fits_its_own_model_from_a_global_adapter_afterwards(tmp_path, tiny_model_dir):
    """`fedward client personalize`: the last round's home fitting, run on its own later."""
    import json
    import stat

    from fedward.common.config import RunConfig
    from fedward.common.model import build_model, save_adapter

    labels = ["cardiac", "respiratory"]
    config = RunConfig(model=tiny_model_dir, labels=labels, max_length=32, device="cpu")
    save_adapter(
        build_model(config.spec, 2),
        tmp_path / "global",
        labels,
        config.spec.task,
        config.spec.model,
    )
    words = {"cardiac": "chest pain and troponin rise", "respiratory": "cough and crackles"}
    lines = ["text,label,patient"]
    lines += [f"note {i}: {words[labels[i % 2]]},{labels[i % 2]},p{i // 2}" for i in range(80)]
    (tmp_path / "notes.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "own"
    command = [
        FEDWARD, "client", "personalize", "--adapter", str(tmp_path / "global"),
        "--data", str(tmp_path / "notes.csv"), "--patient-column", "patient",
        "--out", str(out), "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    printed = " ".join(done.stdout.split())
    assert f"{report['own']:.3f}" in printed and f"{report['alone']:.3f}" in printed
    assert "not DP: keep it at the hospital" in printed
    assert {"alone", "global", "own", "own_method"} <= set(report)
    assert stat.S_IMODE((out / "adapter").stat().st_mode) == 0o700
    predicted = subprocess.run(
        [FEDWARD, "predict", "--adapter", str(out / "adapter"), "chest pain"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert predicted.returncode == 0 and "cardiac" in predicted.stdout, predicted.stderr
