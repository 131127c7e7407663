"""One privacy audit: canaries into one simulated hospital, a federated run, the bound.

The run is the simulation as configured (`simulation/runner.py`: the same ClientApp, trainer,
Opacus, prefix cache and secure aggregation as a deployment), with one difference: hospital
`hospital`'s training data get the included canaries. After every round the audit reads the
global adapter from the run's checkpoint, which is what the coordinator holds; it then scores
every canary with the final adapter and with every round's (scoring.py) and turns the guesses
into the lower bound (bound.py).

The accounted epsilon is the Opacus RDP accountant's for the audited hospital: its round plan
(`plan_dp`, for its training count including the canaries) composed over the rounds it trained
in, in its unit (a record).

Several guess counts and both auditors are tried; each test runs at confidence
1 - (1 - `confidence`) / tests, so that every bound printed holds at `confidence` together
(Bonferroni) and the best of them may be quoted.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedward.client.app import HospitalData
from fedward.client.privacy.accounting import (
    DPPlan,
    compose_epsilon,
    distributed_epsilon,
    plan_dp,
)
from fedward.common.config import (
    FederationSpec,
    PrivacySpec,
    RunConfig,
    SimulationSettings,
    TaskSpec,
)
from fedward.common.data import EncodedDataset, encode_classification
from fedward.common.errors import ConfigError
from fedward.simulation.hospitals import hospital_share, prepare_config, simulated_data
from fedward.simulation.privacy_audit.bound import ceiling, epsilon_lower_bound
from fedward.simulation.privacy_audit.canaries import Canaries, draw_canaries
from fedward.simulation.privacy_audit.scoring import (
    GUESS_FRACTIONS,
    canary_alignments,
    canary_losses,
    count_guesses,
    final_model_scores,
    label_centred,
)

log = logging.getLogger(__name__)

#: The two auditors (scoring.py), in the order they are reported.
AUDITORS = ("final model", "every round")

#: Canaries by default: a ceiling near 5 at 95% with the Bonferroni correction.
DEFAULT_CANARIES = 1000


@dataclass(frozen=True)
class AuditorResult:
    """One auditor's best guess count and what it shows."""

    auditor: str
    guesses: int
    correct: int
    epsilon_lower_bound: float


@dataclass(frozen=True)
class PrivacyAuditResult:
    """What an audit found, beside what the accountant claims.

    Attributes:
        canaries: m, canaries drawn.
        included: How many went into the training data.
        auditors: Each auditor's best result.
        ceiling: The largest bound this audit could have shown (every canary guessed right).
        confidence: Joint confidence of every bound reported.
        delta: The delta of the bounds (the run's).
        accounted_epsilon: The accountant's epsilon for the audited hospital; None without DP.
        hospital: The audited hospital's name.
        unit: The run's DP unit ("record" or "patient"; a canary is a patient of its own).
    """

    canaries: int
    included: int
    auditors: tuple[AuditorResult, ...]
    ceiling: float
    confidence: float
    delta: float
    accounted_epsilon: float | None = None
    hospital: str = ""
    unit: str = "record"

    @property
    def epsilon_lower_bound(self) -> float:
        """The best auditor's bound (all hold together at `confidence`)."""
        return max(result.epsilon_lower_bound for result in self.auditors)

    @property
    def contradicts_accounting(self) -> bool:
        """True when the measured lower bound exceeds the accounted epsilon: a privacy bug."""
        return self.accounted_epsilon is not None and (
            self.epsilon_lower_bound > self.accounted_epsilon
        )


def per_test_confidence(confidence: float, tests: int) -> float:
    """Bonferroni: each of `tests` bounds at this confidence hold together at `confidence`."""
    return 1.0 - (1.0 - confidence) / tests


def judge(
    scores: dict[str, np.ndarray], included: tuple[bool, ...], delta: float, confidence: float
) -> tuple[tuple[AuditorResult, ...], float]:
    """Each auditor's best bound over the guess counts fixed in advance, and the ceiling, all at
    the joint `confidence`."""
    m = len(included)
    sides = sorted({max(1, int(fraction * m)) for fraction in GUESS_FRACTIONS if m >= 2})
    each = per_test_confidence(confidence, max(1, len(scores) * len(sides)))
    results = []
    for auditor, auditor_scores in scores.items():
        best = AuditorResult(auditor, 0, 0, 0.0)
        for per_side in sides:
            guesses, correct = count_guesses(auditor_scores, included, per_side)
            bound = epsilon_lower_bound(m, guesses, correct, delta, each)
            if bound > best.epsilon_lower_bound or best.guesses == 0:
                best = AuditorResult(auditor, guesses, correct, bound)
        results.append(best)
    return tuple(results), ceiling(m, delta, each)


def score_canaries(
    model, canaries: EncodedDataset, round_arrays: list[dict[str, np.ndarray]], pad_id: int
) -> dict[str, np.ndarray]:
    """Both auditors' scores from the global adapters of rounds 0 (initial) .. T.

    Args:
        model: A model built from the run spec (`build_model`), whose adapter is overwritten.
        canaries: The canaries, encoded with the run's tokenizer and labels.
        round_arrays: The global adapter before round 1 and after every round.
        pad_id: The tokenizer's padding id.
    """
    if len(round_arrays) < 2:
        raise ValueError("need the initial adapter and at least one round's")
    initial = canary_losses(model, canaries, round_arrays[0], pad_id)
    final = canary_losses(model, canaries, round_arrays[-1], pad_id)
    every_round = np.zeros(len(canaries))
    for before, after in itertools.pairwise(round_arrays):
        every_round += canary_alignments(model, canaries, before, after, pad_id)
    labels = list(canaries.labels)
    return {
        "final model": label_centred(final_model_scores(initial, final), labels),
        "every round": every_round,
    }


def encode_canaries(canaries: Canaries, tokenizer, labels: list[str], max_length: int):
    """The canaries as the hospital's trainer encodes its notes."""
    label_to_id = {label: i for i, label in enumerate(labels)}
    return encode_classification(tokenizer, list(canaries.records), label_to_id, max_length)


def canary_data_source(canaries: Canaries, hospital: int) -> Callable:
    """A simulation data source (`client.app.DataSource`): each hospital's share, and for
    hospital `hospital` the included canaries added to its training data (not to its
    validation data). Runs in the simulation's workers; it carries only the included canaries."""
    inserted = tuple(canaries.inserted())

    def with_canaries(config: RunConfig, context) -> HospitalData:
        data = simulated_data(config, context)
        if int(context.node_config["partition-id"]) != hospital:
            return data
        return HospitalData(data.name, [*data.train, *inserted], data.val, data.source)

    return with_canaries


def audited_training_count(
    data: HospitalData, privacy: PrivacySpec, inserted: int
) -> tuple[str, int]:
    """The audited hospital's name and the privacy units it trains on (its share plus the
    included canaries: records, or patients under patient-level DP, each canary a patient of its
    own), counted here as the hospital counts them.

    Args:
        data: The audited hospital's share, as its ClientApp reads it (`hospital_share`).
        privacy: The run's privacy group (`dp_unit`).
        inserted: The canaries added to its training data.

    Returns:
        The hospital's name and its count of units.
    """
    if privacy.dp_unit == "patient":
        return data.name, len({record.patient for record in data.train}) + inserted
    return data.name, len(data.train) + inserted


def accounted_epsilon(
    plan: DPPlan | None,
    rounds_trained: int,
    privacy: PrivacySpec,
    federation: FederationSpec,
    simulation: SimulationSettings,
) -> float | None:
    """The accountant's epsilon for `rounds_trained` rounds of the audited hospital's round
    `plan`; None without DP. With colluding hospitals (distributed noise) it is the epsilon
    docs/privacy.md gives for the honest hospitals left in every round (`distributed_epsilon`),
    not the run's target.

    Args:
        plan: The audited hospital's round plan (`plan_dp` for its units: records or
            patients); None without DP.
        rounds_trained: The rounds it trained in.
        privacy: The run's privacy group (`delta`; the noise split for colluders).
        federation: The run's federation group (rounds, and the share of hospitals sampled).
        simulation: The simulated hospitals, and how many of them collude.

    Returns:
        The accounted epsilon, or None without DP.
    """
    if plan is None:
        return None
    colluding = simulation.colluding_hospitals
    if colluding:
        sampled = max(round(federation.fraction * simulation.hospitals), 1)
        return distributed_epsilon(privacy, federation.rounds, sampled - colluding, rounds_trained)
    return compose_epsilon([plan.as_history_entry()] * rounds_trained, privacy.delta)


def _check_audit(
    task: TaskSpec,
    privacy: PrivacySpec,
    simulation: SimulationSettings,
    canaries: int,
    hospital: int,
) -> None:
    """`ConfigError` unless the audit can run: a classification task, an audited hospital of
    the simulation that is not a colluder, at least 2 canaries, colluders only under
    distributed noise."""
    if task.name != "classification":
        raise ConfigError(
            f"field 'task': the privacy audit's canaries are notes with a label; "
            f"'{task.name}' is not audited yet, use task 'classification'"
        )
    if not 0 <= hospital < simulation.hospitals:
        raise ConfigError(
            f"--hospital {hospital}: the simulation has hospitals 0..{simulation.hospitals - 1}"
        )
    if canaries < 2:
        raise ConfigError(f"--canaries {canaries}: the audit needs at least 2 canaries")
    colluding = simulation.colluding_hospitals
    if colluding and privacy.noise != "distributed":
        raise ConfigError(
            "field 'colluding_hospitals': colluders skip their share of distributed noise; "
            "the run's noise is local (pass --noise distributed)"
        )
    if colluding and hospital >= simulation.hospitals - colluding:
        raise ConfigError(
            f"--hospital {hospital} is one of the {colluding} colluding hospitals (the last "
            "ones); audit an honest one"
        )


def run_privacy_audit(
    config: RunConfig,
    canaries: int = DEFAULT_CANARIES,
    hospital: int = 0,
    confidence: float = 0.95,
    seed: int | None = None,
    on_round: Callable[[dict], None] | None = None,
    on_scoring: Callable[[], None] | None = None,
    verbose: bool = False,
) -> PrivacyAuditResult:
    """Run the simulation `config` with `canaries` canaries in hospital `hospital` and audit it.

    Args:
        config: The simulation, as `fedward simulate` takes it (classification only).
        canaries: m, the canaries; each goes into the hospital's data with probability 1/2.
        hospital: Index of the audited hospital.
        confidence: Joint confidence of the bounds.
        seed: None draws the canaries and their inclusion from the operating system.
        on_round: Sees each round's history row (the CLI's progress).
        on_scoring: Called once training is over and scoring starts.
        verbose: Flower's and Ray's logs.

    Returns:
        The bounds, the ceiling and the accounted epsilon.
    """
    from fedward.client.model_cache import cached_tokenizer
    from fedward.common.model import build_model, get_adapter_arrays
    from fedward.server.resume import load_checkpoint
    from fedward.simulation.runner import simulate

    _check_audit(config.spec.task, config.spec.privacy, config.simulation, canaries, hospital)
    config = prepare_config(config)
    labels = config.spec.task.labels
    tokenizer = cached_tokenizer(config.spec.model.name)
    drawn = draw_canaries(tokenizer, labels, canaries, seed)
    share = hospital_share(
        config.spec.task, config.spec.training.seed, config.simulation, config.data_schema, hospital
    )
    name, num_train = audited_training_count(share, config.spec.privacy, len(drawn.inserted()))

    model = build_model(config.spec, len(labels))
    round_arrays = [get_adapter_arrays(model)]
    rounds: list[dict] = []

    def after_round(row: dict) -> None:
        round_arrays.append(load_checkpoint(config.local.out).arrays)
        rounds.append(row)
        if on_round is not None:
            on_round(row)

    simulate(config, after_round, verbose, canary_data_source(drawn, hospital))
    if on_scoring is not None:
        on_scoring()
    encoded = encode_canaries(drawn, tokenizer, labels, config.spec.task.max_length)
    scores = score_canaries(model, encoded, round_arrays, tokenizer.pad_token_id)
    auditors, top = judge(scores, drawn.included, config.spec.privacy.delta, confidence)
    trained = sum(1 for row in rounds if row["hospitals"].get(name, {}).get("trained"))
    spec = config.spec
    plan = None
    if spec.privacy.dp:
        plan = plan_dp(spec.privacy, spec.training, spec.federation.rounds, num_train)
    return PrivacyAuditResult(
        canaries=len(drawn),
        included=sum(drawn.included),
        auditors=auditors,
        ceiling=top,
        confidence=confidence,
        delta=config.spec.privacy.delta,
        accounted_epsilon=accounted_epsilon(
            plan, trained, config.spec.privacy, config.spec.federation, config.simulation
        ),
        hospital=name,
        unit=config.spec.privacy.dp_unit,
    )
