"""NER end to end: synthetic notes, a CoNLL file, FFA-LoRA across rounds, and `fedward predict`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fedward.common.config import RunConfig
from fedward.common.model import build_model, get_adapter_arrays
from fedward.simulation.runner import simulate


def _config(tiny_model_dir, tmp_path, **values) -> RunConfig:
    base = {
        "model": tiny_model_dir,
        "task": "ner",
        "hospitals": 2,
        "rounds": 2,
        "notes_per_hospital": 40,
        "max_length": 48,
        "head_learning_rate": 0.05,
        "out": str(tmp_path / "out"),
    }
    return RunConfig.build({**base, **values})


def test_ner_simulation_on_synthetic_notes_reports_entity_metrics(tiny_model_dir, tmp_path):
    result = simulate(_config(tiny_model_dir, tmp_path))

    assert [row["round"] for row in result.rounds] == [1, 2]
    meta = json.loads((result.adapter_dir / "fedward.json").read_text())
    assert meta["task"] == "ner"
    assert {"O", "B-DISEASE", "I-DISEASE", "B-SYMPTOM", "B-DRUG"} <= set(meta["labels"])
    for row in result.rounds:
        assert row["status"] == "ok"
        metrics = row["global"]
        for key in ("precision", "recall", "f1", "f1_DISEASE", "f1_SYMPTOM", "f1_DRUG"):
            assert key in metrics and 0.0 <= metrics[key] <= 1.0
        for hospital in row["hospitals"].values():
            assert 0 < hospital["epsilon"] <= 8.0


def test_ner_from_a_conll_file_in_blocks(tiny_model_dir, tmp_path):
    sentences = [
        [
            ("Patient", "O"),
            ("has", "O"),
            ("breast", "B-Disease"),
            ("cancer", "I-Disease"),
            (".", "O"),
        ],
        [("No", "O"), ("sign", "O"), ("of", "O"), ("ataxia", "B-Disease"), (".", "O")],
    ] * 20
    path = tmp_path / "train.tsv"
    path.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in s) for s in sentences) + "\n")

    result = simulate(
        _config(tiny_model_dir, tmp_path, data=str(path), partition="blocks", rounds=1)
    )

    labels = json.loads((result.adapter_dir / "fedward.json").read_text())["labels"]
    assert labels == ["O", "B-Disease", "I-Disease"]
    assert result.rounds[0]["status"] == "ok"
    trained = [h for h in result.rounds[0]["hospitals"].values() if h.get("trained")]
    assert len(trained) == 2


def test_ffa_lora_keeps_a_at_its_seeded_init_and_sends_only_b(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, lora_variant="ffa", secure_aggregation=False)
    result = simulate(config)

    # Only B factors and the head travelled (and were averaged) ...
    assert result.arrays and not any(".lora_A." in name for name in result.arrays)
    assert any(".lora_B." in name for name in result.arrays)
    # ... and B moved, while the saved adapter's A factors equal the seeded initial ones.
    labels = json.loads((result.adapter_dir / "fedward.json").read_text())["labels"]
    initial_model = build_model(config.updated(**{"labels": labels}).spec, len(labels))
    initial = get_adapter_arrays(initial_model)
    assert any(
        not np.allclose(result.arrays[n], initial[n]) for n in result.arrays if ".lora_B." in n
    )
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    initial_a = {
        name: parameter.detach()
        for name, parameter in initial_model.named_parameters()
        if ".lora_A." in name
    }
    saved_a = {name: tensor for name, tensor in saved.items() if ".lora_A." in name}
    assert len(saved_a) == len(initial_a) > 0
    for name, tensor in saved_a.items():
        match = [p for n, p in initial_a.items() if n.replace(".default", "") == name]
        assert match and torch.equal(tensor, match[0]), name


def test_predict_prints_entities_with_spans(tiny_model_dir, tmp_path):
    result = simulate(_config(tiny_model_dir, tmp_path, rounds=1))
    fedward = Path(sys.executable).parent / "fedward"
    text = "Patient with chest pain, started aspirin for coronary artery disease."

    run = subprocess.run(
        [str(fedward), "predict", "--adapter", str(result.adapter_dir), text],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert run.returncode == 0, run.stderr
    shown, *lines = run.stdout.strip().splitlines()
    # Either entities with [start:end] character spans that point into the text, one per line
    # under the note, or none found: a tiny random model may find nothing, but the format and
    # spans must be right.
    assert shown.startswith("Patient with chest pain")
    assert lines and all(line.startswith("  ") for line in lines)
    if lines != ["  (no entities)"]:
        for part in (line.strip() for line in lines):
            entity_type, rest = part.split(" ", 1)
            span = rest[rest.rindex("[") + 1 : -1]
            start, end = (int(x) for x in span.split(":"))
            assert entity_type in {"DISEASE", "SYMPTOM", "DRUG"}
            assert rest.startswith(f"'{text[start:end]}'")
