"""DP-SGD arithmetic: calibrating the noise, and the epsilon of an accountant history.

One module for the numbers both the trainer (how much noise a run needs) and the privacy ledger
(how much a data set has spent over all runs) rely on, so the two can never disagree on how
rounds compose. Everything here is pure: no file, no model, no state beyond a cache of the noise
search. Opacus's RDP accountant does the arithmetic; it is imported when first needed, so that
reading a ledger does not pay for importing Opacus until an epsilon is computed.

An accountant history is a list of (noise_multiplier, sample_rate, steps), the form Opacus keeps
in `RDPAccountant.history`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedward.common.errors import ConfigError

if TYPE_CHECKING:
    from fedward.common.config import PrivacySpec, TrainingSpec
    from fedward.common.data import EncodedDataset

#: One accountant history entry: (noise_multiplier, sample_rate, steps), as Opacus keeps it.
HistoryEntry = tuple[float, float, int]

#: How close to the target the noise search stops (Opacus's `epsilon_tolerance`).
EPSILON_TOLERANCE = 0.005


@dataclass(frozen=True)
class DPPlan:
    """The DP-SGD parameters of one hospital for one round."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_history_entry(self) -> HistoryEntry:
        """This round as an accountant history entry."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def noise_variance(self, max_grad_norm: float, num_train: int) -> float:
        """Variance of the noise on each coordinate of the averaged gradient a step sees
        (the noise on the clipped sum, divided by the expected batch size)."""
        return (self.noise_multiplier * max_grad_norm / (self.sample_rate * num_train)) ** 2


def compose_epsilon(history: Sequence[HistoryEntry], delta: float) -> float:
    """Epsilon of all `history` entries composed with Opacus's RDP accountant, at `delta`.

    An empty history has spent nothing. Consecutive entries with the same noise multiplier and
    sample rate are merged first (RDP is linear in the number of steps, so this is exact, as in
    `RDPAccountant.step`), which keeps a long history fast.
    """
    merged: list[HistoryEntry] = []
    for noise_multiplier, sample_rate, steps in history:
        entry = (float(noise_multiplier), float(sample_rate), int(steps))
        if merged and merged[-1][:2] == entry[:2]:
            merged[-1] = (entry[0], entry[1], merged[-1][2] + entry[2])
        else:
            merged.append(entry)
    if not merged:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = merged
    return float(accountant.get_epsilon(delta=delta))


def projected_epsilon(history: Sequence[HistoryEntry], plan: DPPlan, delta: float) -> float:
    """Epsilon of `history` once the round `plan` is trained too, at `delta`."""
    return compose_epsilon([*history, plan.as_history_entry()], delta)


@functools.lru_cache(maxsize=64)
def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends `epsilon` (at `delta`) over `steps` DP-SGD steps.

    Opacus's search with the RDP accountant, to within `EPSILON_TOLERANCE`. It takes seconds of
    CPU and its answer is the same for every round of a run, so answers are remembered.
    """
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=EPSILON_TOLERANCE,
        )
    )


def plan_rounds(
    epsilon: float,
    delta: float,
    rounds: int,
    local_epochs: int,
    batch_size: int,
    num_train: int,
) -> DPPlan:
    """The plan of each round so that `rounds` rounds together spend at most `epsilon`.

    A round is `local_epochs` passes over `num_train` examples in batches of `batch_size`
    (expected size under Poisson sampling); the noise is calibrated for every round of the run.
    """
    steps_per_epoch = math.ceil(num_train / batch_size)
    sample_rate = 1.0 / steps_per_epoch
    steps = steps_per_epoch * local_epochs
    sigma = calibrate_noise(epsilon, delta, sample_rate, steps * rounds)
    return DPPlan(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)


def privacy_units(privacy: PrivacySpec, dataset: EncodedDataset) -> int:
    """How many units a round samples from `dataset`: its patients under patient-level DP
    (`dp_unit = "patient"`), else its encoded examples.

    Args:
        privacy: The run's privacy group (`dp_unit`).
        dataset: A hospital's encoded training split.

    Returns:
        The number of patients, or of examples.

    Raises:
        ConfigError: a patient-level run on examples that carry no patients.
    """
    if privacy.dp_unit != "patient":
        return len(dataset)
    if dataset.units is None:
        raise ConfigError("patient-level DP needs the patient of each example (none were given)")
    return dataset.num_units


def group_epsilon(epsilon: float, delta: float, group: int) -> tuple[float, float]:
    """What (epsilon, delta)-DP for one record means for `group` records of one person:
    (k epsilon, k e^((k-1) epsilon) delta), the group-privacy bound (Dwork and Roth, Theorem
    2.2 and its approximate form). The delta can exceed 1: then there is no bound at all."""
    k = max(int(group), 1)
    return k * epsilon, k * math.exp(min((k - 1) * epsilon, 700.0)) * delta


def plan_dp(privacy: PrivacySpec, training: TrainingSpec, rounds: int, num_train: int) -> DPPlan:
    """The round plan of a run for `num_train` units (records, or patients under patient-level
    DP: `privacy_units`): all of the run's rounds together stay within its target epsilon
    (`plan_rounds`); `batch_size` is the expected number of units a step samples.

    With distributed noise a round is one step at the privacy group's `noise_sample_rate`,
    whatever the number of units (`plan_distributed`).

    Args:
        privacy: The run's privacy group (target epsilon and delta, the kind of noise).
        training: The run's training group (local epochs and batch size: the steps a round
            takes).
        rounds: The run's rounds (`federation.rounds`).
        num_train: The units a round samples from (`privacy_units`).

    Returns:
        The noise multiplier, sample rate and steps of one round.
    """
    if privacy.noise == "distributed":
        return plan_distributed(privacy, rounds)
    return plan_rounds(
        privacy.target_epsilon,
        privacy.delta,
        rounds,
        training.local_epochs,
        training.batch_size,
        num_train,
    )


def plan_distributed(privacy: PrivacySpec, rounds: int) -> DPPlan:
    """A distributed-noise round: one noisy gradient sum (one step) at the privacy group's
    sample rate, with the noise multiplier that spends the run's target over its `rounds`.
    Every input is in the spec, so every hospital of the run plans the same noise: a
    hospital's share only adds up to the full noise if the others add theirs at the same
    multiplier."""
    sigma = calibrate_noise(
        privacy.target_epsilon, privacy.delta, privacy.noise_sample_rate, rounds
    )
    return DPPlan(noise_multiplier=sigma, sample_rate=privacy.noise_sample_rate, steps=1)


def honest_noise_multiplier(plan: DPPlan, honest: int, trusted: int) -> float:
    """The noise multiplier the secure sum carries when `honest` hospitals of the round add
    their 1/`trusted` share of the variance (the others, colluding, add none): sqrt(honest /
    trusted) times the plan's. At `honest` >= `trusted` this is the plan's or more."""
    return plan.noise_multiplier * math.sqrt(max(honest, 0) / trusted)


def distributed_epsilon(
    privacy: PrivacySpec, run_rounds: int, honest: int, rounds: int | None = None
) -> float:
    """What a patient of one hospital gets from a distributed-noise run when only `honest`
    hospitals of every round (itself included) add their share: `rounds` of the run's
    `run_rounds` (default: all) composed at `honest_noise_multiplier`. With `honest` >= t it is
    at most the target; with 1 (every other hospital of its cohort colludes) it is the
    hospital's own share alone. docs/privacy.md tabulates it."""
    plan = plan_distributed(privacy, run_rounds)
    sigma = honest_noise_multiplier(
        plan, min(honest, privacy.noise_hospitals), privacy.noise_hospitals
    )
    steps = run_rounds if rounds is None else rounds
    return compose_epsilon([(sigma, plan.sample_rate, steps)], privacy.delta)
