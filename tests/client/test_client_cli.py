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
