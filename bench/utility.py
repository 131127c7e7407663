"""Utility on real corpora: how close federated, private training gets to pooled training.

For each corpus (Medical Abstracts classification with a fixed, seeded 20% test split; NCBI
disease NER with its own train/test files) and the same base model, seed and optimizer steps
per example (`--rounds` rounds of `local_epochs` passes over every training example), trains:

- centralized without DP (all training data pooled, one site);
- centralized with DP at epsilon 8 (what privacy costs without federation);
- local-only: each hospital alone on its share (mean and worst over hospitals);
- federated without DP;
- federated with DP at each `--epsilons` (delta 1e-5);
- federated FFA-LoRA (A frozen, only B trained and sent) with the same DP settings;

Every row but the last trains what the task trains by default (`lora_variant` unset: the head
alone for classification, LoRA for NER; `--set lora_variant=...` changes it), so its ratios are
those of issue 17's targets. 3 hospitals, Dirichlet(0.5) label skew for classification and
contiguous blocks for NER; every final adapter is scored on the same test set: macro-F1
(classification), entity micro-F1 (NER). Prints one markdown table (and writes it with `--write`).

    python -m bench.utility --corpus both --write bench/results/utility.md

To probe one setting on a few rows: `--only` trains just the rows whose name contains one of its
texts, and `--set` changes RunConfig fields for every row, e.g.

    python -m bench.utility --corpus ner --only "federated LoRA, DP epsilon 8" --set lora_layers=0

The DP rows draw their noise and batches from the OS, so they differ from run to run:
`--repeats N` trains each of them N times and reports the mean with the lowest and highest run.
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

from fedward.common.config import RunConfig, flat_names
from fedward.common.data import Record, read_records
from fedward.common.errors import ConfigError
from fedward.simulation import partition

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

#: How the rows name what trains (`lora_variant`).
VARIANT_NAMES = {"head": "head-only", "lora": "LoRA", "ffa": "FFA-LoRA"}
#: Issue 17's target for centralized DP at epsilon 8 against centralized training without DP.
DP_ALONE_TARGET = {"classification": 0.97, "ner": 0.75}


def split_classification(
    path: Path, seed: int, max_train: int | None
) -> tuple[list[Record], list[Record]]:
    records = read_records(path, "medical_abstract", "condition_label")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cut = int(len(order) * 0.8)
    train = [records[i] for i in order[:cut]]
    test = [records[i] for i in order[cut:]]
    if max_train:
        train = train[:max_train]
    return train, test


def read_corpus(corpus: str, seed: int, max_train: int | None) -> tuple[str, list, list, list]:
    """(task, training examples, test examples, labels) of a shared corpus: Medical Abstracts
    (`classification`, seeded 80/20 split) or NCBI disease (`ner`, its own test file)."""
    if corpus == "classification":
        train, test = split_classification(
            SHARED / "medical_abstracts" / "medical_tc.csv", seed, max_train
        )
        return "classification", train, test, sorted({r.label for r in train + test})
    from fedward.common.tasks.ner import label_list, read_conll_splits

    splits = read_conll_splits(SHARED / "ncbi_disease")
    train = splits["train"][:max_train] if max_train else splits["train"]
    return "ner", train, splits["test"], label_list(train + splits["test"])


def write_csv(records: list[Record], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([r.text, r.label] for r in records)
    return path


def write_conll(sentences: list, path: Path) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for sentence in sentences:
            handle.writelines(f"{token}\t{tag}\n" for token, tag in sentence)
            handle.write("\n")
    return path


def shares(corpus: str, train: list, hospitals: int, alpha: float, seed: int) -> list[list[int]]:
    if corpus == "classification":
        return partition.dirichlet([r.label for r in train], hospitals, alpha, seed)
    return partition.blocks(len(train), hospitals)


def train_and_score(config: RunConfig, test: list) -> float:
    """Run a simulation, then score its final adapter on `test` (in this process)."""
    from fedward.client.app import encode
    from fedward.client.trainer import evaluate
    from fedward.common.model import build_model, load_tokenizer
    from fedward.simulation.runner import simulate

    result = simulate(config)
    config = config.updated(**{"labels": result_labels(result)})
    tokenizer = load_tokenizer(config.spec.model.name)
    model = build_model(config.spec, len(config.spec.task.labels))
    metrics = evaluate(
        model,
        encode(test, config.spec.task, tokenizer, per_patient=config.spec.privacy.per_patient),
        config.spec.task.definition,
        result.arrays,
        tokenizer.pad_token_id,
        config.spec.task.labels,
        config.local.device,
    )
    return metrics[config.spec.task.definition.primary_metric]


def result_labels(result) -> list[str]:
    import json

    return json.loads((result.adapter_dir / "fedward.json").read_text())["labels"]


#: A run of one hospital on its data alone: the centralized and local-only rows.
ALONE = {
    "hospitals": 1,
    "min_hospitals": 1,
    "partition": "iid",
    "dp": False,
    "secure_aggregation": False,
}


def common_values(task: str, labels: list[str], args) -> dict:
    """The options every row of a corpus shares (the command line's overrides last)."""
    common = {
        "task": task,
        "labels": labels,
        "rounds": args.rounds,
        "seed": args.seed,
        "max_length": args.max_length,
        "model": args.model,
        "text_column": "text",
        "label_column": "label",
        "val_fraction": 0.1,
    }
    common.update(args.overrides)
    return common


def summary_rows(
    scores: dict[str, float],
    local: list[float],
    task: str,
    central: str,
    central_private: str,
    plain: str,
    private: str,
) -> list[tuple[str, str]]:
    """The ratios of the issue's targets, and what federating gave over local-only training,
    from the rows scored."""
    rows: list[tuple[str, str]] = []
    alone_target = f"target >= {DP_ALONE_TARGET[task]:.2f}"
    ratios = (  # (numerator, denominator, label): the targets first
        (private, central_private, "federated DP / centralized DP, epsilon 8 (target >= 0.97)"),
        (central_private, central, f"centralized DP / no DP, epsilon 8 ({alone_target})"),
        (private, central, "federated DP epsilon 8 / centralized no DP"),
    )
    for numerator, denominator, label in ratios:
        if scores.get(denominator) and numerator in scores:
            rows.append((f"ratio: {label}", f"{scores[numerator] / scores[denominator]:.2f}"))
    if plain in scores and local:
        gain = 100 * (scores[plain] - sum(local) / len(local))
        rows.append(
            ("federated no DP minus local-only mean, points (target >= +5)", f"{gain:+.1f}")
        )
    return rows


def run_corpus(corpus: str, args, work: Path) -> list[tuple[str, str]]:
    task, train, test, labels = read_corpus(corpus, args.seed, args.max_train)
    write, suffix = (write_csv, ".csv") if task == "classification" else (write_conll, ".tsv")
    common = common_values(task, labels, args)
    pooled = write(train, work / f"{corpus}-train{suffix}")
    parts = shares(corpus, train, args.hospitals, 0.5, args.seed)
    scheme = "dirichlet" if task == "classification" else "blocks"
    rows: list[tuple[str, str]] = []
    scores: dict[str, float] = {}

    def wanted(name: str) -> bool:
        return not args.only or any(part in name for part in args.only)

    def score(name: str, **values) -> float:
        started = time.monotonic()
        config = RunConfig.build({**common, **values, "out": str(work / name.replace(" ", "-"))})
        value = train_and_score(config, test)
        print(
            f"  {corpus}: {name}: {value:.3f} ({time.monotonic() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        return value

    def row(name: str, **values) -> None:
        """Train and score the row `name` unless `--only` leaves it out.

        A DP row is trained `--repeats` times (its noise and batches are drawn from the OS, so
        runs differ); its score is the mean, shown with the lowest and highest run.
        """
        if not wanted(name):
            return
        runs = args.repeats if values.get("dp", True) else 1
        results = [
            score(name if runs == 1 else f"{name} run {i + 1}", **values) for i in range(runs)
        ]
        scores[name] = sum(results) / runs
        cell = f"{scores[name]:.3f}"
        if runs > 1:
            cell += f" ({min(results):.3f}-{max(results):.3f}, {runs} runs)"
        rows.append((name, cell))

    # The rows train what the task trains by default (head-only for classification, LoRA for
    # NER), so the ratios are those of the targets; FFA-LoRA is the one extra variant.
    variant = RunConfig.build(common).spec.model.lora_variant
    what = VARIANT_NAMES[variant]
    central = f"centralized {what}, no DP (pooled)"
    row(central, data=str(pooled), **ALONE)
    # DP on the pooled data: what privacy alone costs, without federation
    central_private = f"centralized {what}, DP epsilon 8 (pooled)"
    row(central_private, data=str(pooled), **ALONE | {"dp": True, "target_epsilon": 8.0})
    local = []
    name = "local-only, no DP (mean / worst of 3)"
    if wanted(name):
        for hospital, indices in enumerate(parts):
            own = write([train[i] for i in indices], work / f"{corpus}-hospital{hospital}{suffix}")
            local.append(score(f"local-only hospital {hospital}", data=str(own), **ALONE))
        rows.append((name, f"{sum(local) / len(local):.3f} / {min(local):.3f}"))
    federated = {
        "data": str(pooled),
        "hospitals": args.hospitals,
        "partition": scheme,
        "alpha": 0.5,
    }
    plain = f"federated {what}, no DP"
    row(plain, **federated, dp=False)
    for each in dict.fromkeys([variant, "ffa"]):
        for epsilon in args.epsilons:
            row(
                f"federated {VARIANT_NAMES[each]}, DP epsilon {epsilon:g}",
                **federated,
                lora_variant=each,
                target_epsilon=epsilon,
            )
    private = f"federated {what}, DP epsilon 8"
    rows += summary_rows(scores, local, task, central, central_private, plain, private)
    return rows


def parse_overrides(
    pairs: list[str], tasks: tuple[str, ...] = ("classification",)
) -> dict[str, str]:
    """`FIELD=VALUE` pairs for RunConfig fields (pydantic converts the strings), checked up front
    for each of `tasks` (a value may apply to one task only, as NER's `outside_tag_weight`).

    They apply to every row, except where a row sets the field itself (every row's data, hospitals
    and partition; the centralized and local-only rows' DP; the DP rows' epsilon and LoRA variant).
    """
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in flat_names(RunConfig):
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with a RunConfig field")
        overrides[key] = value.strip()
    try:  # a bad value names its field now, before any training
        for task in tasks:
            RunConfig.build({"task": task, **overrides}, source="--set")
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    return overrides


def main() -> None:
    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=["classification", "ner", "both"], default="both")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds (each local_epochs passes over every example)"
    )
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--max-train", type=int, default=0, help="cap training examples (0: all)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--model", default="all-MiniLM-L6-v2", help="base model (default: packaged)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="TEXT",
        help="train only the rows whose name contains one of these (e.g. 'DP epsilon 8')",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        dest="settings",
        help="RunConfig values for every row (e.g. learning_rate=0.001 max_grad_norm=0.5)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="train each DP row this many times; its score is the mean (with min-max)",
    )
    parser.add_argument("--write", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    corpora = ["classification", "ner"] if args.corpus == "both" else [args.corpus]
    args.overrides = parse_overrides(args.settings, tuple(corpora))
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: the utility benchmark needs the shared corpora")

    started = time.monotonic()
    lines = [
        "# Utility on real corpora",
        "",
        f"Command: `python -m bench.utility {shlex.join(sys.argv[1:])}`",
        "",
        (
            f"Base model {args.model}, {args.hospitals} hospitals, {args.rounds} rounds "
            f"(each `local_epochs` passes over every training example), seed {args.seed}, "
            f"max length {args.max_length}, "
            "delta 1e-5, other settings at RunConfig defaults. Classification: Medical Abstracts, "
            "seeded 80/20 split, Dirichlet(0.5) label skew, macro-F1 on the 20% test split. NER: "
            "NCBI disease, contiguous blocks, entity micro-F1 (seqeval, strict IOB2) on its test "
            "file."
        ),
        "",
        *([f"Settings changed from the defaults: {args.overrides}", ""] if args.overrides else []),
    ]
    with tempfile.TemporaryDirectory() as folder:
        for corpus in corpora:
            rows = run_corpus(corpus, args, Path(folder))
            metric = "macro-F1" if corpus == "classification" else "entity micro-F1"
            lines += [f"## {corpus} ({metric})", "", "| setting | score |", "| --- | --- |"]
            lines += [f"| {name} | {value} |" for name, value in rows]
            lines.append("")
    lines.append(f"Total time: {(time.monotonic() - started) / 60:.1f} min on this machine.")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
