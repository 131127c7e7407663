"""The update a data set released for a (run, round), kept so that a repeat resends it.

A resumed run repeats the round it was interrupted in. Training that round again would release
a second update the ledger does not count; so a hospital keeps the update it released (mode
0600: DP-protected, but the hospital's own) and, asked again for the same round from the same
global adapter, sends the very same update ("replay"). Any other repeat is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedward.client.trainer import DPPlan, TrainResult
from fedward.common.errors import DataError, PrivacyBudgetExceeded
from fedward.common.files.arrays_file import read_arrays_file, write_arrays_file

log = logging.getLogger(__name__)

#: Sub-folder of the ledger folder holding the last released update of each (data set, run).
RELEASES = "releases"
RELEASE_MODE = 0o600  # an update is DP-protected, but it stays the hospital's own

_RELEASE_PREFIX = "delta:"  # the update's tensors inside the .npz (common.arrays_file)


@dataclass(frozen=True)
class Release:
    """The update a data set released for one (run, round), kept so a repeat can resend it."""

    run_id: str
    round: int
    global_sha256: str  # the global adapter it was trained from
    delta: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    epsilon_run: float | None
    plan: DPPlan | None


def release_path(ledger_dir: Path, dataset_id: str, run_id: str) -> Path:
    """Where a data set keeps its last released update of a run.

    Args:
        ledger_dir: The hospital's ledger folder.
        dataset_id: The data set's id (a plain identifier, checked when the site opened).
        run_id: The run id (a plain identifier, checked at admission): no path tricks.

    Returns:
        `<ledger>/releases/<data set>.<run id>.npz`.
    """
    return ledger_dir / RELEASES / f"{dataset_id}.{run_id}.npz"


def save_release(
    path: Path, run_id: str, server_round: int, result: TrainResult, global_sha256: str
) -> None:
    """Keep the update about to be released, with what a replay must send beside it.

    Args:
        path: Where (`release_path`).
        run_id: The run.
        server_round: The round it answers.
        result: The training result whose update is released.
        global_sha256: The global adapter it was trained from.
    """
    header = {
        "run_id": str(run_id),
        "round": server_round,
        "global_sha256": global_sha256,
        "num_examples": result.num_examples,
        "train_loss": result.train_loss if np.isfinite(result.train_loss) else None,
        "epsilon_run": result.epsilon_spent,
        "plan": None
        if result.plan is None
        else [result.plan.noise_multiplier, result.plan.sample_rate, result.plan.steps],
    }
    write_arrays_file(path, header, result.delta, prefix=_RELEASE_PREFIX, mode=RELEASE_MODE)


def load_release(path: Path, who: str) -> Release | None:
    """The update kept at `path`, or None when there is none or it cannot be read (logged).

    Args:
        path: Where (`release_path`).
        who: The hospital, for its log.

    Returns:
        The kept release, or None.
    """
    if not path.is_file():
        return None
    try:
        stored = read_arrays_file(path, prefix=_RELEASE_PREFIX, what="released update")
    except (FileNotFoundError, DataError) as exc:
        log.warning("%s: %s", who, exc)
        return None
    header, delta = stored.header, stored.arrays
    plan = header["plan"]
    return Release(
        run_id=header["run_id"],
        round=int(header["round"]),
        global_sha256=header["global_sha256"],
        delta=delta,
        num_examples=int(header["num_examples"]),
        train_loss=float("nan") if header["train_loss"] is None else header["train_loss"],
        epsilon_run=header["epsilon_run"],
        plan=None if plan is None else DPPlan(float(plan[0]), float(plan[1]), int(plan[2])),
    )


def release_to_resend(
    release: Release | None, run_id: str, server_round: int, global_sha256: str, who: str
) -> Release:
    """The kept update of a round this data set already paid for, if it may be sent again.

    Args:
        release: What `load_release` found (None: nothing kept).
        run_id: The run.
        server_round: The round asked again.
        global_sha256: The global adapter the repeated message carries.
        who: The hospital, for the message.

    Returns:
        The release to send again, unchanged.

    Raises:
        PrivacyBudgetExceeded: when it was not kept or came from another global adapter:
            training again would release a second update the ledger does not count.
    """
    if release is None or release.round != server_round:
        problem = "its released update was not kept"
    elif release.global_sha256 != global_sha256:
        problem = "it was trained from a different global adapter"
    else:
        return release
    raise PrivacyBudgetExceeded(
        f"hospital {who}: round {server_round} of run {run_id} was already trained on "
        f"this data set and its privacy cost recorded, but {problem}; training it again "
        "would release a second update the ledger does not count. Refused"
    )
