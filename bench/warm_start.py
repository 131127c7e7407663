"""Warm start: federated DP from an adapter trained on public data, against cold start and pooled.

Issue 30. Each shared corpus's training split is cut in two, seeded: a public part
(`--public-fraction`, e.g. 20%), which the coordinator trains on centrally without DP
(`fedward pretrain`'s path: one site, no DP, no secure aggregation), and the rest, split across
3 hospitals as their private data (Dirichlet(0.5) label skew for Medical Abstracts, contiguous
blocks for NCBI disease, as in bench/utility.py). Every model is scored on the same test split
(macro-F1; entity micro-F1). The cells:

- `pooled`: centralized, no DP, on all the training data (public and private pooled);
- `public`: the starting adapter alone, trained on the public part (what warm starting adds to);
- `warm`: federated DP on the private parts from the public adapter (`init_adapter`);
- `cold`: federated DP on the private parts from a fresh adapter.

`--variant` picks what trains in the pooled, warm and cold cells (head or lora); the public
adapter is always trained with LoRA (a head-only warm run keeps its LoRA factors frozen: the
head trains under DP on an encoder adapted to the task on public data). DP cells draw noise from
the OS, so `--repeats` runs each; every finished run appends one JSON line to `--log` at once
(the table is rendered from that file with `--table`), so an interrupted benchmark keeps what
finished.

    python -m bench.warm_start --corpus ner --cells public warm cold --repeats 3 \\
        --log bench/results/warm_start-runs.jsonl
    python -m bench.warm_start --table bench/results/warm_start-runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.utility import SHARED, read_corpus, shares, train_and_score, write_conll, write_csv
from fedward.common.config import RunConfig

CELLS = ("pooled", "public", "warm", "cold")


def public_split(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(public, private) indices of a training split of `size` examples: a seeded sample of
    `fraction` of them is public, the rest private; disjoint, each in the split's order."""
    order = list(range(size))
    random.Random(f"public-{seed}").shuffle(order)
    cut = round(size * fraction)
    return sorted(order[:cut]), sorted(order[cut:])


def run(args: argparse.Namespace, work: Path) -> None:
    task, train, test, labels = read_corpus(args.corpus, args.seed, 0)
    write, suffix = (write_csv, ".csv") if task == "classification" else (write_conll, ".tsv")
    public_ids, private_ids = public_split(len(train), args.public_fraction, args.seed)
    public = [train[i] for i in public_ids]
    private = [train[i] for i in private_ids]
    common = {
        "task": task,
        "labels": labels,
        "rounds": args.rounds,
        "seed": args.seed,
        "max_length": 128,
        "text_column": "text",
        "label_column": "label",
        "val_fraction": 0.1,
        "workers": args.workers,
    }
    alone = {"hospitals": 1, "min_hospitals": 1, "partition": "iid", "dp": False}
    alone["secure_aggregation"] = False
    federated = {
        "hospitals": 3,
        "partition": "dirichlet" if task == "classification" else "blocks",
        "alpha": 0.5,
        "data": str(write(private, work / f"private{suffix}")),
    }
    private_shares = shares(args.corpus, private, 3, 0.5, args.seed)
    adapter = args.adapter

    def record(cell: str, variant: str, score: float, seconds: float, **extra) -> None:
        line = {
            "corpus": args.corpus,
            "cell": cell,
            "variant": variant,
            "public_fraction": args.public_fraction,
            "epsilon": None if cell in ("pooled", "public") else args.epsilon,
            "score": round(score, 4),
            "seconds": round(seconds),
            "rounds": args.rounds,
            "seed": args.seed,
            "train": len(train),
            "public": len(public),
            "private_per_hospital": [len(share) for share in private_shares],
            **extra,
        }
        print(json.dumps(line), file=sys.stderr, flush=True)
        if args.log:
            with args.log.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")

    def score(name: str, values: dict) -> tuple[float, float, RunConfig]:
        started = time.monotonic()
        config = RunConfig.build({**common, **values, "out": str(work / name)})
        return train_and_score(config, test), time.monotonic() - started, config

    if "pooled" in args.cells:
        pooled = str(write(train, work / f"pooled{suffix}"))
        value, seconds, _ = score("pooled", {**alone, "data": pooled, "lora_variant": args.variant})
        record("pooled", args.variant, value, seconds)
    if "public" in args.cells:
        data = str(write(public, work / f"public{suffix}"))
        value, seconds, _ = score("public", {**alone, "data": data, "lora_variant": "lora"})
        adapter = work / "public" / "adapter"
        record("public", "lora", value, seconds)
    private_cells = [cell for cell in ("warm", "cold") if cell in args.cells]
    if "warm" in private_cells and adapter is None:
        raise SystemExit("the warm cell needs the public cell first, or --adapter")
    for repeat in range(args.repeats):  # warm and cold in turn: a stopped run leaves pairs
        for cell in private_cells:
            start = {"init_adapter": str(adapter)} if cell == "warm" else {}
            values = {**federated, **start, "lora_variant": args.variant}
            values["target_epsilon"] = args.epsilon
            value, seconds, _ = score(f"{cell}-{args.variant}-{repeat}", values)
            record(cell, args.variant, value, seconds)


def table(log: Path) -> str:
    """The runs of `log` as one markdown table: mean over runs, the runs in brackets."""
    runs: dict[tuple, list[float]] = defaultdict(list)
    for line in log.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            key = (
                item["corpus"],
                item["public_fraction"],
                item["cell"],
                item["variant"],
                item["epsilon"],
            )
            runs[key].append(item["score"])
    rows = ["| corpus | public | cell | trains | epsilon | score (runs) |", "| --- " * 6 + "|"]
    for (corpus, fraction, cell, variant, epsilon), scores in sorted(
        runs.items(), key=lambda kv: tuple(str(part) for part in kv[0])
    ):
        mean = sum(scores) / len(scores)
        shown = f"{mean:.3f}" + (
            f" ({', '.join(f'{s:.3f}' for s in scores)})" if len(scores) > 1 else ""
        )
        eps = "no DP" if epsilon is None else f"{epsilon:g}"
        rows.append(f"| {corpus} | {fraction:.0%} | {cell} | {variant} | {eps} | {shown} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, help="print the table of this log and stop")
    parser.add_argument("--corpus", choices=["classification", "ner"], default="classification")
    parser.add_argument("--variant", choices=["head", "lora"], default=None)
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    parser.add_argument("--public-fraction", type=float, default=0.2)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=0, help="simulation workers (0: auto)")
    parser.add_argument("--adapter", type=Path, help="a public adapter already trained")
    parser.add_argument("--log", type=Path, help="append one JSON line per finished run here")
    parser.add_argument(
        "--work", type=Path, help="keep the runs' outputs (the public adapter) here, not in a temp"
    )
    args = parser.parse_args()
    if args.table:
        print(table(args.table), end="")
        return
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: the warm-start benchmark needs the shared corpora")
    if not 0 < args.public_fraction < 1:
        parser.error("--public-fraction must be between 0 and 1")
    args.variant = args.variant or ("head" if args.corpus == "classification" else "lora")
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        run(args, args.work)
        return
    with tempfile.TemporaryDirectory() as folder:
        run(args, Path(folder))


if __name__ == "__main__":
    main()
