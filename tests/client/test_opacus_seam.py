"""What fedward relies on from Opacus's internals (client/privacy/opacus_seam.py), pinned: an
Opacus upgrade that changes one of them fails here, by name, not inside a training run."""

from __future__ import annotations

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant

from fedward.client.privacy import opacus_seam

SEED = 7


def _private(noise_multiplier: float, batch_size: int = 4):
    torch.manual_seed(SEED)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randint(0, 2, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    engine = PrivacyEngine(accountant="rdp")
    module, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(SEED),
    )
    return engine, module, optimizer


def _backward(module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    loss = torch.nn.functional.cross_entropy(module(inputs), targets)
    loss.backward()


def test_a_continued_accountant_spends_as_if_it_had_taken_the_steps():
    engine = PrivacyEngine(accountant="rdp")
    opacus_seam.continue_accountant(engine, [(1.1, 0.02, 300), (0.9, 0.05, 40)])
    stepped = RDPAccountant()
    for noise, rate, steps in [(1.1, 0.02, 300), (0.9, 0.05, 40)]:
        for _ in range(steps):
            stepped.step(noise_multiplier=noise, sample_rate=rate)
    assert engine.accountant.get_epsilon(1e-5) == pytest.approx(stepped.get_epsilon(1e-5))
    assert engine.accountant.get_epsilon(1e-5) > 0


def test_per_record_rows_are_each_records_own_gradient():
    _, module, optimizer = _private(noise_multiplier=1.0)
    inputs, targets = torch.randn(3, 3), torch.tensor([0, 1, 1])
    _backward(module, inputs, targets)
    weight = next(iter(optimizer.params))
    rows = opacus_seam.per_record_rows(optimizer, weight)
    assert rows.shape == (3, *weight.shape)
    one = torch.nn.Linear(3, 2)
    one.load_state_dict({k.removeprefix("_module."): v for k, v in module.state_dict().items()})
    # of the mean loss over 3 records, each row is that record's own whole gradient (Opacus
    # undoes the mean), which the patient sums add up as they are
    torch.nn.functional.cross_entropy(one(inputs[1:2]), targets[1:2]).backward()
    assert torch.allclose(rows[1], one.weight.grad, atol=1e-6)
    assert not torch.allclose(rows[0], one.weight.grad, atol=1e-6)


def test_rows_handed_over_are_the_units_opacus_clips():
    _, module, optimizer = _private(noise_multiplier=0.0)
    _backward(module, torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    for param in optimizer.params:
        rows = torch.zeros((2, *param.shape))
        rows[0] = 10.0  # one unit far above the clipping norm, one at zero
        opacus_seam.hand_over_rows(param, rows)
    before = [param.detach().clone() for param in optimizer.params]
    optimizer.step()
    moved = sum(float(((b - p.detach()) ** 2).sum()) for b, p in zip(before, optimizer.params))
    # two units, the first clipped to norm 1, summed and divided by the expected batch size 4
    assert moved**0.5 == pytest.approx(1.0 / 4, rel=1e-4)


def test_an_empty_batch_step_is_noise_alone_and_moves_the_model():
    _, _, optimizer = _private(noise_multiplier=1.0)
    before = [param.detach().clone() for param in optimizer.params]
    opacus_seam.noise_only_step(optimizer)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, optimizer.params))
    _, _, optimizer = _private(noise_multiplier=0.0)
    before = [param.detach().clone() for param in optimizer.params]
    opacus_seam.noise_only_step(optimizer)
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, optimizer.params))


def test_removing_the_hooks_stops_per_record_gradients():
    _, module, optimizer = _private(noise_multiplier=1.0)
    opacus_seam.remove_hooks(module)
    optimizer.zero_grad(set_to_none=True)
    _backward(module, torch.randn(2, 3), torch.tensor([0, 1]))
    assert all(getattr(param, "grad_sample", None) is None for param in optimizer.params)
