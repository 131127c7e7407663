"""DP recipe sweep: many training settings under DP, trained side by side, ranked by utility.

`bench.utility` measures the real path (Flower's simulation, SecAgg+, one process per hospital)
and takes 10-20 minutes a row on a 2-core CPU, too slow to search a recipe with. This sweep
trains the same model with the same trainer (`client.trainer.train_locally`: Opacus, the
frozen-prefix cache, the run's DP plan) and the same FedAvg arithmetic
(`server.aggregation`), but in one process per setting and without the transport and the secure
sum, so that a grid of settings runs in parallel worker processes (several per GPU where one is
present). Settings:

- `central`: all training examples at one site (what `bench.utility` calls pooled);
- `federated`: the `bench.utility` shares (Dirichlet(0.5) label skew for classification,
  contiguous blocks for NER, `--hospitals` of them), FedAvg weighted by examples.

Corpora: Medical Abstracts and NCBI disease as in `bench.utility`, or `synthetic` (fedward's
synthetic notes, the default `fedward simulate` data: `--hospitals` hospitals of
`notes_per_hospital` notes, scored on the pooled validation splits).

`--grid FIELD=V1,V2 ...` takes the product of RunConfig values; `--set FIELD=VALUE` fixes one
for all. Each setting is trained `--repeats` times (the DP noise and batches come from the OS).

    python -m bench.dp_recipe --corpus ner --setting central \\
        --grid batch_size=64,256 learning_rate=5e-3,2e-2 --jobs 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from bench.utility import SHARED, parse_overrides, read_corpus, shares
from fedward.common.config import RunConfig, flat_names

#: Settings of the sweep rows that are not RunConfig fields.
SETTINGS = ("central", "federated")


def load_corpus(corpus: str, args) -> tuple[str, list, list, list[str], list[list[int]]]:
    """(task, train examples, test examples, labels, hospital shares of the train examples)."""
    if corpus == "synthetic":
        return _synthetic(args)
    task, train, test, labels = read_corpus(corpus, args.seed, args.max_train)
    return task, train, test, labels, shares(corpus, train, args.hospitals, 0.5, args.seed)


def _synthetic(args) -> tuple[str, list, list, list[str], list[list[int]]]:
    """The default simulation's notes: each hospital's train split, and all val splits pooled."""
    from fedward.simulation.synthetic import synthetic_examples

    values = RunConfig.build(args.fixed)
    task = values.spec.task.definition
    train, test, parts = [], [], []
    for hospital in range(args.hospitals):
        notes = synthetic_examples(
            task.name, hospital, values.simulation.notes_of(hospital), args.seed, args.hospitals
        )
        own_train, own_val = task.split(
            notes, values.data_schema.val_fraction, args.seed + hospital
        )
        parts.append(list(range(len(train), len(train) + len(own_train))))
        train += own_train
        test += own_val
    labels = task.label_set(train + test, "synthetic notes")
    return values.spec.task.name, train, test, labels, parts


def train_setting(corpus: str, setting: str, values: dict, args) -> dict:
    """Train one setting to the end of its rounds and score it on the test examples."""
    import torch

    from fedward.client.trainer import evaluate, train_locally
    from fedward.common.model import build_model, get_adapter_arrays, load_tokenizer
    from fedward.server.aggregation import apply_average, weighted_sum

    started = time.monotonic()
    torch.set_num_threads(args.threads)
    task, train, test, labels, parts = load_corpus(corpus, args)
    if setting == "central":
        parts = [list(range(len(train)))]
    config = RunConfig.build(
        {
            **args.fixed,
            **values,
            "task": task,
            "labels": labels,
            "seed": args.seed,
            "hospitals": len(parts),
            "min_hospitals": 1,
        }
    )
    tokenizer = load_tokenizer(config.spec.model.name)
    model = build_model(config.spec, len(labels))
    encode = config.spec.task.definition.encode
    sites = [
        encode([train[i] for i in share], labels, tokenizer, config.spec.task.max_length)
        for share in parts
    ]
    arrays = get_adapter_arrays(model)
    histories: list[list] = [[] for _ in sites]
    from fedward.client import prefix_cache

    builds = prefix_cache.build_count
    epsilon = None
    for _ in range(config.spec.federation.rounds):
        updates = []
        for hospital, dataset in enumerate(sites):
            result = train_locally(
                model,
                dataset,
                config,
                arrays,
                histories[hospital],
                tokenizer.pad_token_id,
                who=f"hospital-{hospital}",
            )
            histories[hospital] = result.history
            epsilon = result.epsilon_spent
            updates.append((result.delta, float(result.num_examples)))
        summed, weight = weighted_sum(updates)
        arrays = apply_average(arrays, summed, weight)
    metrics = evaluate(
        model,
        encode(test, labels, tokenizer, config.spec.task.max_length),
        config.spec.task.definition,
        arrays,
        tokenizer.pad_token_id,
        labels,
        config.local.device,
    )
    return {
        "score": metrics[config.spec.task.definition.primary_metric],
        "epsilon": epsilon,
        "seconds": time.monotonic() - started,
        "cached": prefix_cache.build_count > builds,
    }


def grid_settings(pairs: list[str], fixed: dict | None = None) -> list[dict]:
    """The product of `FIELD=V1,V2` pairs, as RunConfig value dicts (checked up front, together
    with the `fixed` values: the corpus's task and `--set`)."""
    axes = []
    for pair in pairs:
        key, sep, values = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or (key not in flat_names(RunConfig) and key != "setting"):
            raise SystemExit(f"--grid {pair!r}: expected FIELD=V1,V2 with a RunConfig field")
        axes.append([(key, value.strip()) for value in values.split(",")])
    settings = [dict(choice) for choice in itertools.product(*axes)]
    for values in settings:
        fields = {k: v for k, v in values.items() if k != "setting"}
        try:
            RunConfig.build({**(fixed or {}), **fields}, source="--grid")
        except Exception as exc:  # a bad value names its field before any training
            raise SystemExit(str(exc)) from None
    return settings


def parse_args() -> argparse.Namespace:
    """The sweep's command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=["classification", "ner", "synthetic"], required=True)
    parser.add_argument("--setting", choices=SETTINGS, default="central")
    parser.add_argument("--grid", nargs="*", default=[], metavar="FIELD=V1,V2")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", dest="fixed_pairs")
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-train", type=int, default=0, help="cap training examples (0: all)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="settings trained at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--write", type=Path, help="also write the markdown table here")
    parser.add_argument("--log", type=Path, help="append each finished run here as a JSON line")
    return parser.parse_args()


def sweep_table(args, settings: list[dict], runs: dict[int, list[dict]], seconds: float) -> str:
    """The markdown table of the sweep: one row per setting, the best mean score first."""
    lines = [
        f"# DP recipe sweep: {args.corpus}, {args.setting}",
        "",
        f"Command: `python -m bench.dp_recipe {shlex.join(sys.argv[1:])}`",
        "",
        "| setting | score (mean) | runs | epsilon | s per run | prefix cache |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    order = sorted(runs, key=lambda i: -statistics.mean(r["score"] for r in runs[i]))
    for index in order:
        scores = [r["score"] for r in runs[index]]
        epsilon = runs[index][0]["epsilon"]
        lines.append(
            f"| {describe(settings[index])} | {statistics.mean(scores):.3f} | "
            f"{', '.join(f'{s:.3f}' for s in scores)} | "
            f"{'-' if epsilon is None else f'{epsilon:.2f}'} | "
            f"{statistics.mean(r['seconds'] for r in runs[index]):.0f} | "
            f"{'yes' if all(r['cached'] for r in runs[index]) else 'no'} |"
        )
    lines += ["", f"Total time: {seconds / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main() -> None:
    logging.disable(logging.WARNING)
    args = parse_args()
    task = "ner" if args.corpus == "ner" else "classification"  # synthetic: --set task=...
    args.fixed = parse_overrides(args.fixed_pairs, (task,))
    if args.corpus != "synthetic" and not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: the {args.corpus} corpus is read from there")
    settings = grid_settings(args.grid, {"task": task, **args.fixed}) or [{}]

    started = time.monotonic()
    runs: dict[int, list[dict]] = {i: [] for i in range(len(settings))}
    context = multiprocessing.get_context("spawn")  # CUDA cannot be shared with a fork
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {}
        for index, values in enumerate(settings):
            setting = values.get("setting", args.setting)
            fields = {k: v for k, v in values.items() if k != "setting"}
            for _ in range(args.repeats):
                future = pool.submit(train_setting, args.corpus, setting, fields, args)
                futures[future] = index
        for future in as_completed(futures):
            index = futures[future]
            run = future.result()
            runs[index].append(run)
            if args.log:
                with args.log.open("a", encoding="utf-8") as handle:
                    handle.write(
                        json.dumps(
                            {
                                "corpus": args.corpus,
                                "setting": args.setting,
                                "max_train": args.max_train,
                                "values": settings[index],
                                **run,
                            }
                        )
                        + "\n"
                    )
            print(
                f"  {describe(settings[index])}: {run['score']:.3f} "
                f"(epsilon {run['epsilon']}, {run['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

    table = sweep_table(args, settings, runs, time.monotonic() - started)
    print(table)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(table, encoding="utf-8")


def describe(values: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items()) or "defaults"


if __name__ == "__main__":
    main()
