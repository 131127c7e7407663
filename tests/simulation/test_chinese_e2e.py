"""Chinese NER end to end on real data (cMedQANER): a federated DP round with a model on the
Chinese BERT vocabulary, per-type metrics under the data's own type names, predictions with
character offsets, and the vocabulary guard refusing the default English model.

A tiny random BERT stands in for bert-base-chinese (no pretrained weights can be downloaded
here): these tests check the plumbing, never the utility of Chinese NER.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from fedward.common.config import RunConfig
from fedward.common.coverage import VocabularyError
from fedward.common.tasks import NER
from fedward.simulation.predict import predict_texts
from fedward.simulation.report import round_table
from fedward.simulation.runner import simulate


@pytest.fixture(scope="module")
def cmedqa_sample(shared_data, tmp_path_factory) -> Path:
    """The first 40 sentences of cMedQANER's training file, as the hospital would hold them."""
    text = (shared_data / "cmedqa_ner" / "train.txt").read_text(encoding="utf-8")
    sentences = [s for s in text.split("\n\n") if s.strip()][:40]
    path = tmp_path_factory.mktemp("cmedqa") / "train.txt"
    path.write_text("\n\n".join(sentences) + "\n", encoding="utf-8")
    return path


def _config(tmp_path, data: Path, **values) -> RunConfig:
    base = {
        "task": "ner",
        "data": str(data),
        "partition": "blocks",
        "hospitals": 2,
        "rounds": 1,
        "max_length": 64,
        "batch_size": 8,
        "head_learning_rate": 0.05,
        "out": str(tmp_path / "out"),
    }
    return RunConfig.build({**base, **values})


def test_one_dp_round_on_chinese_notes_with_per_type_metrics_and_coverage(
    chinese_model_dir, cmedqa_sample, tmp_path
):
    result = simulate(_config(tmp_path, cmedqa_sample, model=chinese_model_dir))

    row = result.rounds[0]
    assert row["status"] == "ok"
    assert row["secure_aggregation"]
    for name, hospital in row["hospitals"].items():
        assert hospital["trained"] and 0 < hospital["epsilon"] <= 8.0, name
        assert 0.0 <= hospital["unknown_rate"] < 0.01, name
    # Per-type entity metrics, under cMedQANER's own type names.
    for entity_type in ("disease", "symptom", "body", "crowd"):
        for key in ("precision", "recall", "f1"):
            assert 0.0 <= row["global"][f"{key}_{entity_type}"] <= 1.0
    console = Console(width=200, record=True)
    console.print(round_table(result.rounds, NER))
    report = console.export_text()
    assert "unknown to the model's vocabulary: hospital-0 " in report
    assert "entity F1 by type, round 1: body " in report

    text = "孩子经常感冒发炎，鼻塞流涕，需要吃抗病毒口服液吗？"
    (block,) = predict_texts(result.adapter_dir, [text])
    shown, *found = block.split("\n")
    assert shown == text
    # A random model may find nothing; whatever it finds must point into the text.
    if found != ["  (no entities)"]:
        for part in found:
            entity_type, rest = part.strip().split(" ", 1)
            start, end = (int(x) for x in rest[rest.rindex("[") + 1 : -1].split(":"))
            assert entity_type in {"disease", "symptom", "body", "crowd", "drug", "treatment"}
            assert rest.startswith(f"'{text[start:end]}'")


def test_simulate_refuses_the_default_model_on_chinese_notes_before_any_round(
    cmedqa_sample, tmp_path
):
    with pytest.raises(VocabularyError) as refused:
        simulate(_config(tmp_path, cmedqa_sample))  # the packaged all-MiniLM-L6-v2
    assert refused.value.unknown_rate > 0.3
    assert not (tmp_path / "out" / "history.json").exists()

    fedward = Path(sys.executable).parent / "fedward"
    command = [str(fedward), "simulate", "--task", "ner", "--data", str(cmedqa_sample)]
    run = subprocess.run(
        [*command, "--hospitals", "2", "--out", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("fedward: error: model all-MiniLM-L6-v2 maps ")
    assert "unknown token" in lines[0] and "Chinese BERT" in lines[0]
