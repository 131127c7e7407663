"""Task metrics, pure: classification accuracy and macro-F1; the counts behind NER's
entity-level F1 (its scores are common/tasks/ner/entity_metrics.py, which imports this module,
never the other way round).

A hospital's evaluation also carries its counts (true positives, false positives, false
negatives per label, or per entity type for NER) under the keys `tp:<name>`, `fp:<name>`,
`fn:<name>`: the coordinator sums them over hospitals and scores the global model on all
hospitals' validation rows at once (`pooled_macro_f1`, `pooled_entity_scores`). The mean of the
hospitals' own macro-F1s is not that figure: each hospital averages over the labels it sees,
with its own label mix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

#: The counts per label (or entity type) an evaluation carries, as key prefixes `tp:` etc.
COUNT_KINDS = ("tp", "fp", "fn")


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


def ratio(part: float, whole: float) -> float:
    """part / whole, at most 1 (counts may be noised); NaN when there is nothing to divide."""
    return float(min(1.0, part / whole)) if whole > 0 else float("nan")


# --- counts, and scores from counts summed over hospitals ---------------------------------------


def label_counts(
    true_ids: Iterable[int], pred_ids: Iterable[int], num_labels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, false positives and false negatives of every label id (int64 arrays)."""
    true = np.asarray(list(true_ids), dtype=np.int64)
    pred = np.asarray(list(pred_ids), dtype=np.int64)
    right = true == pred
    tp = np.bincount(true[right], minlength=num_labels)
    fp = np.bincount(pred[~right], minlength=num_labels)
    fn = np.bincount(true[~right], minlength=num_labels)
    return tp, fp, fn


def entity_counts(
    true_tags: list[list[str]], pred_tags: list[list[str]], types: Iterable[str] = ()
) -> dict[str, tuple[int, int, int]]:
    """(TP, FP, FN) of every entity type found, and of `types` (zeros where none is), entities
    matched as seqeval does (strict IOB2: same sentence, span and type)."""
    from seqeval.scheme import IOB2, Entities

    true_entities = Entities([list(tags) for tags in true_tags], IOB2)
    pred_entities = Entities([list(tags) for tags in pred_tags], IOB2)
    counts = {}
    for entity_type in sorted(true_entities.unique_tags | pred_entities.unique_tags | set(types)):
        true_set = {e.to_tuple() for e in true_entities.filter(entity_type)}
        pred_set = {e.to_tuple() for e in pred_entities.filter(entity_type)}
        hits = len(true_set & pred_set)
        counts[entity_type] = (hits, len(pred_set) - hits, len(true_set) - hits)
    return counts


def count_metrics(counts: Mapping[str, tuple[float, float, float]]) -> dict[str, float]:
    """{name: (TP, FP, FN)} as metric entries `tp:<name>`, `fp:<name>`, `fn:<name>`."""
    return {
        f"{kind}:{name}": float(value)
        for name, values in counts.items()
        for kind, value in zip(COUNT_KINDS, values, strict=True)
    }


def split_counts(metrics: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """A hospital's evaluation metrics as (scores, counts): the `tp:`/`fp:`/`fn:` entries apart."""
    prefixes = tuple(f"{kind}:" for kind in COUNT_KINDS)
    scores = {key: value for key, value in metrics.items() if not key.startswith(prefixes)}
    counts = {key: value for key, value in metrics.items() if key.startswith(prefixes)}
    return scores, counts


def summed_counts(
    per_hospital: Iterable[Mapping[str, float]],
) -> dict[str, tuple[float, float, float]]:
    """The hospitals' count entries summed: {name: (TP, FP, FN)} (a name missing at a hospital
    counts 0 there)."""
    totals: dict[str, list[float]] = {}
    for counts in per_hospital:
        for key, value in counts.items():
            kind, name = key.split(":", 1)
            totals.setdefault(name, [0.0, 0.0, 0.0])[COUNT_KINDS.index(kind)] += float(value)
    return {name: (tp, fp, fn) for name, (tp, fp, fn) in totals.items()}


def _f1(tp: float, fp: float, fn: float) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator > 0 else 0.0


def pooled_macro_f1(counts: Mapping[str, tuple[float, float, float]]) -> float:
    """Macro-F1 from per-label (TP, FP, FN): the mean F1 over labels that occur as a true or a
    predicted label (as sklearn's `f1_score(average="macro")` over those labels). With the
    counts summed over hospitals, it is the macro-F1 over all their rows pooled; NaN with no
    label at all.

    Example:
        >>> pooled_macro_f1({"flu": (3, 1, 0), "cold": (0, 0, 1)})
        0.42857142857142855
    """
    present = [values for values in counts.values() if 2 * values[0] + values[1] + values[2] > 0]
    if not present:
        return float("nan")
    return float(np.mean([_f1(*values) for values in present]))


def pooled_entity_scores(counts: Mapping[str, tuple[float, float, float]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 from per-type (TP, FP, FN), and the same per
    type (`precision_TYPE`...), as `ner_metrics_from_ids` (tasks/ner/entity_metrics.py) names
    them; 0.0 with nothing to divide by (as seqeval). With counts summed over hospitals: the
    scores over all their sentences."""
    scores: dict[str, float] = {}
    for name, (tp, fp, fn) in sorted(counts.items()):
        if tp + fp + fn <= 0:
            continue  # a type no hospital saw nor predicted (ner_metrics lists none either)
        scores[f"precision_{name}"] = ratio(tp, tp + fp) if tp + fp > 0 else 0.0
        scores[f"recall_{name}"] = ratio(tp, tp + fn) if tp + fn > 0 else 0.0
        scores[f"f1_{name}"] = _f1(tp, fp, fn)
    tp, fp, fn = (sum(values[i] for values in counts.values()) for i in range(3))
    scores["precision"] = ratio(tp, tp + fp) if tp + fp > 0 else 0.0
    scores["recall"] = ratio(tp, tp + fn) if tp + fn > 0 else 0.0
    scores["f1"] = _f1(tp, fp, fn)
    return scores
