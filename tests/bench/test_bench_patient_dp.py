"""bench/patient_dp.py: its table, and the simulated patient structure of a shared corpus."""

from __future__ import annotations

import csv
import json

import pytest

from bench import patient_dp


def test_the_report_pairs_record_and_patient_cells_and_names_what_did_not_run(tmp_path):
    log = tmp_path / "cells.log"
    cells = [
        {"data": "synthetic", "path": "fast", "epsilon": 8.0, "unit": "record", "macro_f1": 0.7},
        {"data": "synthetic", "path": "fast", "epsilon": 8.0, "unit": "patient", "macro_f1": 0.6},
        {"data": "synthetic", "path": "fast", "epsilon": 8.0, "unit": "patient", "macro_f1": 0.64},
        {"data": "synthetic", "path": "fast", "epsilon": 1.0, "unit": "record", "macro_f1": 0.5},
    ]
    log.write_text("\n".join(json.dumps({**c, "settings": {}}) for c in cells) + "\n")
    table = patient_dp.report(log)
    assert "| synthetic | fast | default | 8 | 0.700 | 0.620 (0.600, 0.640) | -8.0 pts |" in table
    assert "| synthetic | fast | default | 1 | 0.500 | not run | — |" in table


def test_simulated_patients_stay_whole_at_one_hospital(tmp_path):
    if not (patient_dp.SHARED / "medical_abstracts" / "medical_tc.csv").is_file():
        pytest.skip("the shared Medical Abstracts corpus is not present")
    path = patient_dp.medical_abstracts_with_patients(tmp_path, 600, 3, 42)
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    hospitals: dict[str, set[str]] = {}
    for row in rows:
        hospitals.setdefault(row["patient"], set()).add(row["hospital"])
    assert len(rows) == 600 and len(hospitals) < 600 / 2
    assert all(len(places) == 1 for places in hospitals.values())
    assert {row["hospital"] for row in rows} == {"hospital-0", "hospital-1", "hospital-2"}
