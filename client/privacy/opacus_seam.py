"""Every place fedward reaches past Opacus's public API, in one module, pinned by a test.

Opacus's `PrivacyEngine.make_private` does DP-SGD for a loop that steps once per batch. The
trainer needs four things it does not offer publicly:

- an accountant that continues from the ledger's history (earlier rounds, earlier runs), where
  Opacus only starts from nothing: its RDP accountant's `history` is set;
- the per-record gradient rows, to add them up per patient before Opacus clips (patient-level
  DP: the clipped unit is the patient), and to hand the sums back where Opacus reads them;
- the step of an empty Poisson batch, noise alone, which Opacus skips (DP-SGD's analysis
  assumes it is taken);
- the model's hooks removed after training, so that the cached model is reused clean.

Opacus may rename these internals in any release; tests/client/test_opacus_seam.py pins what
each one must do, so an upgrade that breaks one fails there, by name, not inside a training run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from opacus import PrivacyEngine
    from opacus.optimizers import DPOptimizer

#: One accountant entry, as the ledger keeps it: (noise multiplier, sample rate, steps).
HistoryEntry = tuple[float, float, int]


def continue_accountant(engine: PrivacyEngine, history: list[HistoryEntry]) -> None:
    """Make the engine's RDP accountant continue from `history`, as if it had taken those steps.

    Args:
        engine: A fresh `PrivacyEngine(accountant="rdp")`.
        history: The accountant entries of the earlier rounds.
    """
    engine.accountant.history = [tuple(entry) for entry in history]


def per_record_rows(optimizer: DPOptimizer, param: torch.Tensor) -> torch.Tensor:
    """The per-record gradient rows of `param` after a backward pass (one row per record).

    Args:
        optimizer: Opacus's DP optimizer.
        param: One of its parameters.

    Returns:
        A tensor of shape (records, *param.shape).
    """
    return optimizer._get_flat_grad_sample(param)


def hand_over_rows(param: torch.Tensor, rows: torch.Tensor) -> None:
    """Put per-unit gradient rows where Opacus's clipping reads them (one row per unit).

    Args:
        param: A parameter of the DP optimizer.
        rows: A tensor of shape (units, *param.shape).
    """
    param.grad_sample = rows


def noise_only_step(optimizer: DPOptimizer) -> None:
    """The step of an empty Poisson batch: Gaussian noise alone, scaled as a batch's would be,
    then the wrapped optimizer's step. Opacus's own step skips an empty batch; skipping it would
    leave the adapter still for that step, which tells whoever sees the update that no record
    was sampled, and with small expected batches that happens often enough (probability about
    e^-batch_size) to exceed delta.

    Args:
        optimizer: Opacus's DP optimizer.
    """
    for param in optimizer.params:
        param.summed_grad = torch.zeros_like(param)
    optimizer.add_noise()
    for param in optimizer.params:
        param.grad /= optimizer.expected_batch_size
    optimizer.original_optimizer.step()


def remove_hooks(module: torch.nn.Module) -> None:
    """Remove the hooks Opacus put on a model for per-record gradients.

    Args:
        module: The `GradSampleModule` `make_private` returned.
    """
    module._close()
