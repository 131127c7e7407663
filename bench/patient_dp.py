"""The cost of the patient as the unit of privacy: utility at epsilon 1, 3 and 8, record-level
against patient-level DP, through the real path (`fedward simulate`'s runner: Flower's
simulation, SecAgg+, the default training recipe).

Two data sets, both with patients:

- `synthetic`: fedward's synthetic notes (3 hospitals x `--notes` notes), whose patients are
  drawn with `simulation/synthetic/patients.py`'s spread (most with one to three notes, a few
  with tens);
- `medical_abstracts`: the shared Medical Abstracts corpus (`--max-train` abstracts), given a
  *simulated* patient structure: the same spread, a patient's abstracts sharing a label, and
  each patient placed whole at one of the hospitals (`partition = column:hospital`). The
  abstracts are not patients' records; only the structure is simulated.

Each cell is the final round's global macro-F1 (each hospital's validation notes pooled, the
figure `fedward simulate`'s table shows), one run per cell (DP noise is drawn from the OS, so a
cell moves by about a point between runs). Each result line is appended to `--log` as it comes.

    python -m bench.patient_dp --data synthetic --epsilons 8 3 1 --units record patient
    python -m bench.patient_dp --data medical_abstracts --max-train 3000
    python -m bench.patient_dp --data synthetic --epsilons 8 --units patient \
        --set max_records_per_patient=1      # the record bound, swept
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
    """(final global macro-F1, seconds) of one simulation."""
    from fedward.simulation.runner import simulate

    started = time.monotonic()
    result = simulate(RunConfig.build(values, source="bench"))
    return result.rounds[-1]["global"]["macro_f1"], time.monotonic() - started


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
    parser.add_argument("--log", type=Path, default=Path("bench/results/patient_dp.log"))
    args = parser.parse_args()
    overrides = parse_overrides(args.settings)
    with tempfile.TemporaryDirectory(prefix="fedward-patient-dp-") as folder:
        work = Path(folder)
        values = {"hospitals": args.hospitals, "seed": args.seed, **overrides}
        if args.data == "synthetic":
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
        for epsilon in args.epsilons:
            for unit in args.units:
                cell = {**values, "target_epsilon": epsilon, "dp_unit": unit}
                cell["out"] = str(work / f"{unit}-{epsilon:g}")
                score, seconds = run_cell(cell)
                line = {
                    "data": args.data,
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
