"""Crash-safe writes: a failed write leaves the old file or folder exactly as it was."""

import json
import os
import stat

import pytest

from fedward.common.files import atomic
from fedward.common.files.atomic import (
    recover_dir,
    replace_dir_atomic,
    temp_dir_next_to,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def test_writes_replace_content_and_leave_no_temp_files(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"round": 1})
    write_json_atomic(target, {"round": 2, "hospitals": ["a", "b"]})
    assert json.loads(target.read_text()) == {"round": 2, "hospitals": ["a", "b"]}
    write_text_atomic(tmp_path / "note.txt", "héllo\n")
    assert (tmp_path / "note.txt").read_text(encoding="utf-8") == "héllo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["note.txt", "state.json"]


def test_failed_replace_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "ledger.json"
    write_bytes_atomic(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_unserialisable_json_leaves_old_file(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": True}


def test_private_mode_is_applied_and_kept(tmp_path):
    target = tmp_path / "secret.key"
    write_bytes_atomic(target, b"k1", mode=0o600)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    write_bytes_atomic(target, b"k2")  # no mode given: keeps the existing permissions
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600


def test_replace_dir_swaps_folder_and_removes_old(tmp_path):
    final = tmp_path / "adapter"
    first = temp_dir_next_to(final)
    (first / "weights.bin").write_bytes(b"v1")
    replace_dir_atomic(first, final)
    assert (final / "weights.bin").read_bytes() == b"v1"

    second = temp_dir_next_to(final)
    (second / "weights.bin").write_bytes(b"v2")
    (second / "config.json").write_text("{}")
    replace_dir_atomic(second, final)
    assert (final / "weights.bin").read_bytes() == b"v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_replace_dir_failure_keeps_old_folder(tmp_path, monkeypatch):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "weights.bin").write_bytes(b"v1")
    new = temp_dir_next_to(final)
    (new / "weights.bin").write_bytes(b"v2")

    real_replace = os.replace

    def fail_second_rename(src, dst):
        if str(src) == str(new):
            raise OSError("crash while moving the new folder in")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", fail_second_rename)
    with pytest.raises(OSError):
        replace_dir_atomic(new, final)
    assert (final / "weights.bin").read_bytes() == b"v1"
    assert (new / "weights.bin").read_bytes() == b"v2"


def test_recover_dir_restores_previous_after_interrupted_swap(tmp_path):
    final = tmp_path / "adapter"
    previous = tmp_path / "adapter.previous"  # what a crash between the two renames leaves
    previous.mkdir()
    (previous / "weights.bin").write_bytes(b"v1")
    assert recover_dir(final) is True
    assert (final / "weights.bin").read_bytes() == b"v1"
    assert not previous.exists()
    assert recover_dir(final) is False
