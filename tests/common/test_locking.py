"""Tests for the cross-process file lock (common/files/locking.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fedward.common.files.locking import exclusive_lock

pytest.importorskip("fcntl")

# A second process: says it is about to take the lock, takes it, and says it got it.
_OTHER_WRITER = """
import sys
from pathlib import Path
from fedward.common.files.locking import exclusive_lock
folder = Path(sys.argv[1])
(folder / "waiting").write_text("")
with exclusive_lock(folder / "ledger.json.lock"):
    (folder / "got-it").write_text("")
"""


def _wait_for(path, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_second_process_waits_until_the_lock_is_released(tmp_path):
    lock = tmp_path / "ledger.json.lock"
    with exclusive_lock(lock):
        other = subprocess.Popen([sys.executable, "-c", _OTHER_WRITER, str(tmp_path)])
        try:
            _wait_for(tmp_path / "waiting")
            time.sleep(0.5)
            assert not (tmp_path / "got-it").exists()  # still blocked behind our lock
        except BaseException:
            other.kill()
            raise
    assert other.wait(timeout=60) == 0
    assert (tmp_path / "got-it").exists()


def test_the_locked_file_is_opened_for_appending_and_never_truncated(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"first\n")
    with exclusive_lock(path) as handle:
        handle.seek(0)
        assert handle.read() == b"first\n"
        handle.write(b"second\n")
    assert path.read_bytes() == b"first\nsecond\n"
