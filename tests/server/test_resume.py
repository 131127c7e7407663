"""Checkpoints and resuming (server/resume.py), and `fedward run`'s checks before it submits."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from fedward.common.config import RunConfig
from fedward.common.errors import ConfigError, DataError, PolicyError
from fedward.common.protocol import wire
from fedward.server.cli import prepare_run
from fedward.server.resume import (
    arrays_digest,
    check_resumable,
    checkpoint_path,
    load_checkpoint,
    new_run_id,
    save_checkpoint,
    unfinished,
)

LABELS = ["cardiac", "respiratory"]


def _arrays(fill: float) -> dict[str, np.ndarray]:
    return {
        "lora_A": np.full((2, 4), fill, dtype=np.float32),
        "head.bias": np.arange(2, dtype=np.float32) + fill,
    }


def _config(tmp_path, **values) -> RunConfig:
    return RunConfig(labels=LABELS, rounds=3, out=str(tmp_path / "out"), **values)


def test_a_checkpoint_gives_back_the_adapter_rounds_and_run_id(tmp_path):
    config = _config(tmp_path)
    rows = [{"round": 1, "status": "ok"}, {"round": 2, "status": "failed: too few"}]
    sha = save_checkpoint(config.local.out, "run-1", config.spec, 2, _arrays(0.5), rows)
    checkpoint = load_checkpoint(config.local.out)
    assert checkpoint.run_id == "run-1" and checkpoint.completed_round == 2
    assert checkpoint.rounds == rows
    for name, value in _arrays(0.5).items():
        np.testing.assert_array_equal(checkpoint.arrays[name], value)
        assert checkpoint.arrays[name].dtype == np.float32
    assert checkpoint.sha256 == sha
    assert unfinished(checkpoint)  # 2 of 3 rounds


def test_the_adapter_digest_is_what_a_hospital_computes_from_the_message():
    arrays = _arrays(0.25)
    received = wire.record_to_arrays(wire.arrays_to_record(arrays))
    assert arrays_digest(arrays) == wire.arrays_to_record(received).object_id
    assert arrays_digest(arrays) != arrays_digest(_arrays(0.5))


def test_new_run_ids_differ():
    assert new_run_id() != new_run_id()


def test_a_missing_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    with pytest.raises(DataError, match="no checkpoint to resume from"):
        load_checkpoint(tmp_path)


def test_a_truncated_checkpoint_is_reported_as_damaged(tmp_path):
    config = _config(tmp_path)
    save_checkpoint(config.local.out, "run-1", config.spec, 1, _arrays(0.5), [{"round": 1}])
    path = checkpoint_path(config.local.out)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="checkpoint.npz: checkpoint is damaged"):
        load_checkpoint(config.local.out)


def test_tensors_swapped_inside_a_checkpoint_are_detected(tmp_path):
    config = _config(tmp_path)
    save_checkpoint(config.local.out, "run-1", config.spec, 1, _arrays(0.5), [{"round": 1}])
    path = checkpoint_path(config.local.out)
    with np.load(path) as archive:
        content = {name: archive[name] for name in archive.files}
    content["adapter:lora_A"] = content["adapter:lora_A"] + 1
    buffer = io.BytesIO()
    np.savez(buffer, **content)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match="do not match their recorded hash"):
        load_checkpoint(config.local.out)
    assert zipfile.is_zipfile(path)


def test_resuming_under_another_config_is_refused_naming_the_fields(tmp_path):
    config = _config(tmp_path)
    save_checkpoint(config.local.out, "run-1", config.spec, 1, _arrays(0.5), [{"round": 1}])
    checkpoint = load_checkpoint(config.local.out)
    with pytest.raises(ConfigError, match=r"epsilon \(was 8.0, now 3.0\)"):
        check_resumable(checkpoint, _config(tmp_path, target_epsilon=3.0).spec)
    # where the run lives, the flag itself and waiting times may change
    moved = _config(tmp_path, resume=True, round_timeout=30.0).updated(**{"out": "/elsewhere"})
    check_resumable(checkpoint, moved.spec)


def test_run_refuses_to_overwrite_an_unfinished_run(tmp_path):
    config = _config(tmp_path)
    save_checkpoint(config.local.out, "run-1", config.spec, 1, _arrays(0.5), [{"round": 1}])
    with pytest.raises(ConfigError, match="stopped after round 1 of 3; continue it with --resume"):
        prepare_run(config, resume=False)
    resumed = prepare_run(config, resume=True)
    assert resumed.local.resume and resumed.local.out == str((tmp_path / "out").resolve())


def test_run_refuses_to_resume_a_finished_run_or_nothing(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(DataError, match="no checkpoint"):
        prepare_run(config, resume=True)
    save_checkpoint(
        config.local.out, "run-1", config.spec, 3, _arrays(0.5), [{"round": r} for r in (1, 2, 3)]
    )
    with pytest.raises(ConfigError, match="already completed all 3 rounds"):
        prepare_run(config, resume=True)
    assert not prepare_run(
        config, resume=False
    ).local.resume  # a new run may replace a finished one


def test_run_needs_the_label_set(tmp_path):
    with pytest.raises(ConfigError, match="field 'labels': required for a deployment"):
        prepare_run(RunConfig(out=str(tmp_path)), resume=False)


def test_a_run_resumed_from_a_moved_folder_passes_a_hospital_that_pins_its_digest(tmp_path):
    """The README lets `out` change on resume; a hospital that pinned the digest `fedward run`
    printed at the start must accept the resumed run's messages too."""
    from fedward.client.policy import SitePolicy

    started = prepare_run(_config(tmp_path, round_timeout=60.0), resume=False)
    pinned = started.digest()  # what `fedward run` printed, and the hospital pinned
    save_checkpoint(started.local.out, "run-1", started.spec, 1, _arrays(0.5), [{"round": 1}])
    moved = tmp_path / "moved"
    (tmp_path / "out").rename(moved)

    resumed = prepare_run(
        _config(tmp_path, round_timeout=120.0, device="cpu").updated(**{"out": str(moved)}),
        resume=True,
    )
    assert resumed.local.out != started.local.out and resumed.local.resume
    assert resumed.digest() == pinned
    # What the hospital receives, and checks, is the same run spec.
    spec, _, _ = wire.read_round_config(wire.round_config(resumed.spec, 2, "run-1"))
    SitePolicy.permissive(approved_run_configs=[pinned]).check(spec)
    # ...while a change to the spec itself is still caught by the pin.
    changed, _, _ = wire.read_round_config(
        wire.round_config(resumed.updated(target_epsilon=4.0).spec, 2, "run-1")
    )
    with pytest.raises(PolicyError, match="not on the site's approved list"):
        SitePolicy.permissive(approved_run_configs=[pinned]).check(changed)
