"""A hospital's distributed-noise round: one noisy, clipped gradient sum, in integers (DP-FedSGD).

With `noise = "distributed"` (issue 39) the hospital does not train locally. It samples each of
its units (patients, or records) with the spec's `noise_sample_rate`, computes each sampled
unit's gradient at the global adapter (a patient's: the sum of its records' gradients, at most
`max_records_per_patient` of them), clips it to `max_grad_norm`, scales and rounds it into
SecAgg+'s integer field and adds it up (`common/secagg/distributed_noise.py`). It then adds its
share of the noise: a discrete Gaussian with 1/t of the variance the round's plan needs, t being
the run's `noise_hospitals`. That vector is masked and only the sum over the round's hospitals is
unmasked; the coordinator divides it by the noisy count it carries and takes the step.

Why not the usual local DP-SGD with a share of the noise at every step: several local steps,
each with partial noise, do not add up to a Gaussian mechanism on the secure sum; one noisy sum
per round, with the step taken on the sum, does (docs/privacy.md).

The noise and the sampling draw from the operating system (a simulation that asked for seeded
noise draws from its seed): the run's seed is public.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

import numpy as np
import torch

from fedward.client.prefix_cache import CacheOptions, cached_training
from fedward.client.privacy.accounting import (
    DPPlan,
    HistoryEntry,
    compose_epsilon,
    plan_distributed,
    privacy_units,
)
from fedward.client.privacy.dp_sgd import simulation_noise_seed
from fedward.client.tag_loss import outside_tag_id
from fedward.client.trainer import (
    MakeBatch,
    Progress,
    TrainResult,
    batch_source,
    check_budget,
    pick_device,
)
from fedward.common.config import LocalRun, SimulationSettings
from fedward.common.data import EncodedDataset
from fedward.common.errors import ConfigError
from fedward.common.model import set_adapter_arrays
from fedward.common.secagg.distributed_noise import (
    check_no_wrap,
    check_noise_scale,
    encode_units,
    local_noise_std,
    sample_discrete_gaussian,
)

log = logging.getLogger(__name__)

#: The name of the one array a distributed-noise update holds (int64, length d + 1).
NOISY_SUM = "noisy_sum"
#: Units whose per-record gradients are computed together (memory: records x d floats).
UNITS_PER_CHUNK = 64


def noisy_gradient_sum(
    model: torch.nn.Module,
    dataset: EncodedDataset,
    config: LocalRun,
    global_arrays: dict[str, np.ndarray],
    pad_id: int,
    who: str = "hospital",
    noise_seed: int | None = None,
) -> tuple[np.ndarray, int, float]:
    """This hospital's share of a distributed-noise round.

    Args:
        model: The PEFT model from `build_model`; its trainable tensors are the adapter.
        dataset: This hospital's encoded training examples (with their patients under
            patient-level DP).
        config: The run's config; its privacy group says the unit, the clip and t.
        global_arrays: The global adapter the gradients are taken at.
        pad_id: The tokenizer's padding id.
        who: The hospital's name, for log lines.
        noise_seed: Seeds sampling, rounding and noise (simulation's seeded noise only).

    Returns:
        The int64 vector (length d + 1: the scaled gradient sum, then the count coordinate) with
        this hospital's share of the noise; the number of units sampled (stays here); and the
        mean loss of the sampled records (stays here).
    """
    privacy = config.spec.privacy
    plan = plan_distributed(config.spec.privacy, config.spec.federation.rounds)
    device = pick_device(config.local.device)
    set_adapter_arrays(model, global_arrays)
    model.to(device).train()
    rng = np.random.default_rng(secrets.randbits(128) if noise_seed is None else noise_seed)
    privacy_units(privacy, dataset)  # refuses a patient-level run on records without patients
    by_patient = privacy.dp_unit == "patient"
    members = dataset.unit_members() if by_patient else [[i] for i in range(len(dataset))]
    sampled = np.flatnonzero(rng.random(len(members)) < plan.sample_rate).tolist()

    options = CacheOptions.of(config)
    cached = cached_training(model, dataset, options, pad_id, who, device)
    module, make_batch, inputs_name = batch_source(model, dataset, cached, pad_id, options.pad_to)

    # In the order of the adapter's arrays, which is the order the coordinator reads the sum in.
    by_name = dict(model.named_parameters())
    params = [by_name[name] for name in global_arrays]
    dimension = sum(p.numel() for p in params)
    std = local_noise_std(plan.noise_multiplier, dimension, privacy.noise_hospitals)
    check_noise_scale(std, privacy.noise_hospitals)
    check_no_wrap(len(members), dimension, std, hospitals=1000)
    outside_id = outside_tag_id(config.spec.training, config.spec.task)
    outside = None if outside_id is None else (outside_id, config.spec.training.outside_tag_weight)

    from opacus import GradSampleModule  # public API: per-record gradients, nothing private

    grad_module = GradSampleModule(module, batch_first=True, loss_reduction="sum")
    try:
        total, losses = _clipped_unit_sum(
            grad_module,
            params,
            lambda chunk: _records(chunk, members, privacy.max_records_per_patient, rng),
            make_batch,
            sampled,
            (inputs_name, outside, device),
            privacy.max_grad_norm,
            rng,
        )
    finally:
        grad_module.remove_hooks()
        for p in params:
            p.grad = None
    if not colludes(config.simulation_settings(), who):
        total += sample_discrete_gaussian(std, dimension + 1, rng)
    loss = float(np.mean(losses)) if losses else float("nan")
    log.info(
        "%s: distributed-noise round over %d of %d units (noise share std %.1f units)",
        who,
        len(sampled),
        len(members),
        std,
    )
    return total, len(sampled), loss


def _clipped_unit_sum(
    grad_module: torch.nn.Module,
    params: list[torch.nn.Parameter],
    records_of: Callable[[list[int]], tuple[list[int], list[int]]],
    make_batch: MakeBatch,
    sampled: list[int],
    forward: tuple[str, tuple[int, float] | None, torch.device],
    max_grad_norm: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[float]]:
    """The sum over the `sampled` units of each unit's gradient clipped to `max_grad_norm`,
    encoded as integers (`encode_units`: d values, then the count coordinate), computed
    `UNITS_PER_CHUNK` units at a time; and each chunk's mean loss. `records_of` gives a chunk's
    records and each record's unit; `forward` is the inputs' name, the O tag's weighting and
    the device."""
    inputs_name, outside, device = forward
    total = np.zeros(sum(p.numel() for p in params) + 1, dtype=np.int64)
    losses: list[float] = []
    for start in range(0, len(sampled), UNITS_PER_CHUNK):
        chunk = sampled[start : start + UNITS_PER_CHUNK]
        rows, row_units = records_of(chunk)
        per_unit, loss = _unit_gradients(
            grad_module,
            params,
            make_batch(rows),
            row_units,
            len(chunk),
            inputs_name,
            outside,
            device,
        )
        losses.append(loss)
        norms = per_unit.norm(dim=1, keepdim=True)
        clipped = per_unit * (max_grad_norm / norms.clamp(min=max_grad_norm))
        total += encode_units(clipped.double().numpy(), max_grad_norm, rng)
    return total, losses


def distributed_update(
    model: torch.nn.Module,
    dataset: EncodedDataset,
    config: LocalRun,
    global_arrays: dict[str, np.ndarray],
    history: list[HistoryEntry],
    pad_id: int,
    who: str,
    plan: DPPlan,
    on_progress: Progress | None = None,
) -> TrainResult:
    """`noisy_gradient_sum` as the round's update (`TrainResult`), with the accountant history
    including this round: `plan` (the budget gate's reservation) at the full noise multiplier,
    which is what a patient gets while at least t hospitals of the round are honest.
    `on_progress` is told "summing noisy gradients" as the one pass starts."""
    planned = plan_distributed(config.spec.privacy, config.spec.federation.rounds)
    if plan.as_history_entry() != planned.as_history_entry():
        raise ConfigError(f"{who}: the reserved plan is not the run's distributed-noise plan")
    check_budget(
        history,
        plan,
        config.spec.privacy.target_epsilon,
        config.spec.privacy.delta,
        who,
        config.spec.privacy.dp_unit,
    )
    noise_seed = simulation_noise_seed(
        config.simulation_settings(), config.spec.training.seed, who, len(history)
    )
    if on_progress is not None:
        on_progress("summing noisy gradients")
    vector, _, loss = noisy_gradient_sum(
        model, dataset, config, global_arrays, pad_id, who, noise_seed
    )
    new_history = [*history, plan.as_history_entry()]
    epsilon = compose_epsilon(new_history, config.spec.privacy.delta)
    return TrainResult({NOISY_SUM: vector}, len(dataset), loss, epsilon, plan, new_history)


def colludes(simulation: SimulationSettings | None, who: str) -> bool:
    """Whether `who` is one of a simulation's colluding hospitals (`colluding_hospitals`: the
    last ones), which add no share of the noise: a privacy audit's dishonest hospitals. A
    deployed hospital has no simulation settings (`LocalRun.simulation_settings()` is None), so
    nothing a coordinator sends can make it skip its share."""
    if simulation is None or not simulation.colluding_hospitals:
        return False
    first = simulation.hospitals - simulation.colluding_hospitals
    return who in {f"hospital-{number}" for number in range(first, simulation.hospitals)}


def _records(
    units: list[int], members: list[list[int]], max_records: int, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """The records the sampled `units` bring (at most `max_records` each, a random subset) and,
    for each record, its unit's position in `units`."""
    rows: list[int] = []
    row_units: list[int] = []
    for position, unit in enumerate(units):
        records = members[unit]
        if len(records) > max_records:
            records = sorted(rng.choice(records, size=max_records, replace=False).tolist())
        rows.extend(records)
        row_units.extend([position] * len(records))
    return rows, row_units


def _unit_gradients(
    grad_module, params, batch, row_units, units, inputs_name, outside, device
) -> tuple[torch.Tensor, float]:
    """Each unit's gradient (the sum of its records' gradients), flattened: units x d."""
    inputs, attention_mask, labels = batch
    labels = labels.to(device)
    output = grad_module(
        **{inputs_name: inputs.to(device)}, attention_mask=attention_mask.to(device)
    )
    per_record = record_losses(output.logits, labels, outside)
    per_record.sum().backward()
    rows = torch.cat([p.grad_sample.reshape(len(row_units), -1) for p in params], dim=1)
    per_unit = torch.zeros((units, rows.shape[1]), dtype=torch.float32)
    per_unit.index_add_(0, torch.tensor(row_units), rows.float().cpu())
    for p in params:
        p.grad_sample = None
        p.grad = None
    return per_unit, float(per_record.mean().detach())


def record_losses(
    logits: torch.Tensor, labels: torch.Tensor, outside: tuple[int, float] | None = None
) -> torch.Tensor:
    """Each record's loss: cross-entropy of its label, or the mean over its labelled tokens
    (-100 is unlabelled) for token labels, with the O tag weighted by `outside` = (id, weight)."""
    if labels.dim() == 1:
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    per_token = torch.nn.functional.cross_entropy(
        logits.float().reshape(labels.numel(), -1),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).reshape(labels.shape)
    labelled = (labels != -100).float()
    weights = labelled
    if outside is not None:
        weights = torch.where(labels == outside[0], outside[1], 1.0) * labelled
    return (per_token * weights).sum(dim=1) / labelled.sum(dim=1).clamp(min=1)
