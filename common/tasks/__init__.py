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
    from transformers import PreTrainedTokenizerBase

    from fedward.common.data import EncodedDataset


class Task(Protocol):
    """What a task provides: everything that differs between note classification and NER.

    A new task is one module in `common/tasks/` with an object that has these members, and one
    line in `TASKS`; the rest of fedward asks the run spec's task group for it
    (`spec.task.definition`) and never branches on the task's name.
    """

    #: The name a run config uses (`task = "ner"`).
    name: str
    #: The metric that sums up a round (progress lines, round tables, the bench).
    primary_metric: str
    #: What one unit of record-level (epsilon, delta)-DP protects, said next to epsilon.
    privacy_unit: str
    #: Learning rate of the new head when the run leaves `head_learning_rate` unset.
    head_learning_rate: float
    #: What trains when the run leaves `lora_variant` unset ("head", "lora" or "ffa").
    lora_variant: str
    #: The same, for a run that starts from an adapter (`init_adapter`).
    warm_start_lora_variant: str
    #: Weight of the loss on tokens tagged O when the run leaves it unset (1.0: no O tag).
    outside_tag_weight: float
    #: L2 sensitivity of `release_counts` to one record (the evaluation's Gaussian noise).
    release_sensitivity: float
    #: (metric key, column title) of the round table; the plot draws the same keys.
    metric_columns: tuple[tuple[str, str], ...]
    #: Simulated partitions of a pooled data set this task supports.
    partitions: tuple[str, ...]
    #: The partition `partition = "auto"` means.
    pooled_partition: str
    #: The scores the coordinator computes from the hospitals' summed counts.
    pooled_scores: tuple[str, ...]
    #: Those scores and the validation rows they are computed on, as the report names them.
    pooled_scores_name: str
    rows_name: str

    def read(
        self,
        path: str | Path,
        text_column: str,
        label_column: str,
        group_column: str | None = None,
        patient_column: str | None = None,
    ) -> list:
        """Read a data file into this task's examples (the only place that parses it).

        Args:
            path: The data file (CSV/JSONL; CoNLL or entity JSON for NER).
            text_column: Column of the text.
            label_column: Column of the label.
            group_column: Column a simulated split may group by, if any.
            patient_column: Column naming each record's patient (patient-level DP), if any.

        Returns:
            The examples, in file order.
        """
        ...

    def label_set(self, examples: list, source: str) -> list[str]:
        """The labels (NER: tags) the examples use, in a fixed order.

        Args:
            examples: What `read` returned.
            source: Where they came from, for error messages.

        Returns:
            The sorted label set.
        """
        ...

    def split(self, examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
        """Split a hospital's examples into training and validation, reproducibly.

        Args:
            examples: What `read` returned.
            val_fraction: Share kept for validation.
            seed: The run's seed.

        Returns:
            `(train, validation)`.
        """
        ...

    def encode(
        self,
        examples: list,
        labels: list[str],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        units: list[int] | None = None,
    ) -> EncodedDataset:
        """Tokenize examples and attach label ids (NER: one per word's first piece).

        Args:
            examples: Training or validation examples.
            labels: The run's label set; an id is a position in it.
            tokenizer: The base model's tokenizer.
            max_length: Most tokens per example.
            units: The DP unit (patient) of each example, when the run protects patients.

        Returns:
            The encoded examples.
        """
        ...

    def load_base(self, path: str, num_labels: int) -> torch.nn.Module:
        """The base model with this task's head (sequence or token classification).

        Args:
            path: A local model folder.
            num_labels: Outputs of the head.

        Returns:
            The model, before LoRA.
        """
        ...

    def peft_options(self) -> dict:
        """Options of PEFT's `LoraConfig` this task sets (its task type, the head to train).

        Returns:
            Keyword arguments for `LoraConfig`.
        """
        ...

    def metrics(self, true_ids: list, pred_ids: list, labels: list[str]) -> dict[str, float]:
        """Score predictions exactly (simulation, and a hospital's own report).

        Args:
            true_ids: The true label ids.
            pred_ids: The predicted label ids.
            labels: The label set.

        Returns:
            Metric name -> value, with `primary_metric` among them.
        """
        ...

    def release_counts(self, true_ids: list, pred_ids: list, num_labels: int) -> np.ndarray:
        """The counts an evaluation releases (noised), one vector.

        Args:
            true_ids: The true label ids.
            pred_ids: The predicted label ids.
            num_labels: Size of the label set.

        Returns:
            The count vector, of sensitivity `release_sensitivity` to one record.
        """
        ...

    def metrics_from_counts(self, vector: np.ndarray, num_labels: int) -> dict[str, float]:
        """The released metrics, computed from (noised) counts only.

        Args:
            vector: What `release_counts` returned, noised.
            num_labels: Size of the label set.

        Returns:
            Metric name -> value.
        """
        ...

    def pooled_metrics(self, counts: dict[str, tuple[float, float, float]]) -> dict[str, float]:
        """The global model's scores from the hospitals' summed (TP, FP, FN) counts.

        Args:
            counts: Label (NER: entity type) -> summed (TP, FP, FN).

        Returns:
            The `pooled_scores`, by name.
        """
        ...

    def describe_prediction(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        labels: list[str],
        text: str,
        max_length: int,
        top: int = 3,
    ) -> list[str]:
        """Lines that describe the model's prediction on one text (`fedward predict`).

        Args:
            model: The model with its adapter.
            tokenizer: The base model's tokenizer.
            labels: The label set.
            text: One note.
            max_length: Most tokens.
            top: How many labels to list (classification).

        Returns:
            Printable lines.
        """
        ...


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


def recorded_task(record: dict) -> Task:
    """The task a file fedward wrote names under `"task"` (an adapter's `fedward.json`, the
    `config` of a run's `history.json`): the one place a task is looked up from a file, as
    `TaskSpec.definition` is for a run config. `ConfigError` for a name fedward does not know.

    Args:
        record: The file's values, as read.

    Returns:
        The task object.
    """
    return task_named(str(record.get("task") or ""))
