"""One round's DP-SGD set-up, the Opacus way: the module, optimizer and loader the trainer
already has, made private (`make_private`, wrapping `PrivacyEngine.make_private`), with the
loader sampling records or, under patient-level DP, patients (`private_sampling`).

The sampling and the noise draw from generators the operating system seeds: the run's seed is
public (it is in the run config), so nothing derived from it may choose who is sampled or what
noise is added. Only a simulation that asks for seeded noise (`seeded_dp_noise`) gets
reproducible draws (`simulation_noise_seed`), and a deployed hospital never holds that setting.
"""

from __future__ import annotations

import hashlib
import secrets

import torch
from torch.utils.data import DataLoader

from fedward.client.privacy import opacus_seam
from fedward.client.privacy.accounting import DPPlan, HistoryEntry, privacy_units
from fedward.common.config import PrivacySpec, SimulationSettings, TrainingSpec
from fedward.common.data import EncodedDataset

__all__ = ["make_private", "private_sampling", "secret_generator", "simulation_noise_seed"]


def private_sampling(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: EncodedDataset,
    plan: DPPlan | None,
    history: list[HistoryEntry],
    privacy: PrivacySpec,
    training: TrainingSpec,
    device: torch.device,
    noise_seed: int | None,
    secret: torch.Generator | None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader, list[list[int]] | None]:
    """The module, optimizer and loader of example indices, made private under DP (`plan`):
    Opacus's Poisson loader, where under patient-level DP it samples patients instead; and
    then the records of each patient (which the step brings in), else None.

    Args:
        module: The module that trains (the whole model, or the top over cached states).
        optimizer: Its optimizer (`make_optimizer`).
        dataset: The hospital's encoded training examples (with their patients under
            patient-level DP).
        plan: The round's DP plan; None trains without DP (a plain shuffled loader).
        history: The accountant history before this round.
        privacy: The run's privacy group (the unit, the clip).
        training: The run's training group (the batch size, the optimizer).
        device: Where the noise is drawn.
        noise_seed: The noise's seed (simulation only); None draws it from the OS.
        secret: The generator of the loader's sampling (`secret_generator`).

    Returns:
        The module, optimizer and loader to train with (Opacus's under DP), and each patient's
        records when the loader samples patients (else None).

    Raises:
        ConfigError: a patient-level run on examples that carry no patients.
    """
    by_patient = plan is not None and privacy.per_patient
    if by_patient:
        privacy_units(privacy, dataset)  # refuses a patient-level run without patients
    members = dataset.unit_members() if by_patient else None
    units = len(members) if members is not None else len(dataset)
    loader = DataLoader(
        _ExampleIndices(units),
        batch_size=training.batch_size,
        shuffle=True,
        collate_fn=_collate_indices,
        generator=secret,
    )
    if plan is not None:
        module, optimizer, loader = make_private(
            module,
            optimizer,
            loader,
            plan,
            history,
            privacy,
            training,
            units,
            device,
            noise_seed,
        )
    return module, optimizer, loader, members


def make_private(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    plan: DPPlan,
    history: list[HistoryEntry],
    privacy: PrivacySpec,
    training: TrainingSpec,
    num_train: int,
    device: torch.device,
    noise_seed: int | None = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader]:
    """Opacus's private module, optimizer and Poisson loader for `plan`, its accountant
    continuing from `history` (wrap, don't replace: `PrivacyEngine.make_private`).
    `num_train` counts the privacy units the loader samples (records, or patients); the noise
    is drawn from the OS unless a simulation passes `noise_seed` (`simulation_noise_seed`).

    Args:
        module: The module that trains (the whole model, or the top over cached prefix states).
        optimizer: Its optimizer (`make_optimizer`).
        loader: The loader of example (or patient) indices to make Poisson.
        plan: The round's DP plan (its noise multiplier; Opacus samples at 1 / the loader's
            length, as the plan does).
        history: The accountant history before this round.
        privacy: The run's privacy group (`max_grad_norm`).
        training: The run's training group; DP-AdamBC (`optimizer = "adam_bc"`) is told the
            noise variance.
        num_train: The privacy units the loader samples (for DP-AdamBC's noise variance).
        device: Where the noise is drawn.
        noise_seed: The noise's seed (simulation only); None draws it from the OS.

    Returns:
        Opacus's `GradSampleModule`, `DPOptimizer` and Poisson `DataLoader`.
    """
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    opacus_seam.continue_accountant(engine, history)
    module, optimizer, loader = engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        poisson_sampling=True,
        noise_generator=_noise_generator(device, noise_seed),
    )
    if training.optimizer == "adam_bc":
        # The variance DP adds to each coordinate of the averaged gradient Adam sees.
        optimizer.original_optimizer.noise_variance = plan.noise_variance(
            privacy.max_grad_norm, num_train
        )
    return module, optimizer, loader


def simulation_noise_seed(
    simulation: SimulationSettings | None, seed: int, who: str, rounds_before: int
) -> int | None:
    """The seed of this hospital's DP noise and sampling in this round when a simulation asked
    for seeded noise (`seeded_dp_noise`), else None: the OS draws them.

    Only a simulation's `RunConfig` has simulation settings; a deployed hospital holds a
    `LocalRun`, whose `simulation_settings()` is None, so nothing a coordinator sends can seed
    its noise.

    Args:
        simulation: The run's simulation settings (`config.simulation_settings()`), or None.
        seed: The run's seed (`training.seed`).
        who: The hospital's name.
        rounds_before: How many rounds the accountant history already holds.

    Returns:
        A seed in [0, 2**62) drawn from `seed`, `who` and `rounds_before`, or None.
    """
    if simulation is None or not simulation.seeded_dp_noise:
        return None
    text = f"dp-noise:{seed}:{who}:{rounds_before}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 2


def secret_generator(noise_seed: int | None) -> torch.Generator:
    """The generator of Poisson sampling and patients' record subsets under DP.

    DP noise and Poisson sampling must be unpredictable to everyone else: the run's seed is
    public (it is in the run config), so they draw from a generator seeded by the OS, unless a
    simulation asked for seeded noise (`noise_seed`: reproducible, not private).

    Args:
        noise_seed: The simulation's seed (`simulation_noise_seed`); None draws from the OS.

    Returns:
        A CPU generator for the loader's sampling and the record subsets.
    """
    return torch.Generator().manual_seed(secrets.randbits(63) if noise_seed is None else noise_seed)


def _noise_generator(device: torch.device, seed: int | None = None) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed + 1)
    return generator


class _ExampleIndices(torch.utils.data.Dataset):
    """Example positions 0..n-1: the loader samples indices, the trainer builds the tensors."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[int]:
        return (index,)  # a tuple, as Opacus reads the structure of a sample from item 0


def _collate_indices(items: list[tuple[int]]) -> tuple[torch.Tensor]:
    return (torch.tensor([index for (index,) in items], dtype=torch.long),)
