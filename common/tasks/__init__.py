"""The tasks fedward trains, one object each: everything that differs between them.

A run config names its task (`task = "classification"` or `"ner"`); `task_named` gives the
object, which knows how to read, split and encode its examples, which head the base model gets,
how predictions are scored (and which score sums up a round), the training defaults of the task
(the head's learning rate, what trains, NER's O-tag weight) and the columns of the round table.
A new task is one new module here and one line in `TASKS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fedward.common.errors import ConfigError
from fedward.common.tasks.classification import CLASSIFICATION
from fedward.common.tasks.ner import NER

if TYPE_CHECKING:
    import numpy as np
    import torch

    from fedward.common.data import EncodedDataset


class Task(Protocol):
    """What a task provides (see `classification.Classification` for each member's meaning)."""

    name: str
    primary_metric: str
    privacy_unit: str
    head_learning_rate: float
    lora_variant: str
    warm_start_lora_variant: str
    outside_tag_weight: float
    release_sensitivity: float
    metric_columns: tuple[tuple[str, str], ...]
    partitions: tuple[str, ...]
    pooled_partition: str
    pooled_scores: tuple[str, ...]

    def read(
        self,
        path: str | Path,
        text_column: str,
        label_column: str,
        group_column: str | None = None,
        patient_column: str | None = None,
    ) -> list: ...
    def label_set(self, examples: list, source: str) -> list[str]: ...
    def split(self, examples: list, val_fraction: float, seed: int) -> tuple[list, list]: ...
    def encode(
        self,
        examples: list,
        labels: list[str],
        tokenizer,
        max_length: int,
        units: list[int] | None = None,
    ) -> EncodedDataset: ...
    def load_base(self, path: str, num_labels: int) -> torch.nn.Module: ...
    def peft_options(self) -> dict: ...
    def metrics(self, true_ids: list, pred_ids: list, labels: list[str]) -> dict[str, float]: ...
    def release_counts(self, true_ids: list, pred_ids: list, num_labels: int) -> np.ndarray: ...
    def metrics_from_counts(self, vector: np.ndarray, num_labels: int) -> dict[str, float]: ...
    def pooled_metrics(self, counts: dict[str, tuple[float, float, float]]) -> dict[str, float]: ...
    def describe_prediction(
        self,
        model: torch.nn.Module,
        tokenizer,
        labels: list[str],
        text: str,
        max_length: int,
        top: int = 3,
    ) -> list[str]: ...


#: What one unit of patient-level DP protects, in either task (said next to epsilon).
PATIENT_UNIT = "one patient (all of a patient's records)"

#: Every task, by the name a run config uses.
TASKS: dict[str, Task] = {task.name: task for task in (CLASSIFICATION, NER)}


def task_named(name: str) -> Task:
    """The task object of a run config's `task`; `ConfigError` for a name fedward does not know."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(
            f"field 'task': unknown task '{name}'; use one of {', '.join(TASKS)}"
        ) from None
