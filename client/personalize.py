"""A hospital's own model: the global adapter fitted to its own notes, kept at home.

A board decides to join a federation by one comparison, on its own validation notes: the model
it could train alone against the one it gets by joining. This module makes both, at the end of
a run, inside the hospital:

- *alone*: trained on the hospital's training notes only, from the fresh adapter, without DP,
  with the recipe a hospital would tune on its own (learning rate and epochs chosen by
  cross-validation over folds of whole patients of its own training notes, not the DP recipe
  minus the noise);
- *global*: the federation's final adapter, as received;
- *own*: one of the candidates: the global adapter as is, the global adapter fine-tuned on the
  hospital's training notes with a pull towards the global weights (the personal objective of
  Ditto, Li et al. 2021, solved once against the final global model: the loss on its own notes
  plus `pull / 2 * ||own - global||^2`; pull 0 is plain fine-tuning), mixes of the alone and
  global adapters (for the head-only default, the mean of their logits), and the alone model,
  which it stays unless another clearly beats it (`HomeRecipe.confidence`).

Where each is chosen matters. The global model trained on the hospital's training notes, so
folds of those notes flatter every candidate built on it (measured: by 3 to 5 points of
macro-F1 under patient-level DP, enough to pick a fine-tuned global model that then loses to
alone); they set only the recipes. The choice is made on the validation notes, which no
candidate trained on, and the own figure reported is the nested cross-validation one: each
fold of the validation notes (whole patients) is labelled by the candidate the other folds
chose, so that no note scores a choice it took part in. Alone and global are scored on all the
validation notes.

Nothing here is DP and nothing here leaves: the own and alone adapters are trained on the
records without noise and are as sensitive as the records themselves. They are written to the
hospital's own folder (deployment) or scored in the simulation's worker; only the global adapter,
trained by the DP step and masked, ever reaches a message (tests/client/test_personalize.py).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedward.client.device import autocast_for, pick_device
from fedward.client.prefix_cache import CacheOptions, cached_training
from fedward.common.config import LocalRun
from fedward.common.data import EncodedDataset, pad_batch
from fedward.common.metrics import pooled_macro_f1
from fedward.common.model import get_adapter_arrays, set_adapter_arrays
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
    32, early stopping and the choice of the own model by cross-validation over `folds` folds of
    the hospital's own training patients (one fold of a few dozen patients chose wrongly too
    often: a candidate that beat alone there by a point lost on the validation notes)."""

    head_learning_rates: tuple[float, ...] = (3e-3, 1e-2)
    #: LoRA factors train at this fraction of the head's learning rate.
    lora_ratio: float = 0.1
    #: Pulls towards the global weights tried for the own model (0: plain fine-tuning). Pulls
    #: 0.01 and 0.1 were measured not to add to 0 once the mixes are candidates, and each costs
    #: four more fits (bench/results/worth_joining.md): the default tries plain fine-tuning.
    pulls: tuple[float, ...] = (0.0,)
    #: Weights of the alone model in its mixes with the global one (`w * alone + (1 - w) *
    #: global`, tensor by tensor; for the default head-only model this is exactly the mean of
    #: the two models' logits, an ensemble in one adapter).
    mixes: tuple[float, ...] = (0.25, 0.5, 0.75)
    #: A model built on the global one replaces the alone model only where it beats it in at
    #: least this share of `resamples` paired bootstrap resamples of the validation notes
    #: (measured: a plain "best score wins" lost up to 16 points to alone where a rare class
    #: made macro-F1 jump on a few notes; bench/results/worth_joining.md).
    confidence: float = 0.8
    resamples: int = 100
    max_epochs: int = 30
    patience: int = 5
    batch_size: int = 32
    weight_decay: float = 0.01
    #: Folds of whole patients: of the training notes, to choose recipes (each fit trains on
    #: the other folds and stops early on its own); of the validation notes, to report the own
    #: model's figure by nested cross-validation.
    folds: int = 3
    validation_folds: int = 5


@dataclass
class PersonalReport:
    """Alone, global and own scored on the hospital's validation notes (the task's primary
    metric, e.g. macro-F1), and how the own model was chosen. For the hospital only."""

    metric: str
    alone: float
    global_: float
    own: float
    own_method: str  # "global", "fine-tune (pull P)", "mix (W alone)" or "alone"
    #: candidate -> its mean score over the selection folds
    selection: dict[str, float] = field(default_factory=dict)
    validation_examples: int = 0
    #: What chose and scored, kept in memory for benchmarks of the choice (never written:
    #: the labels of the hospital's validation notes): the true label ids, each candidate's
    #: predicted ids, and the validation folds.
    evidence: dict = field(default_factory=dict, repr=False, compare=False)

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

    def __init__(self, model, dataset: EncodedDataset, options: CacheOptions, pad_id, who, device):
        cached = cached_training(model, dataset, options, pad_id, who, device)
        if cached is not None:
            self.module, self.make_batch, self.inputs = cached.top, cached.batch, "hidden_states"
        else:
            self.module, self.inputs = model, "input_ids"
            self.make_batch = lambda indices: pad_batch(
                [dataset[i] for i in indices], pad_id, options.pad_to
            )
        self.device = device
        self.size = len(dataset)

    def __len__(self) -> int:
        return self.size

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
    folds: list[list[int]],
    validation: EncodedDataset,
    validation_folds: list[list[int]],
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
        folds: The positions in `train` of each cross-validation fold (whole patients,
            disjoint): they choose the recipes (learning rate, epochs), never the model.
        validation: The hospital's validation examples, encoded: no model here trains on them.
        validation_folds: The positions in `validation` of its folds (whole patients): the
            candidate kept is the one the validation notes choose; the own figure reported
            labels each fold with the candidate the other folds choose, so that no note
            scores a choice it took part in.
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
    model.to(device)
    options = CacheOptions.of(config)
    data = _HomeData(model, train, options, pad_id, who, device)
    # the validation notes scored every round (`predict`): their cached prefix serves here too
    scored = _HomeData(model, validation, options, pad_id, f"{who}:validation", device)

    def fit(start: Arrays, lr: float, pull: float, indices, epochs, score_on=None) -> _Fit:
        return _fit(
            model, data, task, labels, config, recipe, start, lr, pull, indices, epochs, score_on
        )

    candidates = _candidates(fit, folds, len(train), fresh_arrays, global_arrays, recipe)
    # The choice, on the validation notes, which no candidate trained on.
    truth, predicted = [], {}
    for name, arrays in candidates.items():
        truth, predicted[name] = _predict(model, scored, arrays)
    seed = config.spec.training.seed
    report = _report(task, labels, truth, predicted, validation_folds, recipe, seed)
    log.info(
        "%s: own model (%s): %s alone %.3f, global %.3f, own %.3f",
        who,
        report.own_method,
        task.primary_metric,
        report.alone,
        report.global_,
        report.own,
    )
    return candidates[report.own_method], report


def _candidates(
    fit: Callable[..., _Fit],
    folds: list[list[int]],
    size: int,
    fresh_arrays: Arrays,
    global_arrays: Arrays,
    recipe: HomeRecipe,
) -> dict[str, Arrays]:
    """Alone, global, each fine-tuning of the global model and each mix, by name.

    The recipes, by cross-validation on the training notes: alone's learning rate and epochs,
    and the epochs of each fine-tuning. The global model trained on these very notes, so the
    folds flatter every candidate built on it: they set recipes, and do not choose."""
    everything = list(range(size))

    def on_every_fold(start: Arrays, lr: float, pull: float) -> list[_Fit]:
        fits = []
        for fold in folds:
            held = set(fold)
            rest = [i for i in everything if i not in held]
            fits.append(fit(start, lr, pull, rest, recipe.max_epochs, fold))
        return fits

    alone_fits = {lr: on_every_fold(fresh_arrays, lr, 0.0) for lr in recipe.head_learning_rates}
    alone_lr = max(alone_fits, key=lambda lr: _mean_score(alone_fits[lr]))
    alone = fit(fresh_arrays, alone_lr, 0.0, everything, _epochs(alone_fits[alone_lr])).arrays
    candidates = {"alone": alone, "global": global_arrays}
    for pull in recipe.pulls:
        epochs = _epochs(on_every_fold(global_arrays, alone_lr, pull))
        candidates[f"fine-tune (pull {pull:g})"] = fit(
            global_arrays, alone_lr, pull, everything, epochs
        ).arrays
    for weight in recipe.mixes:
        candidates[f"mix ({weight:g} alone)"] = _mix(alone, global_arrays, weight)
    return candidates


def _report(
    task: Task,
    labels: list[str],
    truth: list,
    predicted: dict[str, list],
    validation_folds: list[list[int]],
    recipe: HomeRecipe,
    seed: int,
) -> PersonalReport:
    """The candidate the validation notes choose, and the alone / global / own report."""

    def metric(indices: list[int], predictions: list) -> float:
        true_ids = [truth[i] for i in indices]
        pred_ids = [predictions[i] for i in indices]
        return float(task.metrics(true_ids, pred_ids, labels)[task.primary_metric])

    every_validation = list(range(len(truth)))
    selection = {name: metric(every_validation, p) for name, p in predicted.items()}
    score = resample_scorer(task, truth, predicted, labels)
    kept = choose_own(list(predicted), every_validation, score, recipe, seed)
    # The own figure: each fold of the validation notes labelled by the candidate the other
    # folds choose (nested cross-validation), an unbiased figure for choosing by validation.
    own_predictions = nested_predictions(predicted, validation_folds, score, recipe, seed)
    return PersonalReport(
        task.primary_metric,
        selection["alone"],
        selection["global"],
        metric(every_validation, own_predictions),
        kept,
        selection,
        len(truth),
        {"truth": truth, "predicted": predicted, "folds": validation_folds},
    )


def _mean_score(fits: list[_Fit]) -> float:
    return float(np.mean([f.score for f in fits]))


def _epochs(fits: list[_Fit]) -> int:
    """The epochs to refit with: the median of the folds' best epochs."""
    return round(float(np.median([f.epochs for f in fits])))


#: Scores a candidate ("alone", ...) on validation notes weighted by how often each was drawn.
Scorer = Callable[[str, np.ndarray], float]


def choose_own(
    names: list[str],
    indices: list[int],
    score: Scorer,
    recipe: HomeRecipe,
    seed: int,
) -> str:
    """The own model's candidate, chosen on the notes `indices`: "alone", unless another beats
    it there clearly: in at least `recipe.confidence` of `recipe.resamples` paired bootstrap
    resamples of those notes (the same notes for both); then the best of those on `indices`
    (a tie goes to "global", the model untouched).

    Args:
        names: The candidates ("alone" among them).
        indices: The positions of the notes that choose.
        score: A candidate's primary metric on the notes, each weighted by a count
            (`resample_scorer`).
        recipe: `confidence` and `resamples`.
        seed: The resamples' seed (the choice is reproducible).

    Returns:
        The chosen candidate's name.
    """
    rng = np.random.default_rng(seed)
    size = 1 + max(indices)
    wins = dict.fromkeys(names, 0)
    for _ in range(recipe.resamples):
        weights = np.bincount(rng.choice(indices, size=len(indices)), minlength=size)
        alone = score("alone", weights)
        for name in names:
            wins[name] += name != "alone" and score(name, weights) > alone
    clear = [name for name in names if wins[name] >= recipe.confidence * recipe.resamples]
    if not clear:
        return "alone"
    once = np.bincount(np.asarray(indices), minlength=size)
    scores = {name: score(name, once) for name in clear}
    return max(clear, key=lambda name: (scores[name], name == "global"))


def nested_predictions(
    predicted: dict[str, list], folds: list[list[int]], score: Scorer, recipe: HomeRecipe, seed: int
) -> list:
    """The own model's predictions by nested cross-validation: each fold's notes labelled by
    the candidate `choose_own` picks on the other folds (seed `seed + 1 + fold number`)."""
    everything = sorted(i for fold in folds for i in fold)
    own: list = [None] * len(everything)
    for number, fold in enumerate(folds):
        held = set(fold)
        others = [i for i in everything if i not in held]
        chosen = choose_own(list(predicted), others, score, recipe, seed + 1 + number)
        for i in fold:
            own[i] = predicted[chosen][i]
    return own


def resample_scorer(
    task: Task, truth: list, predicted: dict[str, list], labels: list[str]
) -> Scorer:
    """`choose_own`'s scorer: a candidate's primary metric on notes weighted by counts.
    Macro-F1 (classification) is computed from weighted per-label counts, as
    `common.metrics.pooled_macro_f1` computes it (the labels present, as sklearn's macro
    average over them), a thousand times faster than scoring each resample anew; any other
    metric scores the resample's notes with `task.metrics`."""
    if task.primary_metric == "macro_f1":
        true = np.asarray(truth, dtype=np.int64)
        right = {name: true == np.asarray(p, dtype=np.int64) for name, p in predicted.items()}
        pred = {name: np.asarray(p, dtype=np.int64) for name, p in predicted.items()}
        num_labels = max(len(labels), 1 + int(true.max(initial=0)))

        def macro_f1(name: str, weights: np.ndarray) -> float:
            hit = right[name]
            weights = np.pad(weights.astype(np.float64), (0, len(true) - len(weights)))
            tp = np.bincount(true[hit], weights[hit], num_labels)
            fp = np.bincount(pred[name][~hit], weights[~hit], num_labels)
            fn = np.bincount(true[~hit], weights[~hit], num_labels)
            return pooled_macro_f1({str(k): (tp[k], fp[k], fn[k]) for k in range(num_labels)})

        return macro_f1

    def drawn(name: str, weights: np.ndarray) -> float:
        positions = np.repeat(np.arange(len(weights)), weights).tolist()
        true_ids = [truth[i] for i in positions]
        pred_ids = [predicted[name][i] for i in positions]
        return float(task.metrics(true_ids, pred_ids, labels)[task.primary_metric])

    return drawn


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
def _predict(model, data: _HomeData, arrays, indices=None) -> tuple[list, list]:
    """The true and predicted label ids of `arrays` (None: the model as it is) on the home
    examples `indices` (default: all of them)."""
    if arrays is not None:
        set_adapter_arrays(model, arrays)
    model.eval()
    indices = list(range(len(data))) if indices is None else indices
    true_ids: list = []
    pred_ids: list = []
    for begin in range(0, len(indices), 64):
        output, labels_batch = data.forward(indices[begin : begin + 64])
        true_ids.extend(labels_batch.tolist())
        pred_ids.extend(output.logits.float().argmax(dim=-1).cpu().tolist())
    return true_ids, pred_ids


def _score(model, data: _HomeData, task, labels, arrays, indices) -> float:
    """The primary metric of `arrays` (None: the model as it is) on the home examples
    `indices`."""
    true_ids, pred_ids = _predict(model, data, arrays, indices)
    return float(task.metrics(true_ids, pred_ids, labels)[task.primary_metric])


def _mix(alone: Arrays, global_arrays: Arrays, weight: float) -> Arrays:
    return {
        name: (weight * alone[name] + (1 - weight) * global_arrays[name]).astype(
            global_arrays[name].dtype
        )
        for name in global_arrays
    }


def home_folds(examples: list, count: int, seed: int) -> list[list[int]]:
    """The positions in `examples` of `count` disjoint folds of whole patients covering them
    all, stratified: the patients (an example without one is its own unit) sorted by their
    most frequent label (none for NER), shuffled within a label with `seed`, and dealt to the
    folds in turn; fewer folds where there are fewer patients.

    Example:
        >>> from fedward.common.data import Record
        >>> notes = [Record(f"note {i}", "ab"[i % 2], patient=f"p{i // 2}") for i in range(8)]
        >>> [len(fold) for fold in home_folds(notes, 2, seed=0)]
        [4, 4]
    """
    units: dict[object, list[int]] = {}
    for position, example in enumerate(examples):
        patient = getattr(example, "patient", None)
        units.setdefault(("patient", patient) if patient else ("example", position), []).append(
            position
        )
    by_label: dict[str, list[list[int]]] = {}
    for members in units.values():
        found = Counter(str(getattr(examples[i], "label", "")) for i in members)
        by_label.setdefault(found.most_common(1)[0][0], []).append(members)
    rng = random.Random(seed)
    folds: list[list[int]] = [[] for _ in range(count)]
    dealt = 0
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        for members in group:
            folds[dealt % count].extend(members)
            dealt += 1
    return [sorted(fold) for fold in folds if fold]
