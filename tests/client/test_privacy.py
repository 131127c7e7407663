"""Tests for the DP arithmetic shared by the trainer and the privacy ledger
(client/privacy/accounting.py)."""

from __future__ import annotations

import pytest
from opacus.accountants import RDPAccountant

from fedward.client.privacy.accounting import (
    DPPlan,
    calibrate_noise,
    compose_epsilon,
    plan_rounds,
    projected_epsilon,
)

DELTA = 1e-5


def test_an_empty_history_has_spent_nothing():
    assert compose_epsilon([], DELTA) == 0.0


def test_merging_repeated_rounds_gives_what_opacus_gives_round_by_round():
    rounds = [(1.1, 0.02, 50)] * 4 + [(0.9, 0.05, 20)] * 2
    accountant = RDPAccountant()
    for noise_multiplier, sample_rate, steps in rounds:
        for _ in range(steps):
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    assert compose_epsilon(rounds, DELTA) == pytest.approx(accountant.get_epsilon(DELTA))


def test_a_further_round_always_costs_something():
    history = [(1.0, 0.1, 10)]
    plan = DPPlan(1.0, 0.1, 10)
    projected = projected_epsilon(history, plan, DELTA)
    assert projected == pytest.approx(compose_epsilon([*history, (1.0, 0.1, 10)], DELTA))
    assert projected > compose_epsilon(history, DELTA)


@pytest.mark.parametrize(
    ("epsilon", "rounds", "local_epochs", "num_train"),
    [(8.0, 3, 1, 320), (1.0, 10, 2, 100), (3.0, 20, 1, 1000)],
)
def test_the_planned_rounds_spend_the_target_and_no_more(epsilon, rounds, local_epochs, num_train):
    plan = plan_rounds(epsilon, DELTA, rounds, local_epochs, batch_size=32, num_train=num_train)
    assert plan.steps == -(-num_train // 32) * local_epochs
    assert plan.sample_rate == pytest.approx(1 / -(-num_train // 32))
    spent = compose_epsilon([plan.as_history_entry()] * rounds, DELTA)
    assert epsilon * 0.9 < spent <= epsilon * (1 + 1e-3)


def test_a_smaller_budget_needs_more_noise():
    loose = calibrate_noise(8.0, DELTA, 0.1, 100)
    tight = calibrate_noise(1.0, DELTA, 0.1, 100)
    assert tight > loose > 0
