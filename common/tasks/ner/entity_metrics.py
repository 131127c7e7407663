"""Entity-level precision, recall and F1, computed with seqeval in strict IOB2 mode."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fedward.common.metrics import count_metrics, entity_counts

logger = logging.getLogger(__name__)

# --- metrics ------------------------------------------------------------------------------------


def ner_metrics(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict:
    """Entity-level precision, recall and F1 (seqeval, strict IOB2; see the module docstring).

    Args:
        true_tags: The true IOB2 tags, one sequence per sentence, one tag per word.
        pred_tags: The predicted tags, parallel to `true_tags` (same sentences, same lengths).

    Returns:
        {"precision", "recall", "f1": floats micro-averaged over all entities, "support": the
        number of true entities, "per_type": {TYPE: {"precision", "recall", "f1", "support"}}}.
        Types that occur only in the predictions are listed with support 0. A score with nothing
        to divide by (no predictions, or no true entities) is 0.0; no sentences give all zeros
        and an empty "per_type".

    Raises:
        ValueError: the two have a different number of sentences, or a sentence a different
            number of tags.
    """
    from seqeval.metrics.v1 import precision_recall_fscore_support
    from seqeval.scheme import IOB2, Entities

    if len(true_tags) != len(pred_tags):
        raise ValueError(f"{len(true_tags)} true sentences but {len(pred_tags)} predicted")
    for n, (true, pred) in enumerate(zip(true_tags, pred_tags, strict=True)):
        if len(true) != len(pred):
            raise ValueError(f"sentence {n}: {len(true)} true tags but {len(pred)} predicted")
    true_lists = [list(tags) for tags in true_tags]
    pred_lists = [list(tags) for tags in pred_tags]
    if not true_lists:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "per_type": {}}
    # Extract the entities once (strict IOB2) and let seqeval count and divide.
    entities = {
        "entities_true": Entities(true_lists, IOB2),
        "entities_pred": Entities(pred_lists, IOB2),
    }
    types = sorted(entities["entities_true"].unique_tags | entities["entities_pred"].unique_tags)

    def scores(average: str | None) -> tuple[Any, Any, Any, Any]:
        return precision_recall_fscore_support(
            true_lists, pred_lists, average=average, scheme=IOB2, zero_division=0, **entities
        )

    precision, recall, f1, support = scores("micro")
    metrics: dict[str, Any] = {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "support": int(support),
    }
    per_type = zip(types, *scores(None), strict=True)
    metrics["per_type"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in per_type
    }
    return metrics


def ner_metrics_from_ids(
    true_ids: list[list[int]], pred_ids: list[list[int]], labels: list[str]
) -> dict[str, float]:
    """Entity-level micro precision/recall/F1 from word-piece label ids (-100 ignored).

    Args:
        true_ids: The true label id of each piece, one row per example; -100 on pieces without
            a label (later pieces of a word, special tokens, padding).
        pred_ids: The predicted label id of each piece, rows parallel to `true_ids`.
        labels: The run's label list: id -> tag.

    Returns:
        A flat dict: "precision", "recall", "f1" (micro), `<score>_<TYPE>` for each entity type
        scored, and the counts `tp:<TYPE>`, `fp:<TYPE>`, `fn:<TYPE>` of every type found or
        listed in `labels` (`count_metrics`).

    Raises:
        ValueError: `true_ids` and `pred_ids` differ in their rows or a row's length (a
            misaligned prediction is an error, not a shorter sentence).
    """
    true_tags, pred_tags = [], []
    for true_row, pred_row in zip(true_ids, pred_ids, strict=True):
        kept = [(t, p) for t, p in zip(true_row, pred_row, strict=True) if t != -100]
        true_tags.append([labels[t] for t, _ in kept])
        pred_tags.append([labels[p] for _, p in kept])
    scores = ner_metrics(true_tags, pred_tags)
    flat: dict[str, float] = {
        "precision": scores["precision"],
        "recall": scores["recall"],
        "f1": scores["f1"],
    }
    for entity_type, type_scores in scores["per_type"].items():
        for key in ("precision", "recall", "f1"):
            flat[f"{key}_{entity_type}"] = type_scores[key]
    types = {label.split("-", 1)[1] for label in labels if label[:2] in ("B-", "I-")}
    flat.update(count_metrics(entity_counts(true_tags, pred_tags, types)))
    return flat
