"""An evaluation is a release: admitted before any record is read, charged, then noised.

A coordinator that could score the global model on a hospital's validation notes as often as it
liked would learn about those notes for free. So an evaluation is refused unless the policy
allows it, for a round this data set trained in (or only the final one), once a round, per
record, and within the budget -- all judged before any record is read -- and it is charged to
the ledger before the data is read (a refusal after that keeps the charge). Its metrics leave
as noised counts (Gaussian mechanism, client/privacy/release.py).
"""

from __future__ import annotations

import numpy as np

from fedward.client.policy import SitePolicy
from fedward.client.privacy.accounting import calibrate_noise
from fedward.client.privacy.ledger import LedgerEntry, PrivacyLedger
from fedward.client.privacy.release import (
    Predictions,
    counts,
    metrics_from_counts,
    noised,
    sensitivity,
)
from fedward.client.trainer import DPPlan
from fedward.common.config import PrivacySpec
from fedward.common.errors import PolicyError, PrivacyBudgetExceeded
from fedward.common.protocol.reasons import Reason

#: Ledger key suffix of a run's released evaluations (their rounds, apart from trained rounds).
EVALUATION_KEY = "-evaluation"  # ledger rows of released evaluations: <run id>-evaluation
#: The round of an evaluate-only run's one evaluation: the starting adapter, before any round.
START_ROUND = 0
#: Ledger key suffix of an evaluate-only run's evaluation (kept there as round 1 of 1).
START_EVALUATION_KEY = "-start-evaluation"


def ledger_round(run_id: str, server_round: int, rounds: int) -> tuple[str, int, int]:
    """Where an evaluation is charged in the ledger: (key, round, rounds).

    Example:
        >>> ledger_round("run-a", 2, 3), ledger_round("run-a", START_ROUND, 3)
        (('run-a-evaluation', 2, 3), ('run-a-start-evaluation', 1, 1))
    """
    if server_round == START_ROUND:
        return run_id + START_EVALUATION_KEY, 1, 1
    return run_id + EVALUATION_KEY, server_round, rounds


def evaluated_start(ledger: PrivacyLedger, run_id: str) -> bool:
    """Whether this data set evaluated the run's starting adapter alone (an evaluate-only run,
    charged or reserved): such a run trains nothing here."""
    key = run_id + START_EVALUATION_KEY
    return any(entry.run_id == key for entry in ledger.entries)


def evaluation_plan(policy: SitePolicy) -> DPPlan:
    """The one Gaussian release of an evaluation, at the policy's evaluation epsilon.

    Args:
        policy: The site policy (`evaluation_epsilon`, `max_delta`).

    Returns:
        A plan of one step at sample rate 1.
    """
    noise = calibrate_noise(policy.evaluation_epsilon, policy.max_delta, 1.0, 1)
    return DPPlan(noise, 1.0, 1)


def _refusal(
    who: str, run_id: str, server_round: int, code: str, why: str, **params
) -> PolicyError:
    return PolicyError(
        f"hospital {who}: evaluation of run {run_id} round {server_round} refused: {why}",
        reason=Reason(code, params),
    )


def check_evaluation_allowed(
    policy: SitePolicy,
    pinned: SitePolicy,
    privacy: PrivacySpec,
    rounds: int,
    run_id: str,
    server_round: int,
    who: str,
) -> None:
    """Refuse, from the policy and the spec alone, an evaluation the policy does not allow, one
    per patient, or one of a round the run does not have (round 0, `START_ROUND`: the starting
    adapter alone, only where the policy has `evaluate_starting_adapter`).

    Args:
        policy: The site policy.
        pinned: The policy as pinned for this hospital (`pins.pinned_policy`: its unit).
        privacy: The run's privacy group (its unit).
        rounds: The run's rounds.
        run_id: The run.
        server_round: The round to evaluate.
        who: The hospital, for messages.

    Raises:
        PolicyError: `evaluation.not_allowed`, `evaluation.patient_unit`,
            `evaluation.start_not_allowed` or `evaluation.round_out_of_range`.
    """
    if not policy.allow_evaluation:
        raise _refusal(
            who,
            run_id,
            server_round,
            "evaluation.not_allowed",
            "the site policy has allow_evaluation false",
        )
    if privacy.dp_unit == "patient" or pinned.dp_unit == "patient":
        # The released counts are noised for one record; a patient moves them by up to its
        # number of records, and the ledger never mixes units.
        raise _refusal(
            who,
            run_id,
            server_round,
            "evaluation.patient_unit",
            "released metrics are protected per record only",
        )
    if server_round == START_ROUND and not policy.evaluate_starting_adapter:
        raise _refusal(
            who,
            run_id,
            server_round,
            "evaluation.start_not_allowed",
            "the site policy has evaluate_starting_adapter false (no evaluate-only runs)",
        )
    if not START_ROUND <= server_round <= rounds:
        raise _refusal(
            who,
            run_id,
            server_round,
            "evaluation.round_out_of_range",
            f"the run has rounds 1..{rounds} (0: evaluate-only)",
            round=server_round,
            rounds=rounds,
        )


def check_evaluation_round(
    policy: SitePolicy, ledger: PrivacyLedger, run_id: str, server_round: int, rounds: int, who: str
) -> None:
    """Refuse, from the ledger, an evaluation of a round this data set did not train (or not the
    final one, as the policy says), or a second one of a round.

    Args:
        policy: The site policy (`evaluate_rounds`).
        ledger: The data set's ledger (which rounds it trained and evaluated).
        run_id: The run.
        server_round: The round to evaluate.
        rounds: The run's rounds.
        who: The hospital, for messages.

    Raises:
        PolicyError: `evaluation.not_final`, `evaluation.round_not_trained` or
            `evaluation.repeated`.
    """
    trained = ledger.rounds_recorded(run_id)
    if policy.evaluate_rounds == "final" and server_round != rounds:
        raise _refusal(
            who,
            run_id,
            server_round,
            "evaluation.not_final",
            "only the final round is evaluated",
            rounds=rounds,
        )
    took_part = bool(trained) if policy.evaluate_rounds == "final" else server_round in trained
    if not took_part:
        raise _refusal(
            who,
            run_id,
            server_round,
            "evaluation.round_not_trained",
            "this data set did not train in it",
            round=server_round,
        )
    if server_round in ledger.rounds_recorded(run_id + EVALUATION_KEY):
        raise _refusal(
            who,
            run_id,
            server_round,
            "evaluation.repeated",
            "already evaluated",
            round=server_round,
        )


def charge_evaluation(
    ledger: PrivacyLedger,
    policy: SitePolicy,
    run_id: str,
    server_round: int,
    rounds: int,
    data_sha256: str | None,
    who: str,
) -> tuple[str, int]:
    """Charge the evaluation now, before any record is read: check and charge in one locked
    step, so that two racing requests cannot both pass; a refusal from here on (the vocabulary,
    the labels) keeps the charge, so its answer is not free either.

    Args:
        ledger: The data set's ledger.
        policy: The site policy (its budget and evaluation epsilon).
        run_id: The run.
        server_round: The round evaluated.
        rounds: The run's rounds.
        data_sha256: The data file's hash, for the entry.
        who: The hospital, for messages.

    Returns:
        The reservation made: (ledger key, round).

    Raises:
        PrivacyBudgetExceeded: `evaluation.budget`.
        PolicyError: `evaluation.repeated` (a racing request won), or `ledger.unit_mixed`.
    """
    key, entry_round, entry_rounds = ledger_round(run_id, server_round, rounds)
    try:
        ledger.reserve(
            key,
            entry_round,
            entry_rounds,
            evaluation_plan(policy),
            policy.max_delta,
            policy.lifetime_epsilon,
            data_sha256,
            epsilon_bound=policy.evaluation_epsilon,
            bound_per="entry",
        )
    except PrivacyBudgetExceeded as exc:
        raise PrivacyBudgetExceeded(
            f"hospital {who}: evaluation refused: {exc}", reason=Reason("evaluation.budget")
        ) from None
    except PolicyError as exc:
        if exc.reason.code == "ledger.unit_mixed":
            raise
        raise PolicyError(
            f"hospital {who}: evaluation refused: {exc}",
            reason=Reason("evaluation.repeated", {"round": server_round}),
        ) from None
    return key, entry_round


def confirm_and_noise(
    ledger: PrivacyLedger,
    policy: SitePolicy,
    run_id: str,
    server_round: int,
    predictions: Predictions,
    data_sha256: str | None,
) -> tuple[LedgerEntry, dict[str, float]]:
    """Confirm the charge made at admission, then noise the counts: the metrics that may leave
    (Gaussian mechanism at the policy's evaluation_epsilon and max_delta).

    Args:
        ledger: The data set's ledger.
        policy: The site policy.
        run_id: The run.
        server_round: The round evaluated.
        predictions: The model's predictions on the validation split.
        data_sha256: The data file's hash, for the entry.

    Returns:
        (the confirmed ledger entry, the released metrics).
    """
    plan = evaluation_plan(policy)
    key, entry_round, _ = ledger_round(run_id, server_round, server_round)
    entry = ledger.confirm(key, entry_round, plan, policy.max_delta, data_sha256)
    std = plan.noise_multiplier * sensitivity(predictions.task)
    released = metrics_from_counts(
        predictions.task,
        noised(counts(predictions), std, np.random.default_rng()),
        len(predictions.labels),
    )
    return entry, released
