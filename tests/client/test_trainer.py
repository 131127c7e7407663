"""Tests for the hospital's local DP training (client/trainer.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tiny_training import config as tiny_config
from tiny_training import data as tiny_data
from tiny_training import tokenizer as tiny_tokenizer
from tiny_training import train as tiny_train

from fedward.client import trainer
from fedward.client.privacy import opacus_seam
from fedward.client.privacy.accounting import compose_epsilon as epsilon_of
from fedward.client.trainer import (
    check_budget,
    evaluate,
    plan_dp,
    train_locally,
)
from fedward.common.config import RunConfig
from fedward.common.data import Record, encode_classification
from fedward.common.errors import PrivacyBudgetExceeded
from fedward.common.model import build_model, get_adapter_arrays, load_tokenizer

LABELS = ["migraine", "pneumonia"]
WORDS = {
    "pneumonia": ["cough", "fever", "sputum", "crackles", "consolidation"],
    "migraine": ["headache", "aura", "photophobia", "throbbing", "nausea"],
}


def _toy_records(count: int = 64, seed: int = 0) -> list[Record]:
    """Two labels written with clearly different words: learnable in a few epochs."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        label = LABELS[i % 2]
        records.append(Record(" ".join(rng.choice(WORDS[label]) for _ in range(6)), label))
    return records


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    config = RunConfig(
        model=tiny_model_dir,
        hospitals=2,
        rounds=1,
        local_epochs=10,
        batch_size=16,
        learning_rate=0.1,
        target_epsilon=50.0,
        max_length=16,
        device="cpu",
    )
    tokenizer = load_tokenizer(config.spec.model.name)
    label_to_id = {label: i for i, label in enumerate(LABELS)}
    dataset = encode_classification(
        tokenizer, _toy_records(), label_to_id, config.spec.task.max_length
    )
    return config, tokenizer, dataset


def _train(config, tokenizer, dataset, history=()):
    model = build_model(config.spec, len(LABELS))
    start = get_adapter_arrays(model)
    result = train_locally(
        model, dataset, config, start, list(history), tokenizer.pad_token_id, who="hospital-a"
    )
    return model, start, result


def test_dp_training_learns_and_stays_within_the_budget(setup):
    config, tokenizer, dataset = setup
    model, start, result = _train(config, tokenizer, dataset)
    trained = {name: start[name] + result.delta[name] for name in start}

    before = evaluate(
        model, dataset, config.spec.task.definition, start, tokenizer.pad_token_id, LABELS
    )
    after = evaluate(
        model, dataset, config.spec.task.definition, trained, tokenizer.pad_token_id, LABELS
    )
    # DP noise is drawn from the OS, so runs differ; these margins hold with room to spare.
    assert after["loss"] < before["loss"] - 0.2
    assert after["accuracy"] >= 0.9

    assert result.num_examples == len(dataset)
    assert np.isfinite(result.train_loss)
    assert 0 < result.epsilon_spent <= config.spec.privacy.target_epsilon * (1 + 1e-3)
    assert result.history == [
        (result.plan.noise_multiplier, result.plan.sample_rate, result.plan.steps)
    ]
    assert result.plan.noise_multiplier > 0


def test_the_update_is_clipped_to_the_secagg_range(setup):
    config, tokenizer, dataset = setup
    tight = config.updated(**{"secagg_clip": 1e-3, "local_epochs": 1})
    _, start, result = _train(tight, tokenizer, dataset)
    assert set(result.delta) == set(start)
    assert all(value.dtype == np.float32 for value in result.delta.values())
    peaks = [float(np.abs(value).max()) for value in result.delta.values()]
    assert max(peaks) <= np.float32(1e-3)
    assert max(peaks) == pytest.approx(1e-3)  # training moved at least one value that far


def test_without_dp_there_is_no_epsilon(setup):
    config, tokenizer, dataset = setup
    no_dp = config.updated(**{"dp": False, "local_epochs": 1})
    _, _, result = _train(no_dp, tokenizer, dataset)
    assert result.epsilon_spent is None and result.plan is None and result.history == []
    assert any(float(np.abs(value).max()) > 0 for value in result.delta.values())


def test_an_exhausted_budget_is_refused_before_any_step(setup):
    config, tokenizer, dataset = setup
    one_epoch = config.updated(**{"local_epochs": 1})
    plan = plan_dp(
        one_epoch.spec.privacy,
        one_epoch.spec.training,
        one_epoch.spec.federation.rounds,
        len(dataset),
    )
    # Earlier runs already spent the whole budget: the same training, twice over.
    history = [(plan.noise_multiplier, plan.sample_rate, plan.steps * 2)]
    assert epsilon_of(history, one_epoch.spec.privacy.delta) > one_epoch.spec.privacy.target_epsilon

    model = build_model(one_epoch.spec, len(LABELS))
    start = get_adapter_arrays(model)
    with pytest.raises(PrivacyBudgetExceeded) as caught:
        train_locally(
            model, dataset, one_epoch, start, history, tokenizer.pad_token_id, who="hospital-a"
        )
    message = str(caught.value)
    assert message.startswith("hospital-a: training refused before any step")
    assert "over the limit 50" in message
    after = get_adapter_arrays(model)
    assert all(np.array_equal(start[name], after[name]) for name in start)


def test_a_second_run_continues_the_composition(setup):
    config, tokenizer, dataset = setup
    one_epoch = config.updated(**{"local_epochs": 1, "rounds": 2})
    _, _, first = _train(one_epoch, tokenizer, dataset)
    _, _, second = _train(one_epoch, tokenizer, dataset, history=first.history)
    assert len(second.history) == 2
    assert (
        first.epsilon_spent
        < second.epsilon_spent
        <= one_epoch.spec.privacy.target_epsilon * (1 + 1e-3)
    )
    with pytest.raises(PrivacyBudgetExceeded):
        _train(one_epoch, tokenizer, dataset, history=second.history)


@pytest.mark.parametrize(
    ("epsilon", "rounds", "local_epochs", "num_train"),
    [(8.0, 3, 1, 320), (1.0, 10, 2, 100), (50.0, 1, 5, 64), (3.0, 20, 1, 1000)],
)
def test_plan_dp_keeps_all_rounds_within_the_target(epsilon, rounds, local_epochs, num_train):
    config = RunConfig(
        target_epsilon=epsilon, rounds=rounds, local_epochs=local_epochs, batch_size=32
    )
    plan = plan_dp(
        config.spec.privacy, config.spec.training, config.spec.federation.rounds, num_train
    )
    assert plan.steps == -(-num_train // 32) * local_epochs
    history = [(plan.noise_multiplier, plan.sample_rate, plan.steps)] * rounds
    spent = epsilon_of(history, config.spec.privacy.delta)
    assert spent <= epsilon * (1 + 1e-3)
    assert spent > epsilon * 0.9  # not wastefully noisy either
    assert check_budget(
        history[:-1], plan, epsilon, config.spec.privacy.delta, "h"
    ) == pytest.approx(spent)


def test_epsilon_of_nothing_is_zero():
    assert epsilon_of([], 1e-5) == 0.0


def test_an_empty_poisson_batch_still_takes_a_step_of_noise(four_layer_model_dir, monkeypatch):
    """A curious reader of the update must not learn that some step sampled no record: with an
    expected batch of 1 of 40 notes, about a third of the Poisson batches are empty, and each
    must still move the adapter by noise, as every other step does."""
    from opacus.optimizers.optimizer import DPOptimizer

    settings = tiny_config(four_layer_model_dir, dp=True, batch_size=1, local_epochs=1)
    tok = tiny_tokenizer(four_layer_model_dir)
    dataset = tiny_data(settings, tok)
    batches: list[int] = []
    steps: list[int] = []
    original_step = DPOptimizer.step

    def counting_step(self, closure=None):
        steps.append(1)
        return original_step(self, closure)

    original_batch = trainer._micro_batch_indices

    def counting_batch(indices, lengths):
        batches.append(len(indices))
        return original_batch(indices, lengths)

    monkeypatch.setattr(DPOptimizer, "step", counting_step)
    monkeypatch.setattr(trainer, "_micro_batch_indices", counting_batch)
    moved: list[bool] = []
    original_noise_step = opacus_seam.noise_only_step

    def watching(optimizer):
        before = [p.detach().clone() for p in optimizer.params]
        original_noise_step(optimizer)
        moved.append(all(not p.equal(b) for p, b in zip(optimizer.params, before, strict=True)))

    monkeypatch.setattr(opacus_seam, "noise_only_step", watching)
    tiny_train(settings, dataset, tok)

    assert (
        len(batches) == len(dataset) // settings.spec.training.batch_size
    )  # Poisson batches of an epoch
    empty = batches.count(0)
    assert empty > 0, "no empty batch was drawn (chance about 1e-6)"
    assert len(moved) == empty and all(moved)
    assert len(steps) == len(batches) - empty  # and the others their usual step each


def test_seeded_dp_noise_makes_a_simulated_round_reproducible_and_only_then(setup):
    config, tokenizer, dataset = setup
    config = config.updated(local_epochs=1)
    seeded = config.updated(seeded_dp_noise=True)

    def update(config, who="hospital-a"):
        model = build_model(config.spec, len(LABELS))
        start = {name: np.full_like(a, 0.01) for name, a in get_adapter_arrays(model).items()}
        result = train_locally(model, dataset, config, start, [], tokenizer.pad_token_id, who=who)
        return np.concatenate([result.delta[name].ravel() for name in sorted(result.delta)])

    first, second = update(seeded), update(seeded)
    assert np.array_equal(first, second)  # same seed, same settings: the same update
    assert not np.array_equal(first, update(seeded, who="hospital-b"))  # each its own noise
    assert not np.array_equal(update(config), update(config))  # default: the OS's noise
    # a hospital's own config (spec + local settings) cannot carry the option at all
    from fedward.common.config import LocalRun

    own = LocalRun(spec=config.spec)
    assert own.simulation_settings() is None
    assert trainer.simulation_noise_seed(own.simulation_settings(), 0, "hospital-a", 0) is None
