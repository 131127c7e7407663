"""A hospital's local training: Opacus DP-SGD on the adapter only, and evaluation.

Reads like Opacus' own examples: build the model, optimizer and loader; make them private; train.
The noise is calibrated once per run so that a hospital taking part in every round spends at most
the run's target epsilon; the accountant history arrives from the caller (ledger or node state)
and a request that would overshoot the target is refused before the first step.

Patient-level DP (`dp_unit = "patient"`; Levy et al. 2021, Chua et al. 2024) changes three
things and nothing else: the Poisson loader samples patients, not records; a sampled patient
brings at most `max_records_per_patient` of its records (a fresh random subset each step); and
the per-record gradients of each patient are added up into one row before Opacus clips, so
Opacus clips, sums and noises one vector per patient (`_BatchStep._patient_rows`,
client/privacy/patient_rows.py). The sum is of the records' unclipped gradients: it is the
gradient of the patient's own loss, clipped once as one unit, which is all the sensitivity bound
needs (docs/privacy.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedward.client.device import autocast_for, pick_device
from fedward.client.prediction import evaluate, predict
from fedward.client.prefix_cache import CachedTraining, CacheOptions, cached_training
from fedward.client.privacy import opacus_seam
from fedward.client.privacy.accounting import (
    DPPlan,
    HistoryEntry,
    compose_epsilon,
    plan_dp,
    privacy_units,
    projected_epsilon,
)
from fedward.client.privacy.dp_adam import BiasCorrectedAdam
from fedward.client.privacy.dp_sgd import (
    make_private,
    private_sampling,
    secret_generator,
    simulation_noise_seed,
)
from fedward.client.privacy.patient_rows import PatientSums
from fedward.client.tag_loss import outside_tag_id, weighted_token_loss
from fedward.common.config import FederationSpec, LocalRun, PrivacySpec, TrainingSpec
from fedward.common.data import EncodedDataset, length_groups, pad_batch
from fedward.common.errors import PrivacyBudgetExceeded
from fedward.common.model import get_adapter_arrays, set_adapter_arrays

log = logging.getLogger(__name__)

#: Scoring (client/prediction.py), the device (client/device.py) and the DP-SGD set-up
#: (client/privacy/dp_sgd.py) lived here; their old import paths still work.
__all__ = [
    "DPPlan",
    "HistoryEntry",
    "Progress",
    "TrainResult",
    "autocast_for",
    "check_budget",
    "evaluate",
    "make_optimizer",
    "make_private",
    "pick_device",
    "predict",
    "simulation_noise_seed",
    "train_locally",
    "weighted_token_loss",
]

#: Told each stage of a hospital's round as it starts ("encoding", "epoch 2/3"): the
#: simulation's progress bar, or a deployed hospital's own log (client/app.py).
Progress = Callable[[str], None]
#: Turns a micro-batch of example indices into its padded (inputs, attention mask, labels).
MakeBatch = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

# The fixed cost of one more forward and backward pass, in padded tokens: `length_groups` splits
# a batch only where the padding it saves outweighs it (bench/results/train_throughput.md).
MICRO_BATCH_OVERHEAD_TOKENS = 256


@dataclass
class TrainResult:
    """What local training hands back; only `delta` (and counts/metrics) may leave the hospital."""

    delta: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    epsilon_spent: float | None  # over all recorded training of this data set; None without DP
    plan: DPPlan | None
    history: list[HistoryEntry] = field(default_factory=list)
    #: Most records of one patient among the training examples (None: no patient column); for
    #: the hospital's own audit log and the simulation report, never sent by a deployed site.
    largest_patient: int | None = None


def check_budget(
    history: list[HistoryEntry],
    plan: DPPlan,
    target_epsilon: float,
    delta: float,
    who: str,
    unit: str = "record",
) -> float:
    """Projected epsilon after `plan`; `PrivacyBudgetExceeded` before any step if over budget.

    The run's target allows the noise search's tolerance; the lifetime budget of a data set
    is the ledger's to enforce (`PrivacyLedger.check_budget`).

    Args:
        history: The accountant history before this round.
        plan: The round's DP plan.
        target_epsilon: The run's target epsilon, the limit: a projection above it by more
            than 0.1% is refused.
        delta: The run's delta.
        who: The hospital's name, for the message.
        unit: What epsilon protects ("record" or "patient"), for the message.

    Returns:
        The epsilon `history` and `plan` compose to, at `delta`.

    Raises:
        PrivacyBudgetExceeded: the projected epsilon is over the limit.
    """
    projected = projected_epsilon(history, plan, delta)
    if projected > target_epsilon * (1 + 1e-3):
        spent = compose_epsilon(history, delta)
        raise PrivacyBudgetExceeded(
            f"{who}: training refused before any step: epsilon spent {spent:.3f} per {unit}, "
            "this round "
            f"would bring it to {projected:.3f}, over the limit {target_epsilon:g} "
            f"(delta {delta:g}); start a new run with a larger budget or fewer rounds"
        )
    return projected


def train_locally(
    model: torch.nn.Module,
    dataset: EncodedDataset,
    config: LocalRun,
    global_arrays: dict[str, np.ndarray],
    history: list[HistoryEntry],
    pad_id: int,
    who: str = "hospital",
    plan: DPPlan | None = None,
    on_progress: Progress | None = None,
) -> TrainResult:
    """Train the adapter from `global_arrays` on `dataset`; return the clipped delta.

    Only the trainable tensors change. Under DP the Opacus accountant starts from `history`
    (earlier rounds and runs of this data set) and the returned history includes this round.

    Args:
        model: The PEFT model from `build_model`, its adapter trainable.
        dataset: This hospital's encoded training examples (with their patients under
            patient-level DP).
        config: The run's config (its spec and this machine's local settings).
        global_arrays: The global adapter this round starts from (`get_adapter_arrays`).
        history: Accountant history of this run's earlier rounds on this data set.
        pad_id: The tokenizer's padding id.
        who: The hospital's name, for log lines and refusals.
        plan: The round's DP plan as the budget gate reserved it on the units trained
            (`Site.check_budget`); None plans it here (benchmarks, tests).
        on_progress: Told each stage as it starts ("caching the frozen prefix", "epoch 2/3"):
            the simulation's progress bar, a deployed hospital's own log.

    Returns:
        The update (new minus global, clipped to `secagg_clip`), the example count, the mean
        training loss, the epsilon spent so far in the run and the history including this round.
    """
    device = pick_device(config.local.device)
    privacy, training = config.spec.privacy, config.spec.training
    set_adapter_arrays(model, global_arrays)
    model.to(device).train()
    torch.manual_seed(training.seed + len(history))
    plan = _round_plan(privacy, training, config.spec.federation, dataset, plan, history, who)
    optimizer = make_optimizer(model, training, config.spec.head_lr)
    simulation, options = config.simulation_settings(), CacheOptions.of(config)
    noise_seed = simulation_noise_seed(simulation, training.seed, who, len(history))
    secret = secret_generator(noise_seed) if plan is not None else None
    cached = cached_training(model, dataset, options, pad_id, who, device, on_progress)
    pad_to = options.pad_to
    module, make_batch, inputs_name = batch_source(model, dataset, cached, pad_id, pad_to)
    module, optimizer, loader, members = private_sampling(
        module, optimizer, dataset, plan, history, privacy, training, device, noise_seed, secret
    )
    private = plan is not None
    step = _BatchStep(
        module=module,
        optimizer=optimizer,
        make_batch=make_batch,
        inputs_name=inputs_name,
        lengths=[len(ids) for ids in dataset.input_ids],
        bucketing=config.local.length_bucketing and pad_to is None,
        outside=outside_tag_id(training, config.spec.task),
        outside_weight=training.outside_tag_weight,
        private=private,
        device=device,
        members=members,
        max_records=privacy.max_records_per_patient,
        generator=secret,
    )
    try:
        losses = _run_epochs(step, loader, training.local_epochs, on_progress)
    finally:
        if private:
            opacus_seam.remove_hooks(module)  # the cached model is reused clean

    delta = clipped_delta(get_adapter_arrays(model), global_arrays, config.spec.secagg.secagg_clip)
    new_history, epsilon = _accounted(history, plan, privacy.delta)
    train_loss = float(np.mean(losses)) if losses else float("nan")
    log.info(
        "%s trained %d examples: loss %.4f, epsilon %s", who, len(dataset), train_loss, epsilon
    )
    return TrainResult(delta, len(dataset), train_loss, epsilon, plan, new_history)


def _round_plan(
    privacy: PrivacySpec,
    training: TrainingSpec,
    federation: FederationSpec,
    dataset: EncodedDataset,
    plan: DPPlan | None,
    history: list[HistoryEntry],
    who: str,
) -> DPPlan | None:
    """The round's DP plan (None without DP): the one the budget gate reserved, else planned
    here on the units trained; `PrivacyBudgetExceeded` before any step if it overshoots the
    run's target."""
    if not privacy.dp:
        return None
    if plan is None:
        plan = plan_dp(privacy, training, federation.rounds, privacy_units(privacy, dataset))
    check_budget(history, plan, privacy.target_epsilon, privacy.delta, who, privacy.dp_unit)
    return plan


def batch_source(
    model: torch.nn.Module,
    dataset: EncodedDataset,
    cached: CachedTraining | None,
    pad_id: int,
    pad_to: int | None,
) -> tuple[torch.nn.Module, MakeBatch, str]:
    """The module that trains, what turns a micro-batch of example indices into its padded
    tensors, and the name of its inputs: the top of the network on the cached prefix states
    (client/prefix_cache.py), else the whole model on token ids. Sampling, clipping and noise
    are the same either way.

    Args:
        model: The PEFT model.
        dataset: The encoded examples a micro-batch's indices point into.
        cached: The cached prefix states (`cached_training`), or None.
        pad_id: The tokenizer's padding id.
        pad_to: The width to pad each batch to (`padding = "max_length"`), or None: its
            longest example.

    Returns:
        `(module, make_batch, inputs_name)`: "hidden_states" with the cache, else
        "input_ids".
    """
    if cached is not None:
        return cached.top, cached.batch, "hidden_states"

    def make_batch(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return pad_batch([dataset[i] for i in indices], pad_id, pad_to)

    return model, make_batch, "input_ids"


def _accounted(
    history: list[HistoryEntry], plan: DPPlan | None, delta: float
) -> tuple[list[HistoryEntry], float | None]:
    """The history including this round and the epsilon it composes to (None without DP).
    The planned steps are accounted, not the drawn batches: conservative and reproducible."""
    if plan is None:
        return list(history), None
    new_history = [*history, plan.as_history_entry()]
    return new_history, compose_epsilon(new_history, delta)


def _run_epochs(
    step: _BatchStep, loader: DataLoader, epochs: int, on_progress: Progress | None
) -> list[float]:
    """`epochs` passes of `step` over the batches `loader` draws; each non-empty batch's loss."""
    losses = []
    for epoch in range(1, epochs + 1):
        if on_progress is not None:
            on_progress(f"epoch {epoch}/{epochs}")
        for (indices,) in loader:
            loss = step(indices.tolist())
            if loss is not None:
                losses.append(loss)
    return losses


def clipped_delta(
    new_arrays: dict[str, np.ndarray], global_arrays: dict[str, np.ndarray], clip: float
) -> dict[str, np.ndarray]:
    """The update: new minus global for every tensor of the global adapter, each value clipped
    to [-clip, clip] (`secagg_clip`), in float32.

    Args:
        new_arrays: The adapter after training (name -> array); names not in
            `global_arrays` are left out.
        global_arrays: The global adapter the round started from.
        clip: The bound on each value.

    Returns:
        Name -> float32 array of the global adapter's shape.
    """
    return {
        name: np.clip(new_arrays[name] - global_arrays[name], -clip, clip).astype(np.float32)
        for name in global_arrays
    }


def make_optimizer(
    model: torch.nn.Module, training: TrainingSpec, head_lr: float
) -> torch.optim.Optimizer:
    """The run's optimizer over two groups: the task head (new, needs large steps) and the LoRA
    factors (small steps).

    Args:
        model: The PEFT model; its trainable parameters are optimised.
        training: The run's training group (`optimizer`, `learning_rate`).
        head_lr: The task head's learning rate (`RunSpec.head_lr`).

    Returns:
        AdamW, SGD with momentum 0.9, or DP-AdamBC, as `training.optimizer` says.
    """
    head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    lora = [
        p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n
    ]
    groups = [
        {"params": lora, "lr": training.learning_rate},
        {"params": head, "lr": head_lr},
    ]
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    if training.optimizer == "adam_bc":
        return BiasCorrectedAdam(groups)
    return torch.optim.AdamW(groups, weight_decay=0.0)


@dataclass
class _BatchStep:
    """One optimizer step on one (Poisson) batch of example indices, in micro-batches of
    similar length: each micro-batch's per-example gradients are clipped and added up, and
    under DP the noise and the step come once, after the batch's last micro-batch.

    With `members` (patient-level DP) the batch is of patient numbers: each brings at most
    `max_records` of its records, and the per-record gradients of all micro-batches are added
    up per patient before Opacus clips, so the clipped unit is the patient."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    make_batch: MakeBatch
    inputs_name: str
    lengths: list[int]
    bucketing: bool
    outside: int | None  # the O tag's id when NER's loss is class-weighted
    outside_weight: float | None
    private: bool
    device: torch.device
    members: list[list[int]] | None = None  # the records of each patient (patient-level DP)
    max_records: int = 1
    generator: torch.Generator | None = None

    def __call__(self, indices: list[int]) -> float | None:
        """Train on the batch `indices`; its mean loss, or None for an empty batch."""
        row_units = None
        if self.members is not None:
            indices, row_units = self._patient_rows(indices)
        groups = _micro_batch_indices(indices, self.lengths) if self.bucketing else [indices]
        micro_batches = [self.make_batch(group) for group in groups]
        labelled = [int((labels != -100).sum()) for _, _, labels in micro_batches]
        total = sum(labelled)
        if total == 0:  # Poisson sampling can draw an empty batch
            if self.private:
                opacus_seam.noise_only_step(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        batch_loss = 0.0
        steps = [k for k, count in enumerate(labelled) if count > 0]
        per_patient = None
        if row_units is not None:
            position = {index: unit for index, unit in zip(indices, row_units, strict=True)}
            per_patient = PatientSums(max(row_units) + 1)
        for k in steps:
            loss = self._loss(*micro_batches[k])
            # The loss of the whole batch is its mean over labelled positions (one per note;
            # one per token in NER): weigh each micro-batch's mean accordingly. Opacus
            # multiplies a mean loss by the micro-batch's size to get per-example gradients,
            # so under DP the weight also carries batch / micro-batch size.
            weight = labelled[k] / total
            if self.private:
                weight *= len(indices) / len(micro_batches[k][0])
            (loss * weight).backward()
            batch_loss += float(loss.detach()) * labelled[k] / total
            if per_patient is not None:
                # Add this micro-batch's per-record gradients into their patients' rows; Opacus
                # clips those rows (one per patient) at the step.
                per_patient.add(self.optimizer, [position[i] for i in groups[k]])
                self.optimizer.zero_grad(set_to_none=True)
                continue
            if self.private and k != steps[-1]:
                # Clip and add up this micro-batch's per-example gradients; no step yet.
                self.optimizer.signal_skip_step(do_skip=True)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        if per_patient is not None:
            per_patient.hand_over(self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return batch_loss

    def _patient_rows(self, patients: list[int]) -> tuple[list[int], list[int]]:
        """The record indices the sampled `patients` bring (at most `max_records` each, a
        random subset drawn from the secret generator) and, for each, its patient's position
        in the batch."""
        rows: list[int] = []
        row_units: list[int] = []
        for position, patient in enumerate(patients):
            records = self.members[patient]
            if len(records) > self.max_records:
                chosen = torch.randperm(len(records), generator=self.generator)[: self.max_records]
                records = [records[i] for i in sorted(chosen.tolist())]
            rows.extend(records)
            row_units.extend([position] * len(records))
        return rows, row_units

    def _loss(
        self, inputs: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        labels = labels.to(self.device)
        with autocast_for(self.device):
            output = self.module(
                **{self.inputs_name: inputs.to(self.device)},
                attention_mask=attention_mask.to(self.device),
                labels=labels,
            )
        if self.outside is None:
            return output.loss
        return weighted_token_loss(output.logits, labels, self.outside, self.outside_weight)


def _micro_batch_indices(indices: list[int], lengths: list[int]) -> list[list[int]]:
    """`indices` split into groups of similar length (`length_groups`)."""
    groups = length_groups([lengths[i] for i in indices], MICRO_BATCH_OVERHEAD_TOKENS)
    return [[indices[position] for position in group] for group in groups]
