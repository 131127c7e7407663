"""The hospital's own record of what left it and what it refused (its hash-chained audit log).

A refusal goes to the coordinator as a reason code with numbers, never its text; the text -- a
path, a column, a record's value -- is written here, for the hospital's staff only.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from fedward.client.privacy.accounting import compose_epsilon, group_epsilon
from fedward.client.trainer import TrainResult
from fedward.common.config import PrivacySpec
from fedward.common.errors import DataError, FedwardError
from fedward.common.files.audit_log import AuditLog
from fedward.common.protocol import wire

log = logging.getLogger(__name__)


def audit_release(
    audit: AuditLog,
    action: str,
    run_id: str,
    server_round: int,
    result: TrainResult,
    *,
    who: str,
    dataset: dict[str, str | None],
    global_sha256: str,
    epsilon_lifetime: float | None,
    lifetime_epsilon: float,
    privacy: PrivacySpec | None = None,
) -> None:
    """One audit record per released update (`train`, or `replay` of a kept one).

    A record-level run on data with a patient column also states what the lifetime epsilon
    means per patient: group privacy over the largest patient's records (`group_epsilon`). A
    distributed-noise run also states what the run spent if no other hospital of its rounds
    was honest (`epsilon_run_if_alone`, docs/privacy.md).

    Args:
        audit: The hospital's audit log.
        action: "train" or "replay".
        run_id: The run.
        server_round: The round.
        result: The released update and its figures.
        who: The hospital.
        dataset: The data set's fields: `dataset`, `dataset_sha256`, and
            `init_adapter_sha256` when the run started from a pinned adapter.
        global_sha256: The global adapter it was trained from.
        epsilon_lifetime: The data set's total after this round (at the run's delta), as the
            ledger recorded it, in `dp_unit`; None without DP.
        lifetime_epsilon: The policy's lifetime budget.
        privacy: The run's privacy group (None for a replay: its unit is the ledger's).
    """
    per_patient = {}
    if privacy is not None and privacy.dp_unit == "record" and result.plan:
        records = result.largest_patient
        if records is not None and epsilon_lifetime is not None:
            epsilon, delta = group_epsilon(epsilon_lifetime, privacy.delta, records)
            per_patient = {
                "largest_patient_records": records,
                "epsilon_per_patient": epsilon,
                "delta_per_patient": delta,
            }
    if privacy is not None and privacy.noise == "distributed" and result.plan:
        # What this run spent per unit if no other hospital of its rounds added its share.
        alone = [(z / math.sqrt(privacy.noise_hospitals), q, n) for z, q, n in result.history]
        per_patient |= {
            "noise": "distributed",
            "noise_hospitals": privacy.noise_hospitals,
            "epsilon_run_if_alone": compose_epsilon(alone, privacy.delta),
        }
    audit.append(
        action,
        run_id=str(run_id),
        round=server_round,
        hospital=who,
        dataset=dataset["dataset"],
        dataset_sha256=dataset["dataset_sha256"],
        global_sha256=global_sha256,
        update_sha256=wire.arrays_to_record(result.delta).object_id,
        num_examples=result.num_examples,
        epsilon_run=result.epsilon_spent,
        epsilon_lifetime=epsilon_lifetime,
        lifetime_epsilon=lifetime_epsilon,
        dp_unit=None if privacy is None else privacy.dp_unit,
        **per_patient,
        **(
            {"init_adapter_sha256": dataset["init_adapter_sha256"]}
            if dataset.get("init_adapter_sha256")
            else {}
        ),
    )


def audit_refusal(
    audit: AuditLog,
    run_id: str,
    server_round: int,
    stage: str,
    exc: Exception,
    *,
    who: str,
    charged: bool,
) -> None:
    """Audit a refusal: the full text for the hospital's staff (only the code goes back). A
    log that cannot be written is logged, never raised: the refusal still goes back.

    Args:
        audit: The hospital's audit log.
        run_id: The run.
        server_round: The round.
        stage: "train" or "evaluate" (or a SecAgg+ stage).
        exc: The refusal.
        who: The hospital.
        charged: Whether a reservation this request made stays charged.
    """
    code = exc.reason.code if isinstance(exc, FedwardError) else "error.internal"
    try:
        audit.append(
            "refusal",
            run_id=str(run_id),
            round=server_round,
            stage=stage,
            hospital=who,
            error=type(exc).__name__,
            code=code,
            charged=charged,
            reason=str(exc),
        )
    except (OSError, DataError) as audit_error:
        log.error("%s: cannot write the audit log: %s", who, audit_error)


def finite_values(metrics: dict[str, float]) -> dict[str, float | None]:
    """The metrics with NaN and infinities as None (JSON has no NaN).

    Args:
        metrics: Metric name -> value.

    Returns:
        The same names, finite values or None.
    """
    return {key: float(value) if np.isfinite(value) else None for key, value in metrics.items()}
