"""Note classification: one label per clinical note (CSV/JSONL records, or synthetic notes).

The head is a mean-pooling classifier over the encoder's token states; the primary metric is
macro-F1, so that rare diagnoses count as much as common ones.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedward.common.metrics import (
    classification_metrics,
    count_metrics,
    label_counts,
    pooled_macro_f1,
    ratio,
)

if TYPE_CHECKING:  # torch and the data layer load when a method needs them, not with the CLI
    import torch

    from fedward.common.data import EncodedDataset, Record


class Classification:
    """Diagnosis (or any label) per note; examples are `Record`s."""

    name = "classification"
    #: The metric that sums up a round (progress lines, round tables, the bench).
    primary_metric = "macro_f1"
    #: What one unit of (epsilon, delta)-DP protects, said next to epsilon.
    privacy_unit = "one record (a note)"
    #: Learning rate of the new head when the run config leaves `head_learning_rate` unset.
    head_learning_rate = 0.1
    #: What trains when the run config leaves `lora_variant` unset: the head alone on the frozen
    #: encoder (under DP it matched or beat LoRA on every corpus measured, at a fifth of the
    #: time; bench/results/utility-probes.md, "Head-only training").
    lora_variant = "head"
    #: The same, for a run that starts from an adapter (`init_adapter`): LoRA. From a public
    #: adapter, LoRA under DP beat the head alone on Medical Abstracts at epsilon 8, where from a
    #: fresh one it lost (bench/results/warm_start.md).
    warm_start_lora_variant = "lora"
    #: `outside_tag_weight` is NER's; a note has one label and no O tag.
    outside_tag_weight = 1.0
    #: (metric key, column title) of the round table; the plot draws the same keys after loss.
    metric_columns = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))
    #: Simulated partitions of a pooled data set, and the one `partition = auto` means. Each
    #: record has one label and may have a group column, so label skew and columns are possible.
    partitions = ("iid", "dirichlet", "blocks", "column")
    pooled_partition = "iid"

    def read(
        self,
        path: str | Path,
        text_column: str,
        label_column: str,
        group_column: str | None = None,
        patient_column: str | None = None,
    ) -> list[Record]:
        """The records of a CSV/JSONL file (each with its patient when `patient_column`)."""
        from fedward.common.data import read_records

        return read_records(path, text_column, label_column, group_column, patient_column)

    def label_set(self, examples: list[Record], source: str) -> list[str]:
        """The sorted labels of `examples`; `DataError` for a label too rare to split."""
        from fedward.common.data import label_set

        return label_set(examples, source)

    def split(
        self, examples: list[Record], val_fraction: float, seed: int
    ) -> tuple[list[Record], list[Record]]:
        """Training and validation records, stratified by label, shuffled with `seed`."""
        from fedward.common.data import train_val_split

        return train_val_split(examples, val_fraction, seed)

    def encode(
        self,
        examples: list[Record],
        labels: list[str],
        tokenizer,
        max_length: int,
        units: list[int] | None = None,
    ) -> EncodedDataset:
        """Token ids of each note and the id of its label; `units` (each note's patient
        number under patient-level DP) kept alongside."""
        from fedward.common.data import encode_classification

        label_to_id = {label: index for index, label in enumerate(labels)}
        return encode_classification(tokenizer, examples, label_to_id, max_length, units)

    def release_counts(self, true_ids: list, pred_ids: list, num_labels: int) -> np.ndarray:
        """What a hospital may release of an evaluation, as counts (client/privacy/release.py):
        examples, correct, and TP, FP, FN of every class. One record changes examples by 1, and
        either
        correct and one TP (right) or one FN and one FP (wrong): L2 sensitivity sqrt(3)."""
        tp, fp, fn = label_counts(true_ids, pred_ids, num_labels)
        return np.concatenate([[len(true_ids), tp.sum()], tp, fp, fn]).astype(np.float64)

    release_sensitivity = math.sqrt(3.0)

    def metrics_from_counts(self, vector: np.ndarray, num_labels: int) -> dict[str, float]:
        """The released metrics: example count, accuracy and macro-F1 from (noised) counts, and
        the (noised) counts per label themselves, so that the coordinator can pool them
        (releasing the noised vector costs nothing more than what is computed from it)."""
        examples = float(vector[0])
        tp, fp, fn = (vector[2 + i * num_labels : 2 + (i + 1) * num_labels] for i in range(3))
        counts = {str(k): (tp[k], fp[k], fn[k]) for k in range(num_labels)}
        return {
            "num-examples": examples,
            "accuracy": ratio(vector[1], examples),
            "macro_f1": pooled_macro_f1(counts),
            **count_metrics(counts),
        }

    #: The scores the coordinator computes from the hospitals' summed counts (`pooled_metrics`)
    #: instead of averaging the hospitals' own.
    pooled_scores = ("macro_f1",)
    pooled_scores_name = "macro-F1"
    rows_name = "notes"

    def pooled_metrics(self, counts: dict[str, tuple[float, float, float]]) -> dict[str, float]:
        """Macro-F1 of the global model over all hospitals' validation notes, from their
        per-label counts summed (common.metrics.summed_counts)."""
        return {"macro_f1": pooled_macro_f1(counts)}

    def load_base(self, path: str, num_labels: int) -> torch.nn.Module:
        """The pretrained encoder (its pooler left out) under a fresh mean-pooling head.

        BERT, RoBERTa and XLM-R have a pooler, which the mean-pooling head does not read;
        DeBERTa, DistilBERT, ELECTRA and ModernBERT have none and take no such option.
        """
        import inspect

        from transformers import MODEL_MAPPING, AutoConfig, AutoModel

        from fedward.common.tasks.heads import MeanPoolClassifier

        config = AutoConfig.from_pretrained(path)
        encoder_class = MODEL_MAPPING.get(type(config), None)
        options = {}
        if encoder_class and "add_pooling_layer" in inspect.signature(encoder_class).parameters:
            options["add_pooling_layer"] = False
        encoder = AutoModel.from_pretrained(path, config=config, **options)
        return MeanPoolClassifier(encoder, num_labels)

    def peft_options(self) -> dict:
        """The head is ours, not a PEFT task type: named for PEFT to train and save beside LoRA."""
        return {"modules_to_save": ["classifier"]}

    def metrics(
        self, true_ids: list[int], pred_ids: list[int], labels: list[str]
    ) -> dict[str, float]:
        """Accuracy and macro-F1, and the counts per label id (`tp:<id>`, `fp:<id>`, `fn:<id>`)."""
        tp, fp, fn = label_counts(true_ids, pred_ids, len(labels))
        return {
            **classification_metrics(true_ids, pred_ids, len(labels)),
            **count_metrics({str(k): (tp[k], fp[k], fn[k]) for k in range(len(labels))}),
        }

    def describe_prediction(
        self,
        model: torch.nn.Module,
        tokenizer,
        labels: list[str],
        text: str,
        max_length: int,
        top: int = 3,
    ) -> list[str]:
        """The `top` most likely labels, most likely first: one line each, the label (padded to
        one width) and its probability (call under no_grad). How sure the model is shows in
        the gap between the lines, which one label alone hides."""
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        probabilities = model(**encoded).logits.float().softmax(dim=-1)[0]
        best = probabilities.topk(max(1, min(top, len(labels))))
        names = [labels[index] for index in best.indices.tolist()]
        width = max(len(name) for name in names)
        return [
            f"{name:<{width}}  {probability:.3f}"
            for name, probability in zip(names, best.values.tolist(), strict=True)
        ]


CLASSIFICATION = Classification()
