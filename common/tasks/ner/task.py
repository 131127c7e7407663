"""Named-entity recognition: a tag per word of a sentence (CoNLL or entity JSON files, or
synthetic notes).

The head is Hugging Face's token-classification head; labels are IOB2 tags, scored per entity
(seqeval), and the primary metric is the entity-level micro-F1. Its data layer (reading, tag
schemes, word pieces, decoding, entity metrics) is the rest of this package.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedward.common.errors import DataError
from fedward.common.metrics import pooled_entity_scores, ratio
from fedward.common.tasks.ner.encoding import cut_long_sentences, encode_sentences
from fedward.common.tasks.ner.entity_metrics import ner_metrics_from_ids
from fedward.common.tasks.ner.formats import read_ner_file
from fedward.common.tasks.ner.schemes import Sentence, label_list
from fedward.common.tasks.ner.spans import entity_spans, predictions_to_word_tags, split_words

if TYPE_CHECKING:  # torch and the data layer load when a method needs them, not with the CLI
    import torch

    from fedward.common.data import EncodedDataset

#: Names of the training file looked for when the data path is a folder (then `*_train.json`,
#: as CMeEE names it).
TRAIN_FILES = ("train.tsv", "train.txt", "train.conll", "train.json", "train.jsonl")


class NamedEntityRecognition:
    """Entities tagged word by word; examples are sentences of (word, IOB2 tag) pairs."""

    name = "ner"
    #: The metric that sums up a round (progress lines, round tables, the bench).
    primary_metric = "f1"
    #: What one unit of (epsilon, delta)-DP protects, said next to epsilon.
    privacy_unit = "one sentence"
    #: Learning rate of the new head when the run config leaves `head_learning_rate` unset.
    head_learning_rate = 0.01
    #: What trains when the run config leaves `lora_variant` unset: LoRA (a frozen encoder's
    #: token states stopped NER at about 0.31 entity F1 even without DP, where LoRA reaches 0.69).
    lora_variant = "lora"
    #: The same, for a run that starts from an adapter (`init_adapter`).
    warm_start_lora_variant = "lora"
    #: Weight of the O tag's loss when the run config leaves `outside_tag_weight` unset. Under
    #: DP at epsilon 8, federated NCBI disease reached 0.405 and 0.383 entity F1 with 0.3,
    #: against 0.30-0.33 in four runs of the plain loss (0.350 with 0.1); utility-probes.md.
    outside_tag_weight = 0.3
    #: (metric key, column title) of the round table; the plot draws the same keys after loss.
    metric_columns = (("precision", "entity P"), ("recall", "entity R"), ("f1", "entity F1"))
    #: Simulated partitions of a pooled data set, and the one `partition = auto` means. A
    #: sentence has no single label and no group column; contiguous blocks keep documents whole.
    partitions = ("blocks", "iid")
    pooled_partition = "blocks"

    def read(
        self,
        path: str | Path,
        text_column: str,
        label_column: str,
        group_column: str | None = None,
        patient_column: str | None = None,
    ) -> list[Sentence]:
        """The sentences of a CoNLL or entity-JSON file (`ner.read_ner_file`), or of the training
        file in a folder (text and label columns unused; `patient_column` is a field of each
        entity-JSON record)."""
        path = Path(path)
        if path.is_dir():
            path = _train_file(path)
        return read_ner_file(path, patient_column)

    def label_set(self, examples: list[Sentence], source: str) -> list[str]:
        """'O', then B-X and I-X for every entity type X in `examples`."""
        return label_list(examples)

    def split(
        self, examples: list[Sentence], val_fraction: float, seed: int
    ) -> tuple[list[Sentence], list[Sentence]]:
        """The last `val_fraction` of the sentences for validation (at least one, never one
        that trains: with two sentences or more the halves are disjoint; a single sentence is
        both, and its validation figures mean nothing).

        Sentences keep their order, not shuffled (`seed` is unused).
        """
        cut = max(1, round(len(examples) * (1 - val_fraction)))
        if len(examples) > 1:
            cut = min(cut, len(examples) - 1)
        return examples[:cut], examples[cut:] or examples[-1:]

    def encode(
        self,
        examples: list[Sentence],
        labels: list[str],
        tokenizer,
        max_length: int,
        units: list[int] | None = None,
    ) -> EncodedDataset:
        """Word-piece ids and a label id per piece (-100 where the loss must not look).

        Sentences longer than `max_length` pieces are first cut at boundaries outside entities
        (`ner.cut_long_sentences`); each piece is then an example of its own. Under record-level
        DP, DP-SGD protects each piece: a sentence cut into k pieces has the group privacy of k
        examples. Under patient-level DP (`units`: each sentence's patient number) every piece
        keeps its sentence's patient, so the patient stays one unit however the text is cut.
        """
        from fedward.common.data import EncodedDataset

        label_to_id = {label: index for index, label in enumerate(labels)}
        pieces, origins = cut_long_sentences(tokenizer, examples, max_length, with_origins=True)
        encoded = encode_sentences(tokenizer, pieces, label_to_id, max_length)
        return EncodedDataset(
            [e["input_ids"] for e in encoded],
            [e["labels"] for e in encoded],
            None if units is None else [units[origin] for origin in origins],
        )

    def release_counts(self, true_ids: list, pred_ids: list, num_labels: int) -> np.ndarray:
        """What a hospital may release of an evaluation, as counts (client/privacy/release.py):
        sentences, and sentences tagged exactly right. A sentence holds any number of entities,
        so entity counts have no bound; these two have L2 sensitivity sqrt(2)."""
        exact = sum(
            all(t == p for t, p in zip(true, pred) if t != -100)
            for true, pred in zip(true_ids, pred_ids)
        )
        return np.array([len(true_ids), exact], dtype=np.float64)

    release_sensitivity = math.sqrt(2.0)

    def metrics_from_counts(self, vector: np.ndarray, num_labels: int) -> dict[str, float]:
        """The released metrics: sentence count and sentence accuracy (entity F1 is not
        released outside simulation)."""
        examples = float(vector[0])
        return {"num-examples": examples, "sentence_accuracy": ratio(vector[1], examples)}

    #: The scores the coordinator computes from the hospitals' summed entity counts
    #: (`pooled_metrics`), with their per-type forms (`f1_TYPE`...), instead of averaging the
    #: hospitals' own. Only simulated hospitals report entity counts: a deployed one releases
    #: none (`release_counts`), so a deployment has no entity F1 at all.
    pooled_scores = ("precision", "recall", "f1")
    pooled_scores_name = "entity P/R/F1"
    rows_name = "sentences"

    def pooled_metrics(self, counts: dict[str, tuple[float, float, float]]) -> dict[str, float]:
        """Entity micro precision, recall and F1 (and per type) over all hospitals' validation
        sentences, from their per-type entity counts summed."""
        return pooled_entity_scores(counts)

    def load_base(self, path: str, num_labels: int) -> torch.nn.Module:
        """The pretrained encoder with Hugging Face's fresh token-classification head."""
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(path, num_labels=num_labels)

    def peft_options(self) -> dict:
        """Token classification is PEFT's own task type, which trains and saves its head."""
        from peft import TaskType

        return {"task_type": TaskType.TOKEN_CLS}

    def metrics(
        self, true_ids: list[list[int]], pred_ids: list[list[int]], labels: list[str]
    ) -> dict[str, float]:
        """Entity-level micro precision, recall and F1, the same per entity type, and the
        entity counts per type (`tp:<TYPE>`...: exact, so simulation and local audit only)."""
        return ner_metrics_from_ids(true_ids, pred_ids, labels)

    def describe_prediction(
        self,
        model: torch.nn.Module,
        tokenizer,
        labels: list[str],
        text: str,
        max_length: int,
        top: int = 3,
    ) -> list[str]:
        """The entities found, one line each with its type, words and character span
        [start:end) in `text`, in the order of the text (under no_grad; `top` is
        classification's: every entity found is listed). Words are split as the corpora are
        (`ner.split_words`: each Chinese character on its own), so spans count characters of
        the original text; a text longer than `max_length` pieces is read piece by piece, none
        of it truncated away."""
        words, offsets = split_words(text)
        if not words:
            return ["(no words)"]
        id_to_label = dict(enumerate(labels))
        tags: list[str] = []
        for piece in cut_long_sentences(tokenizer, [[(w, "O") for w in words]], max_length):
            piece_words = [word for word, _ in piece]
            encoded = tokenizer(
                piece_words,
                is_split_into_words=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            predictions = model(**encoded).logits.argmax(dim=-1)[0].tolist()
            tags += predictions_to_word_tags(
                predictions, encoded.word_ids(0), id_to_label, len(piece_words)
            )
        spans = entity_spans(words, tags, text=text, offsets=offsets)
        found = [
            f"{span.entity_type} '{span.text}' [{span.start_char}:{span.end_char}]"
            for span in spans
        ]
        return found or ["(no entities)"]


def _train_file(folder: Path) -> Path:
    for name in TRAIN_FILES:
        if (folder / name).is_file():
            return folder / name
    prefixed = sorted(folder.glob("*_train.json")) + sorted(folder.glob("*_train.jsonl"))
    if len(prefixed) == 1:
        return prefixed[0]
    raise DataError(
        f"{folder}: no train.tsv/train.txt/train.conll/train.json (or one *_train.json) in this "
        "folder; pass a file"
    )


NER = NamedEntityRecognition()
