"""`fedward pretrain` and a simulation that starts from its adapter, as a user runs them: real
processes, what they print and write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedward.common.warm_start import adapter_content_hash

FEDWARD = shutil.which("fedward") or str(Path(sys.executable).parent / "fedward")


def _fedward(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [FEDWARD, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def _notes(path: Path, labels: list[str], count: int) -> Path:
    words = {
        "cardiac": "chest pain radiating to the left arm, troponin rise",
        "respiratory": "productive cough, fever, crackles at the right base",
        "renal": "rising creatinine, oliguria, flank pain",
    }
    rows = ["text,label"] + [
        f'"note {i}: {words[labels[i % len(labels)]]}",{labels[i % len(labels)]}'
        for i in range(count)
    ]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pretrained(tiny_model_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("pretrain")
    public = _notes(folder / "public.csv", ["cardiac", "respiratory"], 40)
    out = folder / "out"
    result = _fedward(
        "pretrain", "--model", tiny_model_dir, "--data", str(public), "--rounds", "1",
        "--lora-variant", "lora", "--max-length", "32", "--device", "cpu", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_pretrain_trains_one_site_without_dp_and_says_what_trained(pretrained):
    out, result = pretrained
    assert "fedward pretrain: 1 hospitals" in result.stdout and "DP OFF" in result.stdout
    assert "trains: LoRA (rank 8) in the top 2 layers and the task head" in result.stdout
    assert "secure aggregation was OFF" not in result.stdout  # one site: nobody to mask from
    history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    assert [row["status"] for row in history["rounds"]] == ["ok"]
    meta = json.loads((out / "adapter" / "fedward.json").read_text(encoding="utf-8"))
    assert meta["labels"] == ["cardiac", "respiratory"] and "init_adapter" not in meta


def test_pretrain_takes_no_privacy_or_federation_flags(tmp_path):
    for flags in (["--target-epsilon", "3"], ["--hospitals", "3"], ["--dp"]):
        result = _fedward("pretrain", *flags, "--out", str(tmp_path / "out"), timeout=60)
        assert result.returncode == 2 and "No such option" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_simulation_starts_from_the_pretrained_adapter_and_reports_its_hash_and_labels(
    pretrained, tiny_model_dir, tmp_path
):
    adapter = pretrained[0] / "adapter"
    private = _notes(tmp_path / "private.csv", ["cardiac", "respiratory", "renal"], 60)
    out = tmp_path / "warm"
    result = _fedward(
        "simulate", "--model", tiny_model_dir, "--data", str(private), "--hospitals", "2",
        "--rounds", "1", "--lora-variant", "lora", "--max-length", "32", "--device", "cpu",
        "--init-adapter", str(adapter), "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sha256 = adapter_content_hash(adapter)
    assert f"starts from adapter {adapter} (sha256 {sha256[:16]}...)" in result.stdout
    assert "2 kept (cardiac, respiratory), 1 new (fresh head rows) (renal)" in result.stdout
    assert "round 1: ok" in result.stdout  # the hospitals accepted the first global adapter
    meta = json.loads((out / "adapter" / "fedward.json").read_text(encoding="utf-8"))
    assert meta["init_adapter"] == {
        "path": str(adapter),
        "sha256": sha256,
        "labels": {"kept": ["cardiac", "respiratory"], "new": ["renal"], "dropped": []},
    }
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    start = next(record for record in audit if record["kind"] == "run.start")
    assert start["fields"]["init_adapter"]["sha256"] == sha256


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--init-adapter", "{tmp}"], "not a fedward adapter folder"),
        (["--init-adapter", "{adapter}", "--lora-rank", "4"], "lora_rank"),
    ],
)
def test_a_starting_adapter_that_cannot_be_used_is_one_line_before_the_run(
    pretrained, tiny_model_dir, tmp_path, flags, expected
):
    private = _notes(tmp_path / "private.csv", ["cardiac", "respiratory"], 40)
    adapter = str(pretrained[0] / "adapter")
    flags = [flag.format(tmp=tmp_path, adapter=adapter) for flag in flags]
    out = tmp_path / "out"
    result = _fedward(
        "simulate", "--model", tiny_model_dir, "--data", str(private), "--lora-variant", "lora",
        "--max-length", "32", "--out", str(out), *flags, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "init_adapter" in lines[0] and expected in lines[0], lines
    assert not out.exists()
