"""Checkpoints of a running federation, and resuming a stopped run from its last completed round.

After every completed round the coordinator writes ONE file, `<out>/checkpoint.npz`, atomically:
the global adapter tensors and a JSON header (fedward run id, last completed round, the history
rows so far, the run config). It is the commit point of a round: the adapter folder, history.json
and the audit record are derived from it and written after it, so a crash at any moment leaves a
checkpoint whose tensors and rounds belong together.

Resuming (`RunConfig.resume`, set by `fedward run --resume`) reads the checkpoint and continues
with round `completed_round + 1` under the same fedward run id. Flower cannot continue a stopped
Flower run, so a resumed run is a new Flower run; the fedward run id is what hospitals' ledgers
key their rounds by, which is why a resumed round is never counted twice.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedward.common.config import RunSpec
from fedward.common.errors import ConfigError, DataError
from fedward.common.files.arrays_file import read_arrays_file, write_arrays_file
from fedward.common.protocol import wire

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.npz"
CHECKPOINT_FORMAT = "fedward-checkpoint"
CHECKPOINT_VERSION = 1

_ARRAY_PREFIX = "adapter:"  # adapter tensors inside the .npz (common.arrays_file)


@dataclass(frozen=True)
class Checkpoint:
    """A run as it stood after its last completed round.

    Attributes:
        run_id: The fedward run id (stable across resumptions; hospitals' ledgers key by it).
        completed_round: The last round that completed (ok or failed cleanly).
        arrays: The global adapter tensors after that round.
        rounds: The history rows of rounds 1..completed_round.
        config: The run spec the run was started with, under its flat names (`RunSpec.flat`).
        sha256: SHA-256 of the checkpoint file (recorded in the audit log).
    """

    run_id: str
    completed_round: int
    arrays: dict[str, np.ndarray]
    rounds: list[dict] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""


def new_run_id() -> str:
    """A fresh fedward run id: random, so two runs never share ledger keys."""
    return uuid.uuid4().hex


def checkpoint_path(out: str | Path) -> Path:
    """Where the checkpoint of the run writing to `out` lives."""
    return Path(out) / CHECKPOINT_FILE


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """Content id (SHA-256) of an adapter as it travels: Flower's object id of its ArrayRecord.

    A hospital computes the same value from the adapter it received (`common.wire`), so the
    coordinator's and the hospitals' audit logs can be matched round by round.
    """
    return wire.arrays_to_record(arrays).object_id


def save_checkpoint(
    out: str | Path,
    run_id: str,
    spec: RunSpec,
    completed_round: int,
    arrays: dict[str, np.ndarray],
    rounds: list[dict],
) -> str:
    """Write `<out>/checkpoint.npz` atomically, with the run `spec` it resumes under; returns the
    file's SHA-256."""
    header = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "run_id": str(run_id),
        "completed_round": int(completed_round),
        "config": spec.flat(),
        "rounds": rounds,
        "adapter_sha256": arrays_digest(arrays),
    }
    return write_arrays_file(checkpoint_path(out), header, arrays, prefix=_ARRAY_PREFIX)


def load_checkpoint(out: str | Path) -> Checkpoint:
    """Read `<out>/checkpoint.npz`; `DataError` naming the file when missing or damaged."""
    path = checkpoint_path(out)
    try:
        stored = read_arrays_file(
            path,
            prefix=_ARRAY_PREFIX,
            what="checkpoint",
            advice="restore it from a backup or start a new run",
        )
    except FileNotFoundError:
        raise DataError(
            f"{path}: no checkpoint to resume from; the run never completed a round in this "
            "output folder (check --out / the config's 'out')"
        ) from None
    header, arrays = stored.header, stored.arrays
    if header.get("format") != CHECKPOINT_FORMAT or header.get("version") != CHECKPOINT_VERSION:
        raise DataError(f"{path}: not a fedward checkpoint version {CHECKPOINT_VERSION}")
    if arrays_digest(arrays) != header.get("adapter_sha256"):
        raise DataError(f"{path}: checkpoint tensors do not match their recorded hash (damaged)")
    return Checkpoint(
        run_id=str(header["run_id"]),
        completed_round=int(header["completed_round"]),
        arrays=arrays,
        rounds=list(header["rounds"]),
        config=dict(header["config"]),
        sha256=stored.sha256,
    )


def check_resumable(checkpoint: Checkpoint, spec: RunSpec) -> None:
    """Refuse (`ConfigError`) to resume under a run spec other than the one the run started with.

    Every field of the run spec counts (the noise of DP-SGD is calibrated on `rounds`,
    `epsilon`...); local settings (where the run lives, timeouts, device) may change.
    """
    current = spec.flat()
    changed = sorted(
        name
        for name in set(current) | set(checkpoint.config)
        if current.get(name) != checkpoint.config.get(name)
    )
    if changed:
        shown = ", ".join(
            f"{name} (was {checkpoint.config.get(name)!r}, now {current.get(name)!r})"
            for name in changed[:5]
        )
        raise ConfigError(
            f"cannot resume run {checkpoint.run_id}: the run spec differs from the one it "
            f"started with: {shown}. Resume with the same config file"
        )


def unfinished(checkpoint: Checkpoint) -> bool:
    """True while the checkpointed run has rounds left to do."""
    return checkpoint.completed_round < int(checkpoint.config.get("rounds", 0))
