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
    (`EncodedDataset.units`)."""
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
    (the hospital's audit log and the simulation report say so)."""
    patients = Counter(getattr(example, "patient", None) for example in examples)
    patients.pop(None, None)
    return max(patients.values()) if patients else None


def example_labels(example) -> set[str]:
    """The labels an example carries: a `Record`'s label, or a tagged sentence's tags."""
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
    above the run's `max_unknown_rate`; common/coverage.py)."""
    examples = [*data.train, *data.val]
    return check_vocabulary(tokenizer, examples, model_name, max_unknown_rate)


def read_hospital_file(
    path: Path, task: TaskSpec, schema: DataSchema, seed: int, name: str
) -> HospitalData:
    """Read and split a hospital's own data file for the run's task, its columns as `schema`
    names them, the split drawn from the run's `seed`."""
    definition = task.definition
    examples = definition.read(
        path, schema.text_column, schema.label_column, patient_column=schema.patient_column
    )
    train, val = definition.split(examples, schema.val_fraction, seed)
    return HospitalData(name, train, val, str(path))
