"""The soak's in-hospital faults (bench/soak_hooks.py) fire once, when armed, as documented: a
fault that silently did not fire would make the soak report a survival it never tested."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bench.soak_hooks import SITECUSTOMIZE


@pytest.fixture
def hook(tmp_path, monkeypatch):
    replies = tmp_path / "replies"
    replies.mkdir()
    monkeypatch.setenv("FEDWARD_SOAK_REPLIES", str(replies))
    monkeypatch.setenv("FEDWARD_SOAK_REPLAY", str(tmp_path / "replay-armed"))
    monkeypatch.setenv("FEDWARD_SOAK_TRUNCATE", str(tmp_path / "truncate-armed"))
    namespace: dict = {}
    saved_fsync, saved_path = os.fsync, list(sys.meta_path)
    try:
        exec(compile(SITECUSTOMIZE, "sitecustomize.py", "exec"), namespace)
        yield namespace, tmp_path
    finally:
        os.fsync = saved_fsync
        sys.meta_path[:] = saved_path


def test_a_replay_sends_the_reply_of_an_earlier_round_once(hook):
    namespace, folder = hook
    send = namespace["_share_keys_reply"]
    first = {"round": 1, "stage": "share_keys", "ciphertexts": [b"a"]}
    second = {"round": 2, "stage": "share_keys", "ciphertexts": [b"b"]}
    third = {"round": 3, "stage": "share_keys", "ciphertexts": [b"c"]}
    assert send(first) == first  # not armed
    (folder / "replay-armed").write_text("")
    assert send(second) == first  # armed: round 1's reply again
    assert (folder / "replay-armed.fired").exists() and not (folder / "replay-armed").exists()
    assert send(third) == third  # once


def test_a_truncation_cuts_the_masked_update_in_half_once(hook):
    namespace, folder = hook
    send = namespace["_masked_update_reply"]
    reply = {"round": 1, "masked_update": np.arange(10, dtype=np.uint8)}
    assert send(reply)["masked_update"].size == 10
    (folder / "truncate-armed").write_text("")
    assert send(reply)["masked_update"].size == 5
    assert send(reply)["masked_update"].size == 10


def test_the_hook_patches_the_client_session_as_it_is_imported(tmp_path):
    """In a fresh interpreter with the hook on its PYTHONPATH, as in a hospital's ClientApp."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    (tmp_path / "replies").mkdir()
    probe = textwrap.dedent(
        """
        from fedward.client.secagg.session import SecAggClientSession
        print(SecAggClientSession.share_keys.__name__, SecAggClientSession.masked_update.__name__)
        """
    )
    env = dict(
        os.environ,
        PYTHONPATH=str(tmp_path / "hook"),
        FEDWARD_SOAK_REPLIES=str(tmp_path / "replies"),
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["sent", "sent"]


def test_enospc_hits_only_the_ledger_temporary_file_after_the_passes_allowed(hook, monkeypatch):
    namespace, folder = hook
    monkeypatch.setenv("FEDWARD_SOAK_ENOSPC", str(folder / "enospc-armed"))
    monkeypatch.setenv("FEDWARD_SOAK_LEDGER", "h-notes")
    (folder / "enospc-armed").write_text("1")
    other = open(folder / "other.tmp", "w")  # noqa: SIM115
    ledger = open(folder / ".h-notes.json.x.tmp", "w")  # noqa: SIM115
    try:
        namespace["_soak_fsync"](other.fileno())  # not the ledger: passes
        namespace["_soak_fsync"](ledger.fileno())  # the reservation: let through
        with pytest.raises(OSError) as raised:
            namespace["_soak_fsync"](ledger.fileno())
        assert raised.value.errno == errno.ENOSPC
        namespace["_soak_fsync"](ledger.fileno())  # once
    finally:
        other.close()
        ledger.close()
