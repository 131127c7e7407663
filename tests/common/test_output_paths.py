"""Tests for the up-front check of output paths (common/files/output_paths.py)."""

from __future__ import annotations

import os

import pytest

from fedward.common.errors import ConfigError
from fedward.common.files.output_paths import check_output_file, check_output_folder


def test_a_folder_to_create_or_an_existing_one_passes_and_nothing_is_created(tmp_path):
    assert check_output_folder(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert check_output_folder(tmp_path, "--out") == tmp_path
    assert check_output_file(tmp_path / "new" / "state.db", "--database").name == "state.db"
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_a_folder_is_expected_names_the_path_and_the_flag(tmp_path):
    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"^--out .*results: is a file, not a folder"):
        check_output_folder(tmp_path / "results", "--out")
    with pytest.raises(ConfigError, match=r"^--out .*results/run: .*results is a file"):
        check_output_folder(tmp_path / "results" / "run", "--out")
    with pytest.raises(ConfigError, match=r"^--log-file .*results/x.log: .*results is a file"):
        check_output_file(tmp_path / "results" / "x.log", "--log-file")


def test_a_folder_where_a_file_is_expected_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^--database .*: is a folder, not a file"):
        check_output_file(tmp_path, "--database")


def test_a_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_output_folder("~/runs", "--out") == tmp_path / "runs"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_parent_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"^--out .*locked/run: cannot be created"):
        check_output_folder(locked / "run", "--out")


def test_an_unwritable_parent_is_refused_even_where_root_could_write(tmp_path, monkeypatch):
    """The same as above where the tests run as root, who passes every permission check: a
    stand-in `os.access` says the folder is read-only."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        "fedward.common.files.output_paths.os.access",
        lambda path, mode: False if path == locked else real_access(path, mode),
    )
    with pytest.raises(ConfigError, match=r"^--ledger .*locked/ledger: cannot be created: .*"):
        check_output_folder(locked / "ledger", "--ledger")
    with pytest.raises(ConfigError, match=r"^--out .*locked: not writable by this user"):
        check_output_folder(locked, "--out")
