"""The cost of the patient as the unit of privacy: utility at epsilon 1, 3 and 8, record-level
against patient-level DP.

Two data sets, both with patients:

- `synthetic`: fedward's synthetic notes (3 hospitals x `--notes` notes), whose patients are
  drawn with `simulation/synthetic/patients.py`'s spread (most with one to three notes, a few
  with tens);
- `medical_abstracts`: the shared Medical Abstracts corpus (`--max-train` abstracts), given a
  *simulated* patient structure: the same spread, a patient's abstracts sharing a label, and
  each patient placed whole at one of the hospitals. The abstracts are not patients' records;
  only the structure is simulated.

Two paths (`--path`):

- `fast` (default): the hospitals' own trainer (`train_locally`, the default recipe: head-only,
  batch 128, 3 local epochs, 3 rounds, DP-SGD planned as a site plans it) and FedAvg
  (`server.aggregation`), in this one process, without Flower, Ray or SecAgg+'s quantization.
  The frozen encoder's states are cached once per hospital and kept across cells (they depend
  only on the model and the token ids), which is what makes a table of many cells affordable
  on a shared 2-core machine.
- `real`: `fedward simulate`'s runner (Flower's simulation, SecAgg+), one simulation a cell.

Each cell is the final global macro-F1 over every hospital's validation notes pooled (the
figure `fedward simulate`'s table shows), one run per cell unless `--repeats` (DP noise is drawn
from the OS). Each result line is appended to `--log` as it comes.

    python -m bench.patient_dp --data synthetic --epsilons 8 3 1 --units record patient
    python -m bench.patient_dp --data medical_abstracts --max-train 3000
    python -m bench.patient_dp --data synthetic --epsilons 8 --units patient \
        --set max_records_per_patient=1      # the record bound, swept
    python -m bench.patient_dp --path real --epsilons 8   # through `fedward simulate`'s runner
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.utility import SHARED, parse_overrides, split_classification
from fedward.common.config import RunConfig
from fedward.simulation.synthetic.patients import assign_patients


def medical_abstracts_with_patients(work: Path, max_train: int, hospitals: int, seed: int) -> Path:
    """The Medical Abstracts training split with simulated patients and hospitals, as a CSV."""
    records, _ = split_classification(
        SHARED / "medical_abstracts" / "medical_tc.csv", seed, max_train
    )
    patients = assign_patients([r.label for r in records], "ma", seed)
    names = sorted(set(patients))
    random.Random(seed).shuffle(names)
    hospital_of = {name: f"hospital-{i % hospitals}" for i, name in enumerate(names)}
    path = work / "medical_abstracts_patients.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "patient", "hospital"])
        for record, patient in zip(records, patients, strict=True):
            writer.writerow([record.text, record.label, patient, hospital_of[patient]])
    return path


def run_cell(values: dict) -> tuple[float, float]:
    """(final global macro-F1, seconds) of one simulation through the real path."""
    from fedward.simulation.runner import simulate

    started = time.monotonic()
    result = simulate(RunConfig.build(values, source="bench"))
    return result.rounds[-1]["global"]["macro_f1"], time.monotonic() - started


class FastFederation:
    """The hospitals' data, tokenizer and models, kept across cells (`--path fast`)."""

    def __init__(self, hospitals: list[tuple[list, list]], labels: list[str], values: dict):
        from fedward.client import prefix_cache
        from fedward.common.model import build_model, get_adapter_arrays, load_tokenizer

        # The cached encoder states depend on the model and the token ids only: keep them from
        # one cell to the next instead of dropping them with each new run spec.
        prefix_cache._start_run = lambda digest: None
        self.hospitals = hospitals
        self.labels = labels
        base = RunConfig.build({**values, "labels": labels}, source="bench")
        self.tokenizer = load_tokenizer(base.spec.model.name)
        self.models = [build_model(base.spec, len(labels)) for _ in hospitals]
        self.initial = get_adapter_arrays(self.models[0])

    def run(self, values: dict) -> tuple[float, float]:
        """(final global macro-F1 over the pooled validation notes, seconds) of one run."""
        from fedward.client.app import encode
        from fedward.client.privacy.accounting import plan_dp, privacy_units
        from fedward.client.trainer import predict, train_locally
        from fedward.common.metrics import classification_metrics
        from fedward.server.aggregation import apply_average, weighted_sum

        started = time.monotonic()
        config = RunConfig.build({**values, "labels": self.labels}, source="bench")
        pad = self.tokenizer.pad_token_id
        per_patient = config.spec.privacy.per_patient
        datasets = [
            encode(train, config.spec.task, self.tokenizer, per_patient=per_patient)
            for train, _ in self.hospitals
        ]
        privacy = config.spec.privacy
        plans = [
            plan_dp(
                config.spec.privacy,
                config.spec.training,
                config.spec.federation.rounds,
                max(privacy_units(privacy, data), 1),
            )
            for data in datasets
        ]
        histories: list[list] = [[] for _ in datasets]
        arrays = dict(self.initial)
        for _ in range(config.spec.federation.rounds):
            updates = []
            for number, data in enumerate(datasets):
                result = train_locally(
                    self.models[number],
                    data,
                    config,
                    arrays,
                    histories[number],
                    pad,
                    who=f"hospital-{number}",
                    plan=plans[number],
                )
                histories[number] = result.history
                updates.append((result.delta, float(result.num_examples)))
            arrays = apply_average(arrays, *weighted_sum(updates))
        true_ids: list = []
        pred_ids: list = []
        for number, (_, val) in enumerate(self.hospitals):
            validation = encode(val, config.spec.task, self.tokenizer, per_patient=False)
            _, truth, predicted = predict(
                self.models[number], validation, arrays, pad, config.local.device
            )
            true_ids += truth
            pred_ids += predicted
        score = classification_metrics(true_ids, pred_ids, len(self.labels))["macro_f1"]
        return score, time.monotonic() - started


def fast_hospitals(args, work: Path) -> tuple[list[tuple[list, list]], list[str]]:
    """Each hospital's (training, validation) records and the label list, split as the
    simulation splits them (`task.split` with seed + hospital)."""
    from fedward.common.data import read_records
    from fedward.common.tasks import CLASSIFICATION
    from fedward.simulation.synthetic import synthetic_examples, synthetic_labels

    task = CLASSIFICATION
    if args.data == "synthetic":
        shares = [
            synthetic_examples("classification", h, args.notes, args.seed, args.hospitals)
            for h in range(args.hospitals)
        ]
        labels = synthetic_labels("classification", args.hospitals, args.notes, args.seed)
    else:
        path = medical_abstracts_with_patients(work, args.max_train, args.hospitals, args.seed)
        records = read_records(path, "text", "label", "hospital", "patient")
        shares = [[r for r in records if r.group == f"hospital-{h}"] for h in range(args.hospitals)]
        labels = sorted({r.label for r in records})
    hospitals = [task.split(share, 0.2, args.seed + h) for h, share in enumerate(shares)]
    return hospitals, labels


def report(log: Path) -> str:
    """The markdown table of the cells in `log`: macro-F1 per data set, path, settings and
    epsilon, record against patient (the mean where a cell ran more than once)."""
    cells: dict[tuple, dict[str, list[float]]] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        cell = json.loads(line)
        settings = " ".join(f"{k}={v}" for k, v in sorted(cell["settings"].items())) or "default"
        epsilon = "no DP" if cell["unit"] == "none" else f"{cell['epsilon']:g}"
        unit = "record" if cell["unit"] == "none" else cell["unit"]
        key = (cell["data"], cell.get("path", "real"), settings, epsilon)
        cells.setdefault(key, {}).setdefault(unit, []).append(cell["macro_f1"])
    lines = [
        "| data | path | settings | epsilon | record-level | patient-level | patient - record |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def shown(values: list[float] | None) -> str:
        if not values:
            return "not run"
        mean = sum(values) / len(values)
        runs = f" ({', '.join(f'{v:.3f}' for v in values)})" if len(values) > 1 else ""
        return f"{mean:.3f}{runs}"

    for (data, path, settings, epsilon), units in sorted(cells.items()):
        record, patient = units.get("record"), units.get("patient")
        gap = "—"
        if record and patient and epsilon != "no DP":
            gap = f"{100 * (sum(patient) / len(patient) - sum(record) / len(record)):+.1f} pts"
        patient_cell = "—" if epsilon == "no DP" else shown(patient)
        lines.append(
            f"| {data} | {path} | {settings} | {epsilon} | {shown(record)} | {patient_cell} "
            f"| {gap} |"
        )
    return "\n".join(lines)


def main() -> None:
    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["synthetic", "medical_abstracts"], default="synthetic")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0])
    parser.add_argument("--units", nargs="+", default=["record", "patient"])
    parser.add_argument("--notes", type=int, default=700, help="synthetic notes per hospital")
    parser.add_argument("--max-train", type=int, default=3000, help="Medical Abstracts cap")
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", dest="settings")
    parser.add_argument("--path", choices=["fast", "real"], default="fast")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell")
    parser.add_argument("--log", type=Path, default=Path("bench/results/patient_dp.log"))
    parser.add_argument("--report", action="store_true", help="print the table of --log")
    args = parser.parse_args()
    if args.report:
        print(report(args.log))
        return
    overrides = parse_overrides(args.settings)
    with tempfile.TemporaryDirectory(prefix="fedward-patient-dp-") as folder:
        work = Path(folder)
        values = {"hospitals": args.hospitals, "seed": args.seed, **overrides}
        federation = None
        if args.path == "fast":
            hospitals, labels = fast_hospitals(args, work)
            values["device"] = "cpu"
            federation = FastFederation(hospitals, labels, values)
        elif args.data == "synthetic":
            values["notes_per_hospital"] = args.notes
        else:
            data = medical_abstracts_with_patients(work, args.max_train, args.hospitals, args.seed)
            values |= {
                "data": str(data),
                "text_column": "text",
                "label_column": "label",
                "patient_column": "patient",
                "partition": "column:hospital",
            }
        cells = [
            (epsilon, unit, repeat)
            for epsilon in args.epsilons
            for unit in args.units
            for repeat in range(args.repeats)
        ]
        for epsilon, unit, repeat in cells:
            cell = {**values, "target_epsilon": epsilon, "dp_unit": unit}
            if unit == "none":
                cell = {**values, "dp": False}
            cell["out"] = str(work / f"{unit}-{epsilon:g}-{repeat}")
            if federation is not None:
                score, seconds = federation.run(cell)
            else:
                score, seconds = run_cell(cell)
            line = {
                "data": args.data,
                "path": args.path,
                "epsilon": epsilon,
                "unit": unit,
                "macro_f1": round(score, 4),
                "seconds": round(seconds),
                "settings": overrides,
                "notes": args.notes if args.data == "synthetic" else args.max_train,
            }
            print(json.dumps(line), flush=True)
            with args.log.open("a", encoding="utf-8") as log:
                log.write(json.dumps(line) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
