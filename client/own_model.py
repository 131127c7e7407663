"""This hospital's own model at a run's end: the final global adapter fitted to its own notes
at home (client/personalize.py), with its alone / global / own report, and kept there
(`keep_at_home`). Without DP and for the hospital only: nothing of it may reach a message."""

from __future__ import annotations

import itertools
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
from fedward.common.config import LocalRun, TaskSpec
from fedward.common.data import EncodedDataset
from fedward.common.files.atomic import write_json_atomic
from fedward.common.model import save_adapter, set_adapter_arrays


def own_model(
    data: HospitalData, config: LocalRun, global_arrays: dict, recipe: HomeRecipe | None = None
) -> tuple[dict, PersonalReport]:
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
        The own adapter's arrays (name -> array; not DP, never sent) and the report.
    """
    tokenizer = cached_tokenizer(config.spec.model.name)
    num_labels = len(config.spec.task.labels or [])
    model = cached_model(config, num_labels)
    task = config.spec.task.definition
    recipe = recipe or HomeRecipe()
    # Encoded as training encoded them, so that the frozen prefix cached for training serves.
    seed = config.spec.training.seed
    per_patient = config.spec.privacy.per_patient
    train, folds = _encoded_in_folds(
        data.train,
        home_folds(data.train, recipe.folds, seed),
        config.spec.task,
        tokenizer,
        per_patient,
    )
    validation, validation_folds = _encoded_in_folds(
        data.val,
        home_folds(data.val, recipe.validation_folds, seed),
        config.spec.task,
        tokenizer,
        per_patient,
    )
    return personalize(
        model,
        task,
        train,
        folds,
        validation,
        validation_folds,
        config,
        global_arrays,
        initial_arrays(config, num_labels),
        tokenizer.pad_token_id,
        who=data.name,
        recipe=recipe,
    )


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


def keep_at_home(
    config: LocalRun, arrays: Arrays, report: PersonalReport, folder: Path, hospital: str
) -> Path:
    """Write the own adapter (`folder/adapter`, PEFT format) and `folder/report.json`, readable
    by this account only: the adapter is not DP and must not be shared.

    Args:
        config: The run's config as this hospital ran it (model, task and labels).
        arrays: The own adapter (`own_model`).
        report: Its alone / global / own report.
        folder: Where to keep them; made (mode 0700) if missing.
        hospital: The hospital's name, written into the report.

    Returns:
        `folder`.
    """
    model = cached_model(config, len(config.spec.task.labels or []))
    set_adapter_arrays(model, arrays)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    save_adapter(
        model,
        folder / "adapter",
        list(config.spec.task.labels or []),
        config.spec.task,
        config.spec.model,
    )
    for path in (folder, folder / "adapter", *(folder / "adapter").iterdir()):
        path.chmod(0o700 if path.is_dir() else 0o600)  # not for sharing: not DP
    write_json_atomic(folder / "report.json", {"hospital": hospital, **report.as_dict()})
    return folder
