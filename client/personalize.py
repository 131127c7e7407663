"""A hospital's own model: the global adapter fitted to its own notes, kept at home.

A board decides to join a federation by one comparison, on its own validation notes: the model
it could train alone against the one it gets by joining. This module makes both, at the end of
a run, inside the hospital:

- *alone*: trained on the hospital's training notes only, from the fresh adapter, without DP,
  with the recipe a hospital would tune on its own (learning rate and epochs chosen on a
  selection fold of its own training notes, not the DP recipe minus the noise);
- *global*: the federation's final adapter, as received;
- *own*: chosen on the selection fold among the global adapter as is, the global adapter
  fine-tuned on the hospital's notes with a pull towards the global weights (the personal
  objective of Ditto, Li et al. 2021, solved once against the final global model: the loss on
  its own notes plus `pull / 2 * ||own - global||^2`; pull 0 is plain fine-tuning), mixes of
  the alone and global adapters (for the head-only default, the mean of their logits), and the
  alone model, which it stays unless another beats it on the fold by `HomeRecipe.margin`. The
  chosen recipe is then refitted on all its training notes.

The three are scored on the hospital's validation notes, which no model here trained or chose
on. Nothing here is DP and nothing here leaves: the own and alone adapters are trained on the
records without noise and are as sensitive as the records themselves. They are written to the
hospital's own folder (deployment) or scored in the simulation's worker; only the global adapter,
trained by the DP step and masked, ever reaches a message (tests/client/test_personalize.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedward.client.prefix_cache import cached_training
from fedward.client.trainer import autocast_for, pick_device
from fedward.common.config import LocalRun
from fedward.common.data import EncodedDataset, pad_batch
from fedward.common.files.atomic import write_json_atomic
from fedward.common.model import get_adapter_arrays, save_adapter, set_adapter_arrays
from fedward.common.tasks import Task

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
#: Where a run's own models are kept: `<out>/own/<hospital>/` in a simulation, and
#: `<ledger>/own/<data set>/<run id>/` at a deployed hospital (client/site/gates.py).
OWN_FOLDER = "own"
#: Turns the example positions of a batch into (inputs, attention mask, labels).
MakeBatch = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class HomeRecipe:
    """How a hospital trains at home, without DP (nothing trained here leaves it).

    Chosen by measurement (bench/results/worth_joining.md): AdamW with weight decay, batches of
    32, early stopping on a selection fold of the hospital's own training notes."""

    head_learning_rates: tuple[float, ...] = (3e-3, 1e-2)
    #: LoRA factors train at this fraction of the head's learning rate.
    lora_ratio: float = 0.1
    #: Pulls towards the global weights tried for the own model (0: plain fine-tuning).
    pulls: tuple[float, ...] = (0.0, 0.01, 0.1)
    #: Weights of the alone model in its mixes with the global one (`w * alone + (1 - w) *
    #: global`, tensor by tensor; for the default head-only model this is exactly the mean of
    #: the two models' logits, an ensemble in one adapter).
    mixes: tuple[float, ...] = (0.25, 0.5, 0.75)
    #: How much better than the alone model (on the fold) a model built on the global one must
    #: score to be kept instead.
    margin: float = 0.01
    max_epochs: int = 30
    patience: int = 5
    batch_size: int = 32
    weight_decay: float = 0.01
    selection_fraction: float = 0.2


@dataclass
class PersonalReport:
    """Alone, global and own scored on the hospital's validation notes (the task's primary
    metric, e.g. macro-F1), and how the own model was chosen. For the hospital only."""

    metric: str
    alone: float
    global_: float
    own: float
    own_method: str  # "global", "fine-tune (pull P)" or "alone"
    selection: dict[str, float] = field(default_factory=dict)  # candidate -> selection score
    validation_examples: int = 0

    @property
    def gain(self) -> float:
        """What joining gave this hospital: own minus alone."""
        return self.own - self.alone

    def as_dict(self) -> dict:
        return {
            "metric": self.metric,
            "alone": round(self.alone, 4),
            "global": round(self.global_, 4),
            "own": round(self.own, 4),
            "gain": round(self.gain, 4),
            "own_method": self.own_method,
            "selection": {name: round(score, 4) for name, score in self.selection.items()},
            "validation_examples": self.validation_examples,
        }


@dataclass
class _Fit:
    arrays: Arrays
    epochs: int
    score: float


class _HomeData:
    """The hospital's training examples (selection fold last) as the trainer reads them: the
    cached frozen prefix where the model splits, else the whole model on token ids."""

    def __init__(self, model, dataset: EncodedDataset, config: LocalRun, pad_id, who, device):
        cached = cached_training(model, dataset, config, pad_id, who, device)
        if cached is not None:
            self.module, self.make_batch, self.inputs = cached.top, cached.batch, "hidden_states"
        else:
            pad_to = (
                config.spec.task.max_length
                if config.spec.training.padding == "max_length"
                else None
            )
            self.module, self.inputs = model, "input_ids"
            self.make_batch = lambda indices: pad_batch(
                [dataset[i] for i in indices], pad_id, pad_to
            )
        self.device = device

    def forward(self, indices: list[int]):
        inputs, mask, labels = self.make_batch(indices)
        with autocast_for(self.device):
            output = self.module(
                **{self.inputs: inputs.to(self.device)},
                attention_mask=mask.to(self.device),
                labels=labels.to(self.device),
            )
        return output, labels


def personalize(
    model: torch.nn.Module,
    task: Task,
    train: EncodedDataset,
    fold: list[int],
    validation: EncodedDataset,
    config: LocalRun,
    global_arrays: Arrays,
    fresh_arrays: Arrays,
    pad_id: int,
    who: str = "hospital",
    recipe: HomeRecipe | None = None,
) -> tuple[Arrays, PersonalReport]:
    """The hospital's own adapter and its alone / global / own report.

    Args:
        model: The PEFT model from `build_model` (its adapter is overwritten).
        task: The run's task (its primary metric scores the models).
        train: The hospital's training examples, encoded as its DP training encoded them (so
            that the frozen prefix cached for training serves here too).
        fold: The positions in `train` of the selection fold (whole patients): the candidates
            train on the rest, the fold chooses, and the choice is refitted on all of `train`.
        validation: The hospital's validation examples, encoded: scored, never trained on.
        config: The run's config as this hospital runs it.
        global_arrays: The federation's final adapter.
        fresh_arrays: The adapter as built, before any training (where *alone* starts).
        pad_id: The tokenizer's padding id.
        who: The hospital's name: the prefix cache of its training examples.
        recipe: How to train at home (default `HomeRecipe()`).

    Returns:
        The own adapter's arrays (for the hospital only) and the report.
    """
    recipe = recipe or HomeRecipe()
    device = pick_device(config.local.device)
    labels = list(config.spec.task.labels or [])
    chosen = set(fold)
    inner = [i for i in range(len(train)) if i not in chosen]
    everything = list(range(len(train)))
    model.to(device)
    data = _HomeData(model, train, config, pad_id, who, device)
    scored = _HomeData(model, validation, config, pad_id, f"{who}/validation", device)

    def fit(start: Arrays, lr: float, pull: float, indices, epochs, score_on=None) -> _Fit:
        return _fit(
            model, data, task, labels, config, recipe, start, lr, pull, indices, epochs, score_on
        )

    # Alone: the learning rate and the epochs chosen on the selection fold, then refitted.
    alone_fits = {
        lr: fit(fresh_arrays, lr, 0.0, inner, recipe.max_epochs, fold)
        for lr in recipe.head_learning_rates
    }
    alone_lr = max(alone_fits, key=lambda lr: alone_fits[lr].score)
    alone_fit = alone_fits[alone_lr]
    selection_scores = {"alone": alone_fit.score}
    selection_scores["global"] = _score(model, data, task, labels, global_arrays, fold)
    tuned: dict[float, _Fit] = {}
    for pull in recipe.pulls:
        tuned[pull] = fit(global_arrays, alone_lr, pull, inner, recipe.max_epochs, fold)
        selection_scores[f"fine-tune (pull {pull:g})"] = tuned[pull].score
    for weight in recipe.mixes:
        mixed = _mix(alone_fit.arrays, global_arrays, weight)
        selection_scores[f"mix ({weight:g} alone)"] = _score(model, data, task, labels, mixed, fold)
    alone = fit(fresh_arrays, alone_lr, 0.0, everything, alone_fit.epochs).arrays

    # Own: the alone model, unless a candidate built on the global one beats it on the fold by
    # `margin` (a fold of a few dozen patients is noisy: without the margin, a global model no
    # better than alone would be picked half the time, and cost the hospital what the noise
    # costs); among those, the best (ties: the global model untouched).
    best = choose_own(selection_scores, recipe.margin)
    if best == "global":
        own = global_arrays
    elif best == "alone":
        own = alone
    elif best.startswith("mix"):
        own = _mix(alone, global_arrays, next(w for w in recipe.mixes if f"({w:g} " in best))
    else:
        pull = next(p for p in recipe.pulls if best == f"fine-tune (pull {p:g})")
        own = fit(global_arrays, alone_lr, pull, everything, tuned[pull].epochs).arrays

    every_validation = list(range(len(validation)))
    scores = {
        name: _score(model, scored, task, labels, arrays, every_validation)
        for name, arrays in (("alone", alone), ("global", global_arrays), ("own", own))
    }
    report = PersonalReport(
        task.primary_metric,
        scores["alone"],
        scores["global"],
        scores["own"],
        best,
        selection_scores,
        len(validation),
    )
    log.info(
        "%s: own model (%s): %s alone %.3f, global %.3f, own %.3f",
        who,
        best,
        task.primary_metric,
        report.alone,
        report.global_,
        report.own,
    )
    return own, report


def choose_own(scores: dict[str, float], margin: float) -> str:
    """The own model's candidate: "alone", unless another scores at least `margin` more on the
    selection fold; then the best of those (a tie goes to "global", the model untouched)."""
    best = max(scores, key=lambda name: (scores[name], name == "global"))
    return best if scores[best] >= scores["alone"] + margin else "alone"


def _fit(
    model, data: _HomeData, task, labels, config, recipe, start, lr, pull, indices, epochs, score_on
) -> _Fit:
    """Train from `start` on `indices` for up to `epochs` (plain AdamW, no DP); with `score_on`
    keep the epoch that scores best there (stopping after `patience` epochs without gain)."""
    torch.manual_seed(config.spec.training.seed)  # no DP here: reproducible is right
    set_adapter_arrays(model, start)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if pull > 0 else None
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in zip(names, params) if "modules_to_save" in n]
    lora = [p for n, p in zip(names, params) if "modules_to_save" not in n]
    optimizer = torch.optim.AdamW(
        [{"params": head, "lr": lr}, {"params": lora, "lr": lr * recipe.lora_ratio}],
        weight_decay=recipe.weight_decay,
    )
    best = _Fit(start, 0, _score(model, data, task, labels, start, score_on) if score_on else 0.0)
    generator = torch.Generator().manual_seed(config.spec.training.seed)
    stale = 0
    for epoch in range(1, epochs + 1):
        model.train()  # the whole model: its top alone may hold no parameters of its own
        order = torch.randperm(len(indices), generator=generator).tolist()
        for begin in range(0, len(order), recipe.batch_size):
            batch = [indices[i] for i in order[begin : begin + recipe.batch_size]]
            output, _ = data.forward(batch)
            loss = output.loss.float()
            if anchor is not None:
                loss = loss + pull / 2 * sum(
                    ((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if score_on is None:
            continue
        score = _score(model, data, task, labels, None, score_on)
        if score > best.score:
            best, stale = _Fit(get_adapter_arrays(model), epoch, score), 0
        else:
            stale += 1
            if stale >= recipe.patience:
                break
    if score_on is None:
        return _Fit(get_adapter_arrays(model), epochs, 0.0)
    return best


@torch.no_grad()
def _score(model, data: _HomeData, task, labels, arrays, indices) -> float:
    """The primary metric of `arrays` (None: the model as it is) on the home examples
    `indices`."""
    if arrays is not None:
        set_adapter_arrays(model, arrays)
    model.eval()
    true_ids: list = []
    pred_ids: list = []
    for begin in range(0, len(indices), 64):
        output, labels_batch = data.forward(indices[begin : begin + 64])
        true_ids.extend(labels_batch.tolist())
        pred_ids.extend(output.logits.float().argmax(dim=-1).cpu().tolist())
    return float(task.metrics(true_ids, pred_ids, labels)[task.primary_metric])


def _mix(alone: Arrays, global_arrays: Arrays, weight: float) -> Arrays:
    return {
        name: (weight * alone[name] + (1 - weight) * global_arrays[name]).astype(
            global_arrays[name].dtype
        )
        for name in global_arrays
    }


def home_fold(examples: list, task: Task, recipe: HomeRecipe, seed: int) -> list[int]:
    """The positions in `examples` of the selection fold: a share of whole patients (the
    task's validation split, applied to the training examples)."""
    _, fold = task.split(examples, recipe.selection_fraction, seed)
    position = {id(example): i for i, example in enumerate(examples)}
    return sorted(position[id(example)] for example in fold)


def keep_at_home(
    config: LocalRun, arrays: Arrays, report: PersonalReport, folder: Path, hospital: str
) -> Path:
    """Write the own adapter (`folder/adapter`, PEFT format) and `folder/report.json`, readable
    by this account only: the adapter is not DP and must not be shared. Returns `folder`."""
    from fedward.client.model_cache import cached_model

    model = cached_model(config, len(config.spec.task.labels or []))
    set_adapter_arrays(model, arrays)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    save_adapter(model, folder / "adapter", list(config.spec.task.labels or []), config)
    for path in (folder, folder / "adapter", *(folder / "adapter").iterdir()):
        path.chmod(0o700 if path.is_dir() else 0o600)  # not for sharing: not DP
    write_json_atomic(folder / "report.json", {"hospital": hospital, **report.as_dict()})
    return folder
