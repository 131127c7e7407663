"""DP-AdamBC (`optimizer = "adam_bc"`, client/privacy/dp_adam.py): Adam with the DP noise's variance
taken out of its second moment. Without noise it must be Adam; under DP it must take Adam's
step on a coordinate that carries signal where plain Adam's step shrinks to DP-SGD's; and the
trainer must hand it the noise variance of the round's own DP plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_training import config, data, tokenizer, train

from fedward.client import trainer
from fedward.client.privacy.dp_adam import BiasCorrectedAdam

pytestmark = pytest.mark.usefixtures("fresh_prefix_caches")


def test_without_noise_it_takes_adams_steps():
    generator = torch.Generator().manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(20, generator=generator))
    adam = torch.nn.Parameter(ours.detach().clone())
    corrected = BiasCorrectedAdam([ours], lr=0.01, floor=1e-24)
    plain = torch.optim.Adam([adam], lr=0.01, eps=1e-12)
    for _ in range(25):
        gradient = torch.randn(20, generator=generator)
        ours.grad, adam.grad = gradient.clone(), gradient.clone()
        corrected.step()
        plain.step()
    assert torch.allclose(ours, adam, atol=1e-5)


def _mean_step(optimizer_class, noise_std: float, signal: float, **options) -> float:
    """Mean step, over the last 100 of 400, on one coordinate whose gradient is `signal` plus
    Gaussian noise of `noise_std` (DP's noise on the averaged gradient)."""
    generator = torch.Generator().manual_seed(1)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = optimizer_class([parameter], lr=0.01, **options)
    positions = []
    for _ in range(400):
        parameter.grad = signal + noise_std * torch.randn(1, generator=generator)
        optimizer.step()
        positions.append(float(parameter.detach()))
    return -(positions[-1] - positions[-101]) / 100


def test_under_dp_noise_a_coordinate_with_signal_gets_adams_step_back():
    noise_std, signal = 1e-2, 3e-3  # the noise three times the signal, as under DP
    plain = _mean_step(torch.optim.Adam, noise_std, signal)
    corrected = _mean_step(BiasCorrectedAdam, noise_std, signal, noise_variance=noise_std**2)
    # Without noise Adam steps by about its learning rate (0.01) on a steady gradient. Plain
    # Adam divides by the noise's size as well: about lr x signal / noise.
    assert plain < 0.35 * 0.01
    # Corrected, the denominator is the signal's own size again, up to the estimate's spread.
    assert 0.7 * 0.01 < corrected < 1.5 * 0.01


def test_the_trainer_gives_it_the_noise_variance_of_the_rounds_plan(
    four_layer_model_dir, monkeypatch
):
    settings = config(four_layer_model_dir, dp=True, optimizer="adam_bc", max_grad_norm=0.5)
    tok = tokenizer(four_layer_model_dir)
    dataset = data(settings, tok)
    built = []
    original = trainer.BiasCorrectedAdam

    def recording(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(trainer, "BiasCorrectedAdam", recording)
    _, start, result = train(settings, dataset, tok)

    plan = result.plan
    expected_batch = plan.sample_rate * len(dataset)
    assert built[0].noise_variance == pytest.approx(
        (plan.noise_multiplier * 0.5 / expected_batch) ** 2, rel=0.02
    )
    assert (
        0 < result.epsilon_spent <= settings.spec.privacy.target_epsilon
    )  # accounted as with any optimizer
    moved = [np.abs(result.delta[name]).max() for name in start]
    assert all(np.isfinite(value) for value in moved) and max(moved) > 0
