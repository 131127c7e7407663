"""A hospital's long-term SecAgg signing key: made once, never replaced by accident.

The other hospitals pin its public key in their rosters; a key silently made anew by re-running
the command would have every one of them refuse this hospital's round keys. So the command is
idempotent: run again, it prints the key it made; only `--replace` rotates it.
"""

from __future__ import annotations

import stat

import pytest
from typer.testing import CliRunner

from fedward.client.cli import client_app
from fedward.client.secagg import (
    parse_signing_public_key,
    signing_public_key,
    write_signing_key,
)
from fedward.common.errors import ConfigError


def _printed_key(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_the_command_makes_the_key_once_and_then_only_prints_it(tmp_path):
    path = tmp_path / "secagg-signing.pem"
    first = _printed_key(CliRunner().invoke(client_app, ["signing-key", str(path)]))
    assert first.startswith("ed25519:") and len(first) == len("ed25519:") + 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    made = path.read_bytes()
    again = _printed_key(CliRunner().invoke(client_app, ["signing-key", str(path)]))
    assert again == first and path.read_bytes() == made  # nothing rotated
    # what it prints is what a roster pins, and what the key signs with
    assert parse_signing_public_key(first, "roster") == bytes.fromhex(first[len("ed25519:") :])


def test_replace_rotates_the_key(tmp_path):
    path = tmp_path / "secagg-signing.pem"
    first = _printed_key(CliRunner().invoke(client_app, ["signing-key", str(path)]))
    rotated = _printed_key(CliRunner().invoke(client_app, ["signing-key", str(path), "--replace"]))
    assert rotated != first
    assert signing_public_key(path) == rotated.removeprefix("ed25519:")


def test_the_library_refuses_to_overwrite_a_key(tmp_path):
    path = tmp_path / "key.pem"
    public = write_signing_key(path)
    with pytest.raises(ConfigError, match="already there"):
        write_signing_key(path)
    assert signing_public_key(path) == public


def test_a_file_that_is_no_key_is_named(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("text,label\n", encoding="utf-8")
    result = CliRunner().invoke(client_app, ["signing-key", str(path)])
    assert result.exit_code != 0
    with pytest.raises(ConfigError, match="notes.csv: not a readable signing key"):
        signing_public_key(path)
    assert path.read_text(encoding="utf-8") == "text,label\n"  # left as it was
