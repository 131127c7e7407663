"""What a hospital pins before it trains: the run's spec, its model and its starting adapter.

Gate 1 of `Site` (client/site/gates.py) asks these, before any record is read. A coordinator
names the model, the starting adapter and the spec; the hospital trains only what its policy
pins by content hash (issue 28: with no pin, a hospital went to fetch a hub model the
coordinator named; issue 30: a starting adapter it never checked), and only the spec it agreed
to on first contact (a later message for the run with other rounds is refused,
`run.spec_changed`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from fedward.client.policy import SitePolicy, model_content_hash, packaged_model_hash
from fedward.common.config import DataSchema, ModelSpec, RunSpec
from fedward.common.errors import DataError, ModelError, PolicyError
from fedward.common.files.atomic import fsync_dir, write_json_atomic
from fedward.common.model import resolve_model_path
from fedward.common.protocol.reasons import Reason
from fedward.common.warm_start import adapter_content_hash

log = logging.getLogger(__name__)

#: Sub-folder of the ledger folder holding each (data set, run)'s spec, fixed on first contact.
RUNS = "runs"
RUN_STATE_MODE = 0o600  # the hospital's own record of what it agreed to


def pinned_policy(policy: SitePolicy, schema: DataSchema) -> SitePolicy:
    """The policy with its models pinned: a policy that pins no model content trains only the
    packaged default (issue 28: with `allowed_model_hashes` unset, the coordinator named the
    model, and a hospital went to fetch a hub model it named), and one that pins no starting
    adapter trains no run that has one (issue 30). A policy that names no `dp_unit` requires
    the patient where the hospital's schema names a patient column (issue 40: one record-level
    run locked its patients into record-level protection for the data set's life,
    `ledger.unit_mixed`), else accepts the record.

    Args:
        policy: The site policy as the hospital wrote it.
        schema: The hospital's data schema (does it name a patient column?).

    Returns:
        The policy to judge a run spec with.
    """
    if policy.dp_unit is None:  # issue 40: patient data trains per patient unless it says
        unit = "patient" if schema.patient_column else "record"
        policy = policy.model_copy(update={"dp_unit": unit})
    if policy.allowed_adapter_hashes is None:  # issue 30: no unpinned starting adapter
        policy = policy.model_copy(update={"allowed_adapter_hashes": []})
    if policy.allowed_model_hashes is not None:
        return policy
    default = packaged_model_hash()
    return policy.model_copy(update={"allowed_model_hashes": [default] if default else []})


def adapter_hash(model: ModelSpec, who: str) -> str | None:
    """The content hash of the run's starting adapter (a folder on this machine), or None when
    the run has none or it cannot be hashed (then a policy that pins refuses).

    Args:
        model: The run's model group (`init_adapter`).
        who: The hospital, for its log.

    Returns:
        The adapter's content hash, or None.
    """
    if not model.init_adapter:
        return None
    try:
        return adapter_content_hash(model.init_adapter)
    except (ModelError, OSError) as exc:
        log.warning("%s: starting adapter: %s", who, exc)
        return None


def model_hash(model: ModelSpec, who: str) -> str | None:
    """The content hash of the run's base model if it is a local folder or file; None otherwise
    (a hub id: never fetched, the pinned policy refuses it).

    Args:
        model: The run's model group (`name`).
        who: The hospital, for its log.

    Returns:
        The model's content hash, or None.
    """
    path = resolve_model_path(model.name)
    if not Path(path).exists():
        log.warning("%s: model %r is not a local folder; refused", who, model.name)
        return None
    try:
        return model_content_hash(path)
    except ModelError as exc:
        log.warning("%s: %s", who, exc)
        return None  # the policy then refuses: the hash cannot be checked


def fix_run_spec(ledger_dir: Path, dataset_id: str, run_id: str, spec: RunSpec, who: str) -> None:
    """Fix the run's spec at this hospital on first contact; refuse any other spec later.

    The first spec this data set accepts for a run id is written (atomically, never
    overwritten) to `<ledger>/runs/<data-set id>.<run id>.json`; a later train or evaluate
    message for that run whose spec digest differs is refused with `run.spec_changed` and
    logged. So a run's rounds, labels, model and budget are the ones this hospital agreed to,
    whatever a later message claims (issue 28: "evaluation only after the final round" asked
    again with rounds = 1). The file survives a restart.

    Args:
        ledger_dir: The hospital's ledger folder.
        dataset_id: The data set's id (plain identifier, checked when the site was opened).
        run_id: The run id (plain identifier, checked at admission).
        spec: The run spec this message carries.
        who: The hospital, for messages and its log.

    Raises:
        PolicyError: `run.spec_changed`, when the run was fixed with another spec.
        DataError: when the run state cannot be read or written.
    """
    digest = spec.digest()
    path = ledger_dir / RUNS / f"{dataset_id}.{run_id}.json"
    try:
        fixed = _fix_once(
            path,
            {"run_id": str(run_id), "spec_sha256": digest, "rounds": spec.federation.rounds},
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("%s: cannot read or write the run state %s: %s", who, path, exc)
        raise DataError(
            f"hospital {who}: the state of run {run_id} cannot be read or written "
            "(details in the hospital's log); refused"
        ) from None
    if fixed["spec_sha256"] != digest:
        log.warning(
            "%s: run %s: a message with run spec %s... refused; the run was fixed at %s... "
            "on first contact",
            who,
            run_id,
            digest[:12],
            str(fixed["spec_sha256"])[:12],
        )
        raise PolicyError(
            f"hospital {who}: run {run_id} was fixed on first contact with run spec "
            f"{str(fixed['spec_sha256'])[:12]}... ({fixed['rounds']} rounds); this message "
            f"carries {digest[:12]}... ({spec.federation.rounds} rounds). Refused, nothing "
            "spent",
            reason=Reason("run.spec_changed"),
        )


def check_starting_arrays(
    pinned: dict[str, np.ndarray], received: dict[str, np.ndarray], who: str
) -> None:
    """Refuse a first round whose global adapter is not the one this hospital built from its
    own, pinned copy of the starting adapter (`init_adapter`): otherwise the policy's pin would
    hold for the files on disk while the coordinator started the run from other weights. Runs
    before any record is read; nothing is spent. Later rounds' global adapters are the
    coordinator's average and cannot be checked this way (DP holds whatever the weights).

    Args:
        pinned: The starting adapter's arrays as this hospital built them.
        received: The global adapter's arrays the coordinator sent.
        who: The hospital, for messages and its log.

    Raises:
        PolicyError: `model.start_mismatch`, when they differ in a name, shape or value.
    """
    same = pinned.keys() == received.keys() and all(
        np.array_equal(pinned[name], received[name]) for name in pinned
    )
    if not same:
        log.warning("%s: the first round's global adapter differs from the pinned start", who)
        raise PolicyError(
            f"hospital {who}: the first round's global adapter is not the pinned starting "
            "adapter (init_adapter) as built here; refused before any record was read",
            reason=Reason("model.start_mismatch"),
        )


def _fix_once(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The record kept at `path`: `record` if no other was written first, else that one.

    Written to a temporary file (fsynced) and linked into place, which fails if the file exists:
    of two racing first contacts, one wins and the other reads what it wrote. Never overwritten.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        temp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        write_json_atomic(temp, record, mode=RUN_STATE_MODE)
        try:
            os.link(temp, path)
            fsync_dir(path.parent)
        except FileExistsError:
            pass
        finally:
            temp.unlink(missing_ok=True)
    kept = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(kept, dict) or not isinstance(kept.get("spec_sha256"), str):
        raise ValueError(f"{path}: not a run state record")
    return kept
