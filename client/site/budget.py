"""The budget gate's ledger: opened once per request under the data set's id, never forked.

A data set's lifetime budget lives in one ledger file keyed by the node config's data-set id
(an operator may rename a file; a renamed file must not start a fresh budget). The same bytes
recorded under another id are refused: a changed `--dataset-id` would otherwise do just that.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedward.client.privacy.ledger import PrivacyLedger, dataset_fingerprint
from fedward.client.trainer import HistoryEntry
from fedward.common.errors import DataError, PolicyError
from fedward.common.protocol.reasons import Reason

log = logging.getLogger(__name__)


def open_ledger(
    ledger_dir: Path, dataset_id: str, data_path: Path, who: str
) -> tuple[PrivacyLedger, str]:
    """The privacy ledger of a hospital's data set, and the data file's SHA-256.

    The hash goes into each entry, for the audit; a ledger an older fedward kept under that
    hash is carried over (`migrate_hash_ledger`).

    Args:
        ledger_dir: The hospital's ledger folder.
        dataset_id: The data set's id, the ledger's key.
        data_path: The data file.
        who: The hospital, for messages and its log.

    Returns:
        (ledger, data file SHA-256).

    Raises:
        DataError: when the ledger or the data file cannot be read (details logged only).
        PolicyError: `dataset.recorded_elsewhere`.
    """
    try:
        ledger = PrivacyLedger.open(ledger_dir, dataset_id, description=str(data_path))
        data_sha256 = dataset_fingerprint(data_path)
        ledger.migrate_hash_ledger(data_sha256)
        if not ledger.entries:
            _check_not_recorded_elsewhere(ledger_dir, dataset_id, data_sha256, who)
    except DataError as exc:
        log.error("%s: %s", who, exc)
        raise DataError(
            f"hospital {who}: its privacy ledger or data set cannot be read "
            "(details in the hospital's log); training refused so that no privacy "
            "spending goes unrecorded"
        ) from None
    return ledger, data_sha256


def _check_not_recorded_elsewhere(
    ledger_dir: Path, dataset_id: str, data_sha256: str, who: str
) -> None:
    """Refuse a data set that is new under this id but whose very bytes another ledger in the
    folder has recorded: the same data under a new data-set id (a renamed node key, a changed
    --dataset-id) would otherwise start a fresh lifetime budget. The operator must start the
    hospital with the id that ledger has."""
    others = sorted(
        other.dataset
        for other in PrivacyLedger.all_in(ledger_dir)
        if other.dataset != dataset_id
        and any(entry.data_sha256 == data_sha256 for entry in other.entries)
    )
    if others:
        raise PolicyError(
            f"hospital {who}: data set id {dataset_id} has no ledger yet, but "
            f"this data file's exact contents are recorded under data-set id "
            f"{', '.join(others)}; start the hospital with --dataset-id {others[0]} (the "
            "same data keeps its lifetime budget). Every request is refused until then",
            reason=Reason("dataset.recorded_elsewhere"),
        )


def run_history(ledger: PrivacyLedger, run_id: str, server_round: int) -> list[HistoryEntry]:
    """Accountant history of a run's rounds before `server_round` (the run's own budget).

    The ledger holds every run; the trainer checks the run's target epsilon against this
    run's rounds only, while the budget gate checks the lifetime budget against all of them.

    Args:
        ledger: The data set's ledger.
        run_id: The run.
        server_round: The round about to train.

    Returns:
        (noise multiplier, sample rate, steps) of each earlier round of the run.
    """
    return [
        (entry.noise_multiplier, entry.sample_rate, entry.steps)
        for entry in ledger.entries
        if entry.run_id == str(run_id) and entry.round < server_round
    ]
