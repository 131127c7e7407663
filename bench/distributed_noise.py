"""Distributed DP noise against today's local noise and the pooled-DP limit (issue 39).

At patient-level DP (epsilon 8, delta 1e-5), on the simulation's synthetic hospitals:

- `pooled`: one site holding every hospital's training patients, DP over the union: the limit.
  Both recipes are run on it (DP-FedSGD with the whole noise, t = 1, and the local DP-SGD
  recipe) and the better one is the limit, so no ratio is flattered by a weak denominator;
- `local`: today's local noise, each hospital adding all of the noise (`train_locally`, FedAvg);
- `distributed`: each hospital adds 1/t of the noise to one clipped gradient sum per round, the
  coordinator steps on the sum (`noisy_gradient_sum`, `server_step`).

The hospitals' data and splits are exactly the simulation's (`simulation.hospitals`, validation
split by patient); the score is the global model's macro-F1 over all hospitals' validation notes
pooled, as `fedward simulate` reports it. The rounds run in this one process without Flower,
Ray or masking: SecAgg+'s sum of integer vectors is exact modulo 2^64, so adding the hospitals'
vectors here gives the coordinator the very same sum (tests/deploy and the simulation tests run
the masked protocol). One line per (federation, arm, seed) is appended to `--log` as it comes;
`--report` prints the table.

    python -m bench.distributed_noise --federations small10 default --seeds 1 2 3
    python -m bench.distributed_noise --report
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from fedward.common.config import RunConfig

FEDERATIONS = {
    "small10": {"hospitals": 10, "notes_per_hospital": "200", "noise_hospitals": 5},
    "default": {"hospitals": 3, "notes_per_hospital": "700", "noise_hospitals": 3},
}
ARMS = ("pooled", "local", "distributed")
#: The distributed-noise recipe measured here (also `fedward simulate`'s defaults for it where
#: the spec's own defaults differ): docs/privacy.md quotes it.
DISTRIBUTED = {"noise": "distributed", "rounds": 30}


def hospitals_of(values: dict):
    """The simulation's hospitals (training and validation records) and its prepared config."""
    from bench.worth_joining import hospital_shares
    from fedward.simulation.hospitals import prepare_config

    config = prepare_config(RunConfig.build(values, source="bench"))
    shares = hospital_shares(
        config.spec.task, config.spec.training.seed, config.simulation, config.data_schema
    )
    return config, shares


def run_arm(
    config: RunConfig, trains: list[list], vals: list[list], site: str = "hospital"
) -> float:
    """One federated run of `config` on hospitals holding `trains`; the global macro-F1 on
    `vals` pooled."""
    from fedward.client.app import encode
    from fedward.client.model_cache import cached_model, cached_tokenizer, initial_arrays
    from fedward.client.prefix_cache import CacheOptions
    from fedward.client.privacy.accounting import plan_dp, privacy_units
    from fedward.client.privacy.noisy_sum import noisy_gradient_sum
    from fedward.client.trainer import predict, train_locally
    from fedward.common.metrics import classification_metrics
    from fedward.server.aggregation import apply_average, server_step, weighted_sum

    tokenizer = cached_tokenizer(config.spec.model.name)
    labels = config.spec.task.labels
    model = cached_model(config.spec.model, config.spec.task, config.spec.training.seed)
    pad = tokenizer.pad_token_id
    per_patient = config.spec.privacy.per_patient
    datasets = [
        encode(train, config.spec.task, tokenizer, per_patient=per_patient) for train in trains
    ]
    arrays = initial_arrays(config.spec.model, config.spec.task, config.spec.training.seed)
    distributed = config.spec.privacy.noise == "distributed"
    plans = [
        plan_dp(
            config.spec.privacy,
            config.spec.training,
            config.spec.federation.rounds,
            max(privacy_units(config.spec.privacy, d), 1),
        )
        for d in datasets
    ]
    histories: list[list] = [[] for _ in datasets]
    for _ in range(config.spec.federation.rounds):
        if distributed:
            total = sum(
                noisy_gradient_sum(model, data, config, arrays, pad, f"{site}-{n}")[0]
                for n, data in enumerate(datasets)
            )
            arrays = server_step(
                arrays,
                total.view("uint64"),
                config.spec.privacy.max_grad_norm,
                config.spec.training.server_learning_rate,
            )
            continue
        updates = []
        for number, data in enumerate(datasets):
            result = train_locally(
                model,
                data,
                config,
                arrays,
                histories[number],
                pad,
                f"{site}-{number}",
                plan=plans[number],
            )
            histories[number] = result.history
            updates.append((result.delta, float(result.num_examples)))
        arrays = apply_average(arrays, *weighted_sum(updates))
    truth_all: list = []
    predicted_all: list = []
    cache = CacheOptions.of(config)
    for number, val in enumerate(vals):
        validation = encode(val, config.spec.task, tokenizer, per_patient=False)
        _, truth, predicted = predict(
            model, validation, arrays, pad, config.local.device, cache, f"hospital-{number}"
        )
        truth_all += truth
        predicted_all += predicted
    return classification_metrics(truth_all, predicted_all, len(labels))["macro_f1"]


def run_cell(name: str, arm: str, seed: int, overrides: dict) -> dict:
    """One (federation, arm, seed): the global macro-F1 and the seconds it took."""
    federation = dict(FEDERATIONS[name])
    trusted = federation.pop("noise_hospitals")
    values = {
        **federation,
        "seed": seed,
        "device": "cpu",
        "target_epsilon": 8.0,
        "dp_unit": "patient",
        "min_hospitals": 1,
    }
    config, hospitals = hospitals_of(values)
    trains = [h.train for h in hospitals]
    vals = [h.val for h in hospitals]
    started = time.monotonic()
    distributed = {**DISTRIBUTED, **overrides}
    if arm == "local":
        score = run_arm(config, trains, vals)
        recipe = "local DP-SGD (default recipe)"
    elif arm == "distributed":
        score = run_arm(config.updated(**distributed, noise_hospitals=trusted), trains, vals)
        recipe = f"DP-FedSGD, t={trusted}"
    else:
        union = [[record for train in trains for record in train]]
        scores = {
            "DP-FedSGD, t=1": run_arm(config.updated(**distributed), union, vals, "pooled"),
            "local DP-SGD (default recipe)": run_arm(config, union, vals, "pooled"),
        }
        recipe = max(scores, key=scores.get)
        score = scores[recipe]
    return {
        "federation": name,
        "arm": arm,
        "seed": seed,
        "macro_f1": round(score, 4),
        "recipe": recipe,
        "settings": json.dumps(overrides, sort_keys=True) if overrides else "",
        "seconds": round(time.monotonic() - started, 1),
    }


def report(log: Path) -> str:
    """Per federation: each arm's macro-F1, mean (min-max) over seeds, and its ratio to the
    pooled-DP limit."""
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        cells.setdefault((row["federation"], row["settings"]), {}).setdefault(
            row["arm"], []
        ).append(row)
    out = []
    for (name, settings), arms in sorted(cells.items()):
        out += [f"### {name}" + (f" ({settings})" if settings else ""), ""]
        out += ["| arm | seeds | macro-F1 mean (min-max) | / pooled | recipe |"]
        out += ["| --- | --- | --- | --- | --- |"]
        pooled = (
            statistics.mean(r["macro_f1"] for r in arms.get("pooled", []))
            if "pooled" in arms
            else None
        )
        for arm in ARMS:
            rows = arms.get(arm)
            if not rows:
                continue
            values = [r["macro_f1"] for r in rows]
            mean = statistics.mean(values)
            ratio = f"{mean / pooled:.2f}" if pooled else "-"
            recipes = ", ".join(sorted({r["recipe"] for r in rows}))
            out.append(
                f"| {arm} | {len(rows)} | {mean:.3f} ({min(values):.3f}-{max(values):.3f}) | "
                f"{ratio} | {recipes} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--federations", nargs="+", default=list(FEDERATIONS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--set", nargs="*", default=[], help="distributed recipe overrides, e.g. rounds=10"
    )
    parser.add_argument(
        "--recipes",
        default=None,
        help='several --set groups separated by ";", run one after the other in this process',
    )
    parser.add_argument("--log", type=Path, default=Path("bench/results/distributed_noise.jsonl"))
    parser.add_argument("--report", action="store_true", help="print the table of --log")
    args = parser.parse_args()
    if args.report:
        print(report(args.log))
        return
    from bench.utility import parse_overrides
    from fedward.client import prefix_cache

    # The cached encoder states depend on the model and the token ids only: keep them from one
    # cell to the next instead of dropping them with each new run spec (as bench/patient_dp.py).
    prefix_cache._start_run = lambda digest: None
    groups = [args.set] if args.recipes is None else [g.split() for g in args.recipes.split(";")]
    for name in args.federations:
        for seed in args.seeds:
            for group in groups:
                overrides = parse_overrides(group)
                for arm in args.arms:
                    row = run_cell(name, arm, seed, overrides)
                    print(json.dumps(row), flush=True)
                    with args.log.open("a", encoding="utf-8") as log:
                        log.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
