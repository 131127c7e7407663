"""This hospital's own model at a run's end: the final global adapter fitted to its own notes
at home (client/personalize.py), with its alone / global / own report, and kept there
(`keep_at_home`). Without DP and for the hospital only: nothing of it may reach a message."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedward.client.hospital_data import HospitalData, encode
from fedward.client.model_cache import cached_model, cached_tokenizer, initial_arrays
from fedward.client.personalize import (
    Arrays,
    HomeRecipe,
    PersonalReport,
    home_folds,
    personalize,
)
from fedward.common.config import LocalRun, ModelSpec, TaskSpec
from fedward.common.data import EncodedDataset
from fedward.common.files.atomic import write_json_atomic
from fedward.common.model import save_adapter, set_adapter_arrays


@dataclass
class OwnModel:
    """This hospital's own adapter, its alone / global / own report, and the groups its model
    is built from (the model, the task and its labels, the seed). Not DP, never sent."""

    arrays: Arrays
    report: PersonalReport
    model: ModelSpec
    task: TaskSpec
    seed: int


def own_model(
    data: HospitalData, config: LocalRun, global_arrays: dict, recipe: HomeRecipe | None = None
) -> OwnModel:
    """This hospital's own adapter and its alone / global / own report (client/personalize.py):
    cross-validation over folds of its training patients chooses, the validation notes score.
    Without DP and for the hospital only: nothing of it may reach a message.

    Args:
        data: The hospital's examples for the run (its training patients choose, its
            validation notes score).
        config: The run's config as this hospital runs it (model, task, seed, DP unit).
        global_arrays: The federation's final adapter.
        recipe: How to train at home; None is `HomeRecipe()`.

    Returns:
        The own adapter (not DP, never sent), its report and what its model is built from.
    """
    spec = config.spec
    seed = spec.training.seed
    tokenizer = cached_tokenizer(spec.model.name)
    model = cached_model(spec.model, spec.task, seed)
    recipe = recipe or HomeRecipe()
    # Encoded as training encoded them, so that the frozen prefix cached for training serves.
    per_patient = spec.privacy.per_patient
    train, folds = _encoded_in_folds(
        data.train, home_folds(data.train, recipe.folds, seed), spec.task, tokenizer, per_patient
    )
    validation, validation_folds = _encoded_in_folds(
        data.val,
        home_folds(data.val, recipe.validation_folds, seed),
        spec.task,
        tokenizer,
        per_patient,
    )
    arrays, report = personalize(
        model,
        spec.task.definition,
        train,
        folds,
        validation,
        validation_folds,
        config,
        global_arrays,
        initial_arrays(spec.model, spec.task, seed),
        tokenizer.pad_token_id,
        who=data.name,
        recipe=recipe,
    )
    return OwnModel(arrays, report, spec.model, spec.task, seed)


def _encoded_in_folds(
    examples: list, folds: list[list[int]], task: TaskSpec, tokenizer, per_patient: bool
) -> tuple[EncodedDataset, list[list[int]]]:
    """`examples` encoded, and the positions of each fold among the encoded examples: the
    same where encoding keeps one example per example (the order training encoded them in),
    else (NER cuts long sentences) encoded fold after fold."""
    encoded = encode(examples, task, tokenizer, per_patient=per_patient)
    if len(encoded) == len(examples):
        return encoded, folds
    ordered = [examples[i] for fold in folds for i in fold]
    sizes = [
        len(encode([examples[i] for i in fold], task, tokenizer, per_patient=per_patient))
        for fold in folds
    ]
    starts = [int(n) for n in np.cumsum([0, *sizes])]
    folded = [list(range(a, b)) for a, b in itertools.pairwise(starts)]
    return encode(ordered, task, tokenizer, per_patient=per_patient), folded


def keep_at_home(own: OwnModel, folder: Path, hospital: str) -> Path:
    """Write the own adapter (`folder/adapter`, PEFT format) and `folder/report.json`, readable
    by this account only: the adapter is not DP and must not be shared.

    Args:
        own: The own adapter and its report (`own_model`).
        folder: Where to keep them; made (mode 0700) if missing.
        hospital: The hospital's name, written into the report.

    Returns:
        `folder`.
    """
    model = cached_model(own.model, own.task, own.seed)
    set_adapter_arrays(model, own.arrays)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    save_adapter(model, folder / "adapter", list(own.task.labels or []), own.task, own.model)
    for path in (folder, folder / "adapter", *(folder / "adapter").iterdir()):
        path.chmod(0o700 if path.is_dir() else 0o600)  # not for sharing: not DP
    write_json_atomic(folder / "report.json", {"hospital": hospital, **own.report.as_dict()})
    return folder
