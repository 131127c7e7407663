"""Tests for the file of arrays plus a JSON header (common/files/arrays_file.py)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from fedward.common.errors import DataError
from fedward.common.files.arrays_file import read_arrays_file, write_arrays_file


def _arrays() -> dict[str, np.ndarray]:
    return {
        "lora_A": np.arange(6, dtype=np.float32).reshape(2, 3),
        "head.bias": np.array([0.5, -1.0], dtype=np.float32),
    }


def test_what_is_written_is_read_back_with_the_file_hash(tmp_path):
    path = tmp_path / "deep" / "file.npz"
    header = {"run_id": "r1", "round": 2, "rounds": [{"loss": 0.25}]}
    sha = write_arrays_file(path, header, _arrays(), prefix="adapter:", mode=0o600)
    stored = read_arrays_file(path, prefix="adapter:", what="checkpoint")
    assert stored.header == header
    assert set(stored.arrays) == {"lora_A", "head.bias"}
    for name, value in _arrays().items():
        assert stored.arrays[name].dtype == value.dtype
        np.testing.assert_array_equal(stored.arrays[name], value)
    assert sha == stored.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o600


def test_only_arrays_under_the_prefix_are_read(tmp_path):
    path = tmp_path / "file.npz"
    write_arrays_file(path, {}, _arrays(), prefix="delta:")
    assert read_arrays_file(path, prefix="adapter:", what="release").arrays == {}


def test_a_truncated_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "checkpoint.npz"
    write_arrays_file(path, {"round": 1}, _arrays(), prefix="adapter:")
    path.write_bytes(path.read_bytes()[:150])
    with pytest.raises(DataError, match=r"checkpoint.npz: checkpoint is damaged .*; start over"):
        read_arrays_file(path, prefix="adapter:", what="checkpoint", advice="start over")


def test_a_file_of_something_else_is_refused(tmp_path):
    path = tmp_path / "release.npz"
    np.savez(path, data=np.zeros(3))  # an .npz without the header
    with pytest.raises(DataError, match="release.npz: released update is damaged"):
        read_arrays_file(path, prefix="delta:", what="released update")
    path.write_text("not an archive")
    with pytest.raises(DataError, match="release.npz: released update is damaged"):
        read_arrays_file(path, prefix="delta:", what="released update")


def test_a_missing_file_is_left_to_the_caller(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_arrays_file(tmp_path / "none.npz", prefix="delta:", what="released update")


def test_a_header_json_cannot_hold_is_refused_before_the_file_is_touched(tmp_path):
    path = tmp_path / "file.npz"
    write_arrays_file(path, {"round": 1}, _arrays(), prefix="adapter:")
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_arrays_file(path, {"loss": float("nan")}, _arrays(), prefix="adapter:")
    assert path.read_bytes() == before
