"""Task metrics, pure: classification accuracy and macro-F1; NER entity-level F1 (seqeval)."""

from __future__ import annotations

import numpy as np


def classification_metrics(
    true_ids: list[int], pred_ids: list[int], num_labels: int
) -> dict[str, float]:
    """Accuracy and macro-F1 over the labels present in `true_ids` or `pred_ids`."""
    from sklearn.metrics import f1_score

    if not true_ids:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    true = np.asarray(true_ids)
    pred = np.asarray(pred_ids)
    present = sorted(set(true.tolist()) | set(pred.tolist()))
    return {
        "accuracy": float((true == pred).mean()),
        "macro_f1": float(f1_score(true, pred, labels=present, average="macro", zero_division=0)),
    }


def ner_metrics_from_ids(
    true_ids: list[list[int]], pred_ids: list[list[int]], labels: list[str]
) -> dict[str, float]:
    """Entity-level micro precision/recall/F1 from word-piece label ids (-100 ignored)."""
    from fedward.common.ner import ner_metrics

    true_tags, pred_tags = [], []
    for true_row, pred_row in zip(true_ids, pred_ids):
        kept = [(t, p) for t, p in zip(true_row, pred_row) if t != -100]
        true_tags.append([labels[t] for t, _ in kept])
        pred_tags.append([labels[p] for _, p in kept])
    scores = ner_metrics(true_tags, pred_tags)
    flat = {
        "precision": scores["precision"],
        "recall": scores["recall"],
        "f1": scores["f1"],
    }
    for entity_type, type_scores in scores["per_type"].items():
        for key in ("precision", "recall", "f1"):
            flat[f"{key}_{entity_type}"] = type_scores[key]
    return flat


def ratio(part: float, whole: float) -> float:
    """part / whole, at most 1 (counts may be noised); NaN when there is nothing to divide."""
    return float(min(1.0, part / whole)) if whole > 0 else float("nan")
