"""Tests for the content hash of data sets and model folders (common/files/digest.py)."""

from __future__ import annotations

import hashlib

import pytest

from fedward.common.files.digest import content_sha256


def test_a_file_is_hashed_with_its_name_and_size(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_bytes(b"text,label\n")
    expected = hashlib.sha256(b"notes.csv\0" + b"11\0" + b"text,label\n").hexdigest()
    assert content_sha256(path) == expected


def test_any_change_to_a_folder_changes_its_hash_but_its_own_name_does_not(tmp_path):
    folder = tmp_path / "data"
    (folder / "part").mkdir(parents=True)
    (folder / "a.txt").write_text("one")
    (folder / "part" / "b.txt").write_text("two")
    first = content_sha256(folder)
    assert content_sha256(folder.rename(tmp_path / "moved")) == first
    folder = tmp_path / "moved"
    (folder / "part" / "b.txt").write_text("tw0")
    edited = content_sha256(folder)
    assert edited != first
    (folder / "part" / "b.txt").rename(folder / "b.txt")
    assert content_sha256(folder) not in (first, edited)


def test_suffixes_leave_other_files_out(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    before = content_sha256(tmp_path, suffixes=(".safetensors",))
    (tmp_path / "config.json").write_text("{}")
    assert content_sha256(tmp_path, suffixes=(".safetensors",)) == before
    assert content_sha256(tmp_path) != before


def test_missing_and_empty_paths_are_told_apart(tmp_path):
    with pytest.raises(FileNotFoundError):
        content_sha256(tmp_path / "missing")
    with pytest.raises(ValueError):
        content_sha256(tmp_path)
    (tmp_path / "readme.md").write_text("no weights")
    with pytest.raises(ValueError):
        content_sha256(tmp_path, suffixes=(".bin",))
