"""Worth joining: per hospital, the model it could train alone, the global model, and its own
model after joining, on its own validation notes (issue 38).

Four federations, at patient-level DP (epsilon 8, delta 1e-5):

- `default`: fedward simulate's default, 3 synthetic hospitals x 700 notes;
- `small10`: 10 small synthetic hospitals x 200 notes;
- `centre`: one large centre (2,000 notes) and 4 community hospitals (200 each);
- `abstracts`: the shared Medical Abstracts corpus (`--max-train` abstracts) with a simulated
  patient structure (bench/patient_dp.py), dealt to 3 hospitals by Dirichlet(0.5) label skew,
  each patient whole at one hospital.

The hospitals' data and splits are exactly the simulation's (`simulation.hospitals`: validation
split by patient). Training is the hospitals' own trainer (`train_locally`, DP-SGD planned as a
site plans it) and FedAvg in this one process, without Flower, Ray or SecAgg+'s quantization
(bench/patient_dp.py's fast path); the own and alone models are `client.app.own_model`, the code
a hospital runs at the end of a run. One line per (federation, seed, hospital) is appended to
`--log` as it comes; `--report` prints the table.

    python -m bench.worth_joining --federations default small10 centre abstracts --seeds 1 2 3
    python -m bench.worth_joining --federations default --seeds 1 --set rounds=5
    python -m bench.worth_joining --report
    python -m bench.worth_joining --federations small10 --seeds 1 2 3 \\
        --set noise=distributed noise_hospitals=5 rounds=30     # issue 39's distributed noise
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.utility import parse_overrides
from fedward.common.config import DataSchema, RunConfig, SimulatedData, TaskSpec

FEDERATIONS = {
    "default": {"hospitals": 3, "notes_per_hospital": "700"},
    "small10": {"hospitals": 10, "notes_per_hospital": "200"},
    "centre": {"hospitals": 5, "notes_per_hospital": "2000,200,200,200,200"},
    "abstracts": {"hospitals": 3, "partition": "dirichlet", "alpha": 0.5},
}
#: Hospitals counted as small in the rules (own - alone >= +5 points on average).
SMALL = {"small10": range(10), "centre": range(1, 5)}


def federation_values(name: str, seed: int, work: Path, max_train: int) -> dict:
    values = {**FEDERATIONS[name], "seed": seed, "device": "cpu", "target_epsilon": 8.0}
    if name == "abstracts":
        from bench.patient_dp import medical_abstracts_with_patients

        path = medical_abstracts_with_patients(work, max_train, 3, seed)
        values |= {
            "data": str(path),
            "text_column": "text",
            "label_column": "label",
            "patient_column": "patient",
        }
    return values


def hospital_shares(
    task: TaskSpec, seed: int, simulation: SimulatedData, schema: DataSchema
) -> list:
    """Each simulated hospital's training and validation examples, split as `fedward simulate`
    splits them, with the labels the run lists.

    Args:
        task: The run's task group (its `labels`, and the task that reads the data).
        seed: The run's seed (`spec.training.seed`).
        simulation: The simulated hospitals and where their data come from.
        schema: How the data file is read.

    Returns:
        One `HospitalData` per hospital, filtered to the run's labels.
    """
    from fedward.client.app import with_run_labels
    from fedward.simulation.hospitals import hospital_shares as shares

    return [with_run_labels(data, task.labels) for data in shares(task, seed, simulation, schema)]


def hospital_row(number: int, data, federated: float, own_seconds: float) -> dict:
    """A hospital's sizes and timings, beside its figures in a row of the log."""
    return {
        "hospital": number,
        "train": len(data.train),
        "validation": len(data.val),
        "patients": len({getattr(r, "patient", None) for r in data.train}),
        "seconds_federated": round(federated),
        "seconds_own": round(own_seconds, 1),
    }


def run_federation(values: dict, global_only: bool = False, kept: Path | None = None) -> list[dict]:
    """One federated run (fast path) and each hospital's alone / global / own report (with
    `global_only`, the global model's score alone: for sweeping the DP recipe). With `kept`
    (an .npz), the final global adapter is read from it when it exists, else written to it:
    to score another own-model recipe on the same global models without training them again."""
    from fedward.client.app import encode, own_model
    from fedward.client.model_cache import cached_model, cached_tokenizer, initial_arrays
    from fedward.client.privacy.accounting import plan_dp, privacy_units
    from fedward.client.privacy.noisy_sum import noisy_gradient_sum
    from fedward.client.trainer import predict, train_locally
    from fedward.server.aggregation import apply_average, server_step, weighted_sum
    from fedward.simulation.hospitals import prepare_config

    config = prepare_config(RunConfig.build(values, source="bench"))
    spec = config.spec
    privacy, training, task = spec.privacy, spec.training, spec.task
    tokenizer = cached_tokenizer(spec.model.name)
    model = cached_model(spec.model, task, training.seed)
    hospitals = hospital_shares(task, training.seed, config.simulation, config.data_schema)
    per_patient = privacy.per_patient
    datasets = [encode(data.train, task, tokenizer, per_patient=per_patient) for data in hospitals]
    units = [max(privacy_units(privacy, d), 1) for d in datasets]
    plans = [plan_dp(privacy, training, spec.federation.rounds, n) for n in units]
    histories: list[list] = [[] for _ in hospitals]
    arrays = initial_arrays(spec.model, task, training.seed)
    started = time.monotonic()
    rounds = config.spec.federation.rounds
    if kept is not None and kept.exists():
        with np.load(kept) as stored:
            arrays, rounds = {name: stored[name] for name in arrays}, 0
    for _ in range(rounds):
        if config.spec.privacy.noise == "distributed":  # issue 39: one noisy sum a round
            total = sum(
                noisy_gradient_sum(
                    model, dataset, config, arrays, tokenizer.pad_token_id, hospitals[n].name
                )[0]
                for n, dataset in enumerate(datasets)
            )
            step = (privacy.max_grad_norm, training.server_learning_rate)
            arrays = server_step(arrays, total.view("uint64"), *step)
            continue
        updates = []
        for number, dataset in enumerate(datasets):
            result = train_locally(
                model,
                dataset,
                config,
                arrays,
                histories[number],
                tokenizer.pad_token_id,
                who=hospitals[number].name,
                plan=plans[number] if config.spec.privacy.dp else None,
            )
            histories[number] = result.history
            updates.append((result.delta, float(result.num_examples)))
        arrays = apply_average(arrays, *weighted_sum(updates))
    if kept is not None and rounds:
        kept.parent.mkdir(parents=True, exist_ok=True)
        np.savez(kept, **arrays)
    federated = time.monotonic() - started
    rows = []
    for number, data in enumerate(hospitals):
        started = time.monotonic()
        if global_only:
            validation = encode(data.val, config.spec.task, tokenizer, per_patient=per_patient)
            _, truth, predicted = predict(
                model, validation, arrays, tokenizer.pad_token_id, config.local.device
            )
            score = config.spec.task.definition.metrics(truth, predicted, config.spec.task.labels)
            figures = {"global": score[config.spec.task.definition.primary_metric]}
        else:
            own_report = own_model(data, config, arrays).report
            figures = own_report.as_dict() | {"evidence": own_report.evidence}
        rows.append(figures | hospital_row(number, data, federated, time.monotonic() - started))
    return rows


def report(log: Path) -> str:
    """The markdown tables of `log`: per federation and hospital, mean (spread) over seeds."""
    cells: dict[tuple, dict[int, list[dict]]] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        key = (row["federation"], row.get("settings", ""))
        cells.setdefault(key, {}).setdefault(row["hospital"], []).append(row)
    out = []
    for (name, settings), hospitals in sorted(cells.items()):
        seeds = sorted({r["seed"] for rows in hospitals.values() for r in rows})
        title = f"### {name}" + (f" ({settings})" if settings else "")
        out += [title, "", f"seeds {', '.join(map(str, seeds))}; mean (min-max) of macro-F1", ""]
        out += [
            "| hospital | train notes (first seed) | alone | global | own | own - alone "
            "| own's pick |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        gains_small, gains_all = [], []
        for number, rows in sorted(hospitals.items()):

            def cell(key: str, rows: list[dict] = rows) -> str:
                values = [r[key] for r in rows]
                mean = statistics.mean(values)
                return f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"

            gain = statistics.mean(r["own"] - r["alone"] for r in rows)
            gains_all.append(gain)
            if number in SMALL.get(name, ()):
                gains_small.append(gain)
            picks = ", ".join(sorted({r["own_method"] for r in rows}))
            out.append(
                f"| {number} | {rows[0]['train']} | {cell('alone')} | {cell('global')} | "
                f"{cell('own')} | {100 * gain:+.1f} pts | {picks} |"
            )
        out += ["", f"mean own - alone: {100 * statistics.mean(gains_all):+.1f} pts"]
        if gains_small:
            out[-1] += f"; small hospitals: {100 * statistics.mean(gains_small):+.1f} pts"
        below = [n for n, g in zip(sorted(hospitals), gains_all, strict=True) if g < -0.01]
        out.append(
            "rule own >= alone - 1 pt: "
            + (
                "held at every hospital"
                if not below
                else "missed at hospital(s) "
                + ", ".join(
                    f"{n} ({100 * gains_all[sorted(hospitals).index(n)]:+.1f} pts)" for n in below
                )
            )
        )
        target = {"small10": 0.05, "centre": 0.05, "abstracts": 0.03}.get(name)
        if target is not None:
            gains = gains_small or gains_all
            mean = statistics.mean(gains)
            verdict = "met" if mean >= target else f"missed by {100 * (target - mean):.1f} pts"
            out.append(f"rule mean gain >= +{100 * target:.0f} pts: {verdict}")
        out.append("")
    return "\n".join(out)


def main() -> None:
    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--federations", nargs="+", default=list(FEDERATIONS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--max-train", type=int, default=2400, help="Medical Abstracts cap")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", dest="settings")
    parser.add_argument(
        "--recipes", default="", help="several --set groups in one process, separated by ';'"
    )
    parser.add_argument("--log", type=Path, default=Path("bench/results/worth_joining.jsonl"))
    parser.add_argument("--global-only", action="store_true", help="score the global model only")
    parser.add_argument("--report", action="store_true", help="print the tables of --log")
    parser.add_argument(
        "--evidence",
        type=Path,
        help="append each hospital's validation labels and candidates' predictions here "
        "(to study the choice of the own model offline; bench/own_choice.py)",
    )
    parser.add_argument(
        "--globals",
        type=Path,
        help="keep each run's final global adapter here, and reuse the ones already kept",
    )
    args = parser.parse_args()
    if args.report:
        print(report(args.log))
        return
    from fedward.client import prefix_cache

    # The cached encoder states depend on the model and the token ids only: keep them from one
    # recipe to the next instead of dropping them with each new run spec.
    prefix_cache._start_run = lambda digest: None
    recipes = [parse_overrides(group.split()) for group in args.recipes.split(";")]
    recipes = recipes if args.recipes else [parse_overrides(args.settings)]
    with tempfile.TemporaryDirectory(prefix="fedward-worth-joining-") as folder:
        for name in args.federations:
            for seed in args.seeds:
                for overrides in recipes:
                    settings = " ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
                    values = {**federation_values(name, seed, Path(folder), args.max_train)}
                    kept = None
                    if args.globals:
                        tag = settings.replace(" ", "_").replace("=", "-") or "default-recipe"
                        kept = args.globals / f"{name}-seed{seed}-{tag}.npz"
                    reused = kept is not None and kept.exists()
                    for row in run_federation(values | overrides, args.global_only, kept):
                        row |= {"global_reused": True} if reused else {}
                        row = {"federation": name, "seed": seed, "settings": settings, **row}
                        evidence = row.pop("evidence", None)
                        print(json.dumps(row), flush=True)
                        with args.log.open("a", encoding="utf-8") as log:
                            log.write(json.dumps(row) + "\n")
                        if evidence and args.evidence:
                            with args.evidence.open("a", encoding="utf-8") as log:
                                key = {k: row[k] for k in ("federation", "seed", "hospital")}
                                log.write(json.dumps(key | {"settings": settings} | evidence))
                                log.write("\n")


if __name__ == "__main__":
    main()
