"""How the own model's choice rule moves the worth-joining figures, from the candidates'
predictions a worth-joining run logged (`python -m bench.worth_joining ... --evidence FILE`).

Each hospital's own figure is recomputed exactly as `client/personalize.py` computes it (nested
cross-validation over the same validation folds, `choose_own` with the same seeds), for each
`--confidence`: the share of paired bootstrap resamples of the validation notes a candidate built
on the global model must win against the alone model to replace it. Nothing is trained: the
predictions are the logged ones.

    python -m bench.own_choice /tmp/wj/evidence.jsonl --confidence 0.5 0.8 0.9
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from bench.worth_joining import SMALL
from fedward.client.personalize import (
    HomeRecipe,
    choose_own,
    nested_predictions,
    resample_scorer,
)
from fedward.common.tasks.classification import CLASSIFICATION


def own_figure(
    evidence: dict, confidence: float, candidates: list[str] | None = None
) -> tuple[float, str]:
    """The nested cross-validation figure of the own model under `confidence`, among
    `candidates` (default: all that were logged), minus alone's; and the candidate kept."""
    task = CLASSIFICATION
    truth, predicted, folds = evidence["truth"], evidence["predicted"], evidence["folds"]
    predicted = {name: p for name, p in predicted.items() if not candidates or name in candidates}
    labels = [str(i) for i in range(1 + max(max(truth), *(max(p) for p in predicted.values())))]

    def metric(indices: list[int], predictions: list) -> float:
        true_ids = [truth[i] for i in indices]
        pred_ids = [predictions[i] for i in indices]
        return float(task.metrics(true_ids, pred_ids, labels)[task.primary_metric])

    recipe = HomeRecipe(confidence=confidence)
    score = resample_scorer(task, truth, predicted, labels)
    everything = list(range(len(truth)))
    own = nested_predictions(predicted, folds, score, recipe, evidence["seed"])
    kept = choose_own(list(predicted), everything, score, recipe, evidence["seed"])
    return metric(everything, own) - metric(everything, predicted["alone"]), kept


def rewrite(
    evidence: list[dict], log: Path, out: Path, confidence: float, candidates: list[str] | None
) -> None:
    """`log`'s rows with the own figure, the gain and the pick recomputed from `evidence`."""
    recomputed = {}
    for row in evidence:
        gain, kept = own_figure(row, confidence, candidates)
        recomputed[(row["federation"], row["settings"], row["seed"], row["hospital"])] = (
            gain,
            kept,
        )
    with out.open("w", encoding="utf-8") as handle:
        for line in log.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            gain, kept = recomputed[
                (row["federation"], row["settings"], row["seed"], row["hospital"])
            ]
            row |= {"own": row["alone"] + gain, "gain": gain, "own_method": kept}
            row["selection"] = {
                name: score
                for name, score in row["selection"].items()
                if not candidates or name in candidates
            }
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evidence", type=Path)
    parser.add_argument("--confidence", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--candidates", nargs="+", help="the candidates to choose among")
    parser.add_argument(
        "--rewrite",
        nargs=2,
        type=Path,
        metavar=("LOG", "OUT"),
        help="write LOG's rows to OUT with own, gain and own_method recomputed at the first "
        "--confidence among --candidates (for `bench.worth_joining --report --log OUT`)",
    )
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.evidence.read_text(encoding="utf-8").splitlines()]
    if args.rewrite:
        rewrite(rows, *args.rewrite, args.confidence[0], args.candidates)
        return
    print("| federation | settings | confidence | mean own - alone | small hospitals | worst |")
    print("| --- | --- | --- | --- | --- | --- |")
    for confidence in args.confidence:
        gains: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for row in rows:
            key = (row["federation"], row["settings"])
            gains[key][row["hospital"]].append(own_figure(row, confidence, args.candidates)[0])
        for (federation, settings), hospitals in sorted(gains.items()):
            means = {h: statistics.mean(g) for h, g in hospitals.items()}
            small = [means[h] for h in SMALL.get(federation, means)]
            print(
                f"| {federation} | {settings} | {confidence:g} | "
                f"{100 * statistics.mean(means.values()):+.1f} pts | "
                f"{100 * statistics.mean(small):+.1f} pts | "
                f"{100 * min(means.values()):+.1f} pts |"
            )


if __name__ == "__main__":
    main()
