"""A hospital's local training: Opacus DP-SGD on the adapter only, and evaluation.

Reads like Opacus' own examples: build the model, optimizer and loader; make them private; train.
The noise is calibrated once per run so that a hospital taking part in every round spends at most
the run's target epsilon; the accountant history arrives from the caller (ledger or node state)
and a request that would overshoot the target is refused before the first step.

Patient-level DP (`dp_unit = "patient"`; Levy et al. 2021, Chua et al. 2024) changes three
things and nothing else: the Poisson loader samples patients, not records; a sampled patient
brings at most `max_records_per_patient` of its records (a fresh random subset each step); and
the per-record gradients of each patient are added up into one row before Opacus clips, so
Opacus clips, sums and noises one vector per patient (`_BatchStep._patient_rows`). The sum is of
the records' unclipped gradients: it is the gradient of the patient's own loss, clipped once as
one unit, which is all the sensitivity bound needs (docs/privacy.md).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedward.client.prefix_cache import cached_training
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
from fedward.common.config import LocalRun, PrivacySpec, TaskSpec, TrainingSpec
from fedward.common.data import EncodedDataset, length_groups, pad_batch
from fedward.common.errors import ConfigError, PrivacyBudgetExceeded
from fedward.common.model import get_adapter_arrays, set_adapter_arrays

log = logging.getLogger(__name__)

#: Told each stage of a hospital's round as it starts ("encoding", "epoch 2/3"): the
#: simulation's progress bar, or a deployed hospital's own log (client/app.py).
Progress = Callable[[str], None]

# The fixed cost of one more forward and backward pass, in padded tokens: `length_groups` splits
# a batch only where the padding it saves outweighs it (bench/results/train_throughput.md).
MICRO_BATCH_OVERHEAD_TOKENS = 256
#: Examples per forward pass when predicting.
PREDICT_BATCH = 64


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


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; nothing on CPU (where the model trains in float32)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def check_budget(
    history: list[HistoryEntry],
    plan: DPPlan,
    lifetime_epsilon: float,
    delta: float,
    who: str,
    unit: str = "record",
) -> float:
    """Projected epsilon after `plan`; `PrivacyBudgetExceeded` before any step if over budget.

    The run's target allows the noise search's tolerance; the lifetime budget of a data set
    is the ledger's to enforce (`PrivacyLedger.check_budget`).
    """
    projected = projected_epsilon(history, plan, delta)
    if projected > lifetime_epsilon * (1 + 1e-3):
        spent = compose_epsilon(history, delta)
        raise PrivacyBudgetExceeded(
            f"{who}: training refused before any step: epsilon spent {spent:.3f} per {unit}, "
            "this round "
            f"would bring it to {projected:.3f}, over the limit {lifetime_epsilon:g} "
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
    `plan` is the round's DP plan as the budget gate reserved it (`Site.check_budget`, on the
    units this trains on: patients when `dataset.units` is set); left out, it is computed here
    (benchmarks, tests).

    Args:
        model: The PEFT model from `build_model`, its adapter trainable.
        dataset: This hospital's encoded training examples (with their patients under
            patient-level DP).
        config: The run's config (its spec and this machine's local settings).
        global_arrays: The global adapter this round starts from (`get_adapter_arrays`).
        history: Accountant history of this run's earlier rounds on this data set.
        pad_id: The tokenizer's padding id.
        who: The hospital's name, for log lines and refusals.
        plan: The round's DP plan; None computes it from `config` (under DP).
        on_progress: Told each stage as it starts ("caching the frozen prefix", "epoch 2/3"):
            the simulation's progress bar, a deployed hospital's own log.

    Returns:
        The update (new minus global, clipped to `secagg_clip`), the example count, the mean
        training loss, the epsilon spent so far in the run and the history including this round.
    """
    device = pick_device(config.local.device)
    set_adapter_arrays(model, global_arrays)
    model.to(device).train()
    torch.manual_seed(config.spec.training.seed + len(history))
    if not config.spec.privacy.dp:
        plan = None
    elif plan is None:
        plan = plan_dp(config.spec, privacy_units(config.spec.privacy, dataset))
    if plan is not None:
        privacy = config.spec.privacy
        check_budget(history, plan, privacy.target_epsilon, privacy.delta, who, privacy.dp_unit)

    optimizer = make_optimizer(model, config.spec.training, config.spec.head_lr)
    pad_to = config.spec.task.max_length if config.spec.training.padding == "max_length" else None
    # DP noise and Poisson sampling must be unpredictable to everyone else: the run's seed is
    # public (it is in the run config), so under DP they draw from a generator seeded by the OS,
    # unless a simulation asked for seeded noise (`noise_seed`: reproducible, not private).
    noise_seed = simulation_noise_seed(config, who, len(history))
    secret = (
        torch.Generator().manual_seed(secrets.randbits(63) if noise_seed is None else noise_seed)
        if plan is not None
        else None
    )
    # The frozen-prefix cache (client/prefix_cache.py) swaps in the top of the network and the
    # cached states; sampling, clipping and noise are the same either way. The loader draws
    # example indices; `make_batch` turns a micro-batch of them into padded tensors.
    cached = cached_training(model, dataset, config, pad_id, who, device, on_progress)
    if cached is not None:
        train_module, make_batch, inputs_name = cached.top, cached.batch, "hidden_states"
    else:
        train_module, inputs_name = model, "input_ids"

        def make_batch(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return pad_batch([dataset[i] for i in indices], pad_id, pad_to)

    # Under patient-level DP the loader samples patients; the step brings in their records.
    by_patient = plan is not None and config.spec.privacy.per_patient
    if by_patient:
        privacy_units(config.spec.privacy, dataset)  # refuses a patient-level run without patients
    members = dataset.unit_members() if by_patient else None
    loader = DataLoader(
        _ExampleIndices(len(members) if by_patient else len(dataset)),
        batch_size=config.spec.training.batch_size,
        shuffle=True,
        collate_fn=_collate_indices,
        generator=secret,
    )
    private = plan is not None
    if private:
        train_module, optimizer, loader = make_private(
            train_module,
            optimizer,
            loader,
            plan,
            history,
            config.spec.privacy,
            config.spec.training,
            len(members) if by_patient else len(dataset),
            device,
            noise_seed,
        )
    step = _BatchStep(
        module=train_module,
        optimizer=optimizer,
        make_batch=make_batch,
        inputs_name=inputs_name,
        lengths=[len(ids) for ids in dataset.input_ids],
        bucketing=config.local.length_bucketing and pad_to is None,
        outside=_outside_tag_id(config.spec.training, config.spec.task),
        outside_weight=config.spec.training.outside_tag_weight,
        private=private,
        device=device,
        members=members,
        max_records=config.spec.privacy.max_records_per_patient,
        generator=secret,
    )
    losses = []
    try:
        epochs = config.spec.training.local_epochs
        for epoch in range(1, epochs + 1):
            if on_progress is not None:
                on_progress(f"epoch {epoch}/{epochs}")
            for (indices,) in loader:
                loss = step(indices.tolist())
                if loss is not None:
                    losses.append(loss)
    finally:
        if private:
            opacus_seam.remove_hooks(train_module)  # the cached model is reused clean

    new_arrays = get_adapter_arrays(model)
    clip = config.spec.secagg.secagg_clip
    delta = {
        name: np.clip(new_arrays[name] - global_arrays[name], -clip, clip).astype(np.float32)
        for name in global_arrays
    }
    new_history = list(history)
    epsilon = None
    if plan is not None:
        # Account the planned steps (not the drawn batches): conservative and reproducible.
        new_history.append(plan.as_history_entry())
        epsilon = compose_epsilon(new_history, config.spec.privacy.delta)
    train_loss = float(np.mean(losses)) if losses else float("nan")
    log.info(
        "%s trained %d examples: loss %.4f, epsilon %s", who, len(dataset), train_loss, epsilon
    )
    return TrainResult(delta, len(dataset), train_loss, epsilon, plan, new_history)


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
    is drawn from the OS unless a simulation passes `noise_seed` (`simulation_noise_seed`)."""
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
    make_batch: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
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
            per_patient = _PatientSums(max(row_units) + 1)
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


class _PatientSums:
    """Per-patient sums of Opacus's per-record gradients (`grad_sample`) over a batch's
    micro-batches: one row per sampled patient, which Opacus then clips as one unit.

    The rows are the sums of the records' *unclipped* gradients, i.e. the gradient of the
    patient's summed loss; clipping that sum to `max_grad_norm` bounds what one patient can move
    the update, whatever its number of records (sensitivity one clipped row, as for a record).
    """

    def __init__(self, patients: int) -> None:
        self.patients = patients
        self.sums: dict[int, torch.Tensor] = {}

    def add(self, optimizer, row_patients: list[int]) -> None:
        """Add the current `grad_sample` rows into the rows of their patients."""
        for number, param in enumerate(optimizer.params):
            rows = opacus_seam.per_record_rows(optimizer, param)
            target = torch.tensor(row_patients, device=rows.device)
            if number not in self.sums:
                shape = (self.patients, *rows.shape[1:])
                self.sums[number] = torch.zeros(shape, dtype=rows.dtype, device=rows.device)
            self.sums[number].index_add_(0, target, rows)

    def hand_over(self, optimizer) -> None:
        """Put the per-patient rows where Opacus reads per-sample gradients."""
        for number, param in enumerate(optimizer.params):
            opacus_seam.hand_over_rows(param, self.sums[number])


def _outside_tag_id(training: TrainingSpec, task: TaskSpec) -> int | None:
    """The O tag's label id when the run weighs its loss (`outside_tag_weight` below 1)."""
    if training.outside_tag_weight == 1.0:
        return None
    if not task.labels or "O" not in task.labels:
        raise ConfigError(
            f"outside_tag_weight {training.outside_tag_weight:g} needs the run's labels, with 'O'"
        )
    return task.labels.index("O")


def weighted_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, outside_id: int, outside_weight: float
) -> torch.Tensor:
    """Token cross-entropy with the O tag's terms weighted by `outside_weight`, averaged over
    the labelled tokens (-100 is unlabelled), as the plain loss is: weight 1 gives the plain
    loss, and a smaller weight only shrinks the O tokens' share of each sentence's gradient."""
    labels = labels.reshape(-1)
    per_token = torch.nn.functional.cross_entropy(
        logits.float().reshape(labels.numel(), -1), labels, ignore_index=-100, reduction="none"
    )
    weights = torch.where(labels == outside_id, outside_weight, 1.0)
    return (per_token * weights).sum() / (labels != -100).sum().clamp(min=1)


def _micro_batch_indices(indices: list[int], lengths: list[int]) -> list[list[int]]:
    """`indices` split into groups of similar length (`length_groups`)."""
    groups = length_groups([lengths[i] for i in indices], MICRO_BATCH_OVERHEAD_TOKENS)
    return [[indices[position] for position in group] for group in groups]


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


def _noise_generator(device: torch.device, seed: int | None = None) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed + 1)
    return generator


def simulation_noise_seed(config: LocalRun, who: str, rounds_before: int) -> int | None:
    """The seed of this hospital's DP noise and sampling in this round when a simulation asked
    for seeded noise (`seeded_dp_noise`), else None: the OS draws them.

    Only a simulation's `RunConfig` carries the option; a deployed hospital holds a `LocalRun`
    (the spec it received and its own settings), so nothing a coordinator sends can seed it."""
    simulation = getattr(config, "simulation", None)
    if simulation is None or not simulation.seeded_dp_noise:
        return None
    text = f"dp-noise:{config.spec.training.seed}:{who}:{rounds_before}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 2


def evaluate(
    model: torch.nn.Module,
    dataset: EncodedDataset,
    config: LocalRun,
    arrays: dict[str, np.ndarray],
    pad_id: int,
    labels: list[str],
) -> dict[str, float]:
    """Loss and task metrics of the adapter `arrays` on `dataset`."""
    loss, true_ids, pred_ids = predict(model, dataset, config, arrays, pad_id)
    metrics = {"loss": loss, "num_examples": float(len(true_ids))}
    metrics.update(config.spec.task.definition.metrics(true_ids, pred_ids, labels))
    return metrics


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset: EncodedDataset,
    config: LocalRun,
    arrays: dict[str, np.ndarray],
    pad_id: int,
    who: str | None = None,
) -> tuple[float, list, list]:
    """Mean loss, true label ids and predicted label ids of the adapter `arrays` on `dataset`.

    With `who` (the hospital's name) the frozen prefix runs once per run on these examples too
    (`client/prefix_cache.py`, kept as "<who>:validation"): a run evaluates the same validation
    notes every round, and the encoder's forward pass was most of a round's evaluation."""
    device = pick_device(config.local.device)
    set_adapter_arrays(model, arrays)
    model.to(device).eval()
    cached = None
    if who is not None:
        cached = cached_training(model, dataset, config, pad_id, f"{who}:validation", device)
    total_loss, total = 0.0, 0
    true_ids: list = []
    pred_ids: list = []
    for start in range(0, len(dataset), PREDICT_BATCH):
        indices = list(range(start, min(start + PREDICT_BATCH, len(dataset))))
        if cached is not None:
            hidden, attention_mask, label_ids = cached.batch(indices)
            module, inputs = cached.top, {"hidden_states": hidden.to(device)}
        else:
            input_ids, attention_mask, label_ids = pad_batch([dataset[i] for i in indices], pad_id)
            module, inputs = model, {"input_ids": input_ids.to(device)}
        output = module(
            **inputs, attention_mask=attention_mask.to(device), labels=label_ids.to(device)
        )
        total_loss += float(output.loss) * len(indices)
        total += len(indices)
        predictions = output.logits.float().argmax(dim=-1).cpu()
        true_ids.extend(label_ids.tolist())
        pred_ids.extend(predictions.tolist())
    return total_loss / max(total, 1), true_ids, pred_ids
