"""A hospital's data for a run: read from its own file and split, filtered to the run's labels,
checked against the model's vocabulary and encoded for the run's task. None of it leaves the
hospital; the message handlers (client/app.py) and the own model (client/own_model.py) use it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from fedward.common.config import DataSchema, LocalRun, TaskSpec
from fedward.common.coverage import check_vocabulary
from fedward.common.data import EncodedDataset, patient_units

log = logging.getLogger(__name__)


@dataclass
class HospitalData:
    """One hospital's examples, already split; they never leave the hospital."""

    name: str
    train: list
    val: list
    source: str = ""  # where the data came from (file path, or a description in simulation)


#: Loads a hospital's data for a run: (config, context) -> HospitalData.
DataSource = Callable[[LocalRun, Context], HospitalData]


def encode(examples: list, task: TaskSpec, tokenizer, *, per_patient: bool) -> EncodedDataset:
    """Token ids and label ids for the run's task; under patient-level DP (`per_patient`, the
    privacy group's) each encoded example also carries its patient's number
    (`EncodedDataset.units`).

    Args:
        examples: A hospital's examples (`Record`s, or NER sentences of (word, tag) pairs).
        task: The run's task group: its definition, labels (an id is a position in them) and
            `max_length`.
        tokenizer: The base model's tokenizer.
        per_patient: Whether the run protects patients (`PrivacySpec.per_patient`).

    Returns:
        The encoded examples (NER may cut a long sentence into several), with each one's
        patient number 0..P-1 under patient-level DP, else no units.

    Raises:
        DataError: under patient-level DP, an example without a patient (`patient_units`).
    """
    return task.definition.encode(
        examples,
        task.labels or [],
        tokenizer,
        task.max_length,
        patient_units(examples) if per_patient else None,
    )


def largest_patient(examples: list) -> int | None:
    """The most records one patient has among `examples`; None when they name no patients.

    Under record-level DP this is what group privacy multiplies epsilon by for that patient
    (the hospital's audit log and the simulation report say so).

    Args:
        examples: A hospital's examples; those without a `patient` are not counted.

    Returns:
        The largest number of examples that share one patient, or None.
    """
    patients = Counter(getattr(example, "patient", None) for example in examples)
    patients.pop(None, None)
    return max(patients.values()) if patients else None


def example_labels(example) -> set[str]:
    """The labels an example carries: a `Record`'s label, or a tagged sentence's tags.

    Args:
        example: A `Record`, or an NER sentence (a list or tuple of (word, tag) pairs).

    Returns:
        The record's one label, or the set of the sentence's tags (empty for an empty one).
    """
    if isinstance(example, list | tuple):  # a sentence of (word, tag)
        return {tag for _, tag in example}
    return {example.label}


def with_run_labels(data: HospitalData, labels: list[str] | None) -> HospitalData:
    """The examples whose labels the run lists; the others are left out, not refused.

    A refusal here would answer "does any record carry label X?" (a run listing [cardiac, X]
    against one listing [cardiac, decoy]): whether a record is used is a function of the record
    alone, so a left-out record is one more neighbour the DP update hides, and the count of the
    left-out ones is for this hospital's log only. A hospital that declares its labels in its
    policy (`labels`) has a run missing one of them refused before any record is read.

    Args:
        data: The hospital's examples, split.
        labels: The run's label set; None lists none, so every labelled example is left out.

    Returns:
        The same hospital with only the examples whose labels (an NER sentence: all its tags)
        are all among `labels`, in their order; the split is kept.
    """
    known = set(labels or [])
    train = [example for example in data.train if example_labels(example) <= known]
    val = [example for example in data.val if example_labels(example) <= known]
    left_out = len(data.train) + len(data.val) - len(train) - len(val)
    if left_out:
        log.warning(
            "%s: %d of %d examples carry labels the run does not list; they are not used",
            data.name,
            left_out,
            len(data.train) + len(data.val),
        )
    return HospitalData(data.name, train, val, data.source)


def check_data_vocabulary(
    data: HospitalData, tokenizer, model_name: str, max_unknown_rate: float
) -> float:
    """The share of this hospital's text unknown to the model `model_name` (`VocabularyError`
    above the run's `max_unknown_rate`; common/coverage.py).

    Args:
        data: The hospital's examples; its training and validation splits are both measured.
        tokenizer: The run's tokenizer.
        model_name: The run's model, named in the refusal.
        max_unknown_rate: The largest unknown share allowed, in [0, 1].

    Returns:
        The share, in [0, 1], of the text's units (characters in scripts written without
        spaces, else words) the tokenizer maps to its unknown token or to nothing.

    Raises:
        VocabularyError: (a `DataError`) the share is above `max_unknown_rate`.
    """
    examples = [*data.train, *data.val]
    return check_vocabulary(tokenizer, examples, model_name, max_unknown_rate)


def read_hospital_file(
    path: Path, task: TaskSpec, schema: DataSchema, seed: int, name: str
) -> HospitalData:
    """Read and split a hospital's own data file for the run's task, its columns as `schema`
    names them, the split drawn from the run's `seed`.

    Args:
        path: The hospital's data file.
        task: The run's task group: its definition reads and splits the file.
        schema: The hospital's data schema: text, label and patient columns and the share
            kept for validation.
        seed: The run's seed, which draws the split (NER's split, the last sentences in file
            order, does not use it).
        name: The hospital's name.

    Returns:
        The hospital's examples, split into training and validation, with `path` as source.

    Raises:
        DataError: a file the task's reader cannot read (missing, empty, malformed, a
            missing column or value).
    """
    definition = task.definition
    examples = definition.read(
        path, schema.text_column, schema.label_column, patient_column=schema.patient_column
    )
    train, val = definition.split(examples, schema.val_fraction, seed)
    return HospitalData(name, train, val, str(path))
