"""Tests for the utility benchmark's own options (bench/utility.py): --set and --only."""

from __future__ import annotations

import argparse

import pytest

from bench import utility


def test_set_converts_values_and_refuses_unknown_fields_and_bad_values():
    assert utility.parse_overrides(["learning-rate=0.001", "max_grad_norm=0.5"]) == {
        "learning_rate": "0.001",
        "max_grad_norm": "0.5",
    }
    with pytest.raises(SystemExit, match="'nope=1'"):
        utility.parse_overrides(["nope=1"])
    with pytest.raises(SystemExit, match="learning_rate"):
        utility.parse_overrides(["learning_rate=fast"])
    # a value for one task only is checked against the corpora it will reach
    assert utility.parse_overrides(["outside_tag_weight=0.3"], ("ner",)) == {
        "outside_tag_weight": "0.3"
    }
    with pytest.raises(SystemExit, match="NER only"):
        utility.parse_overrides(["outside_tag_weight=0.3"], ("classification", "ner"))


def bench_args(model: str, **values) -> argparse.Namespace:
    settings = {
        "seed": 42,
        "max_train": 60,
        "hospitals": 3,
        "rounds": 1,
        "max_length": 32,
        "model": model,
        "epsilons": [1.0, 8.0],
        "only": [],
        "overrides": {},
        "repeats": 1,
    }
    return argparse.Namespace(**{**settings, **values})


def scored_by(monkeypatch, shared_data, scores) -> list:
    """Training stands in by handing out `scores` in turn; the configs it got, in order."""
    seen = []
    scores = iter(scores)

    def fake_train_and_score(config, test):
        seen.append(config)
        return next(scores)

    monkeypatch.setattr(utility, "SHARED", shared_data)
    monkeypatch.setattr(utility, "train_and_score", fake_train_and_score)
    return seen


def test_only_trains_the_named_rows_and_set_reaches_the_run(
    shared_data, tiny_model_dir, tmp_path, monkeypatch
):
    seen = scored_by(monkeypatch, shared_data, [0.5] * 3)
    args = bench_args(
        tiny_model_dir,
        only=["centralized", "federated head-only, DP epsilon 8"],
        overrides=utility.parse_overrides(["max_grad_norm=0.5"]),
    )
    rows = dict(utility.run_corpus("classification", args, tmp_path))

    # the named rows (not FFA-LoRA, not epsilon 1, no local-only) and the ratios they allow;
    # classification trains the head alone by default, and so do its rows
    assert list(rows) == [
        "centralized head-only, no DP (pooled)",
        "centralized head-only, DP epsilon 8 (pooled)",
        "federated head-only, DP epsilon 8",
        "ratio: federated DP / centralized DP, epsilon 8 (target >= 0.97)",
        "ratio: centralized DP / no DP, epsilon 8 (target >= 0.97)",
        "ratio: federated DP epsilon 8 / centralized no DP",
    ]
    assert rows["ratio: federated DP / centralized DP, epsilon 8 (target >= 0.97)"] == "1.00"
    central, central_private, private = seen
    assert (central.simulation.hospitals, central.spec.privacy.dp) == (1, False)
    assert (
        central_private.simulation.hospitals,
        central_private.spec.privacy.dp,
        central_private.spec.privacy.target_epsilon,
    ) == (
        1,
        True,
        8.0,
    )
    assert (
        private.simulation.hospitals,
        private.spec.privacy.dp,
        private.spec.privacy.target_epsilon,
    ) == (3, True, 8.0)
    assert (
        central.spec.model.lora_variant
        == central_private.spec.model.lora_variant
        == private.spec.model.lora_variant
        == "head"
    )
    assert central.spec.privacy.max_grad_norm == private.spec.privacy.max_grad_norm == 0.5


def test_repeats_trains_each_dp_row_again_and_reports_mean_and_range(
    shared_data, tiny_model_dir, tmp_path, monkeypatch
):
    seen = scored_by(monkeypatch, shared_data, [0.60, 0.40, 0.50])
    args = bench_args(
        tiny_model_dir, only=["no DP (pooled)", "federated head-only, DP epsilon 8"], repeats=2
    )
    rows = dict(utility.run_corpus("classification", args, tmp_path))

    # the row without DP is deterministic and trained once; the DP row twice, in its own folders
    assert [config.spec.privacy.dp for config in seen] == [False, True, True]
    assert len({config.local.out for config in seen}) == 3
    assert rows["centralized head-only, no DP (pooled)"] == "0.600"
    assert rows["federated head-only, DP epsilon 8"] == "0.450 (0.400-0.500, 2 runs)"
    assert rows["ratio: federated DP epsilon 8 / centralized no DP"] == "0.75"


def test_ner_rows_train_lora_and_carry_the_ner_target(
    shared_data, tiny_model_dir, tmp_path, monkeypatch
):
    seen = scored_by(monkeypatch, shared_data, [0.70, 0.56, 0.56, 0.28, 0.30])
    args = bench_args(tiny_model_dir, only=["(pooled)", "federated LoRA, DP epsilon 8"], repeats=2)
    rows = dict(utility.run_corpus("ner", args, tmp_path))

    assert [config.spec.model.lora_variant for config in seen] == ["lora"] * 5
    assert rows["federated LoRA, DP epsilon 8"] == "0.290 (0.280-0.300, 2 runs)"
    assert rows["ratio: centralized DP / no DP, epsilon 8 (target >= 0.75)"] == "0.80"
    # federated DP against centralized DP, both with DP: 0.29 / 0.56
    assert rows["ratio: federated DP / centralized DP, epsilon 8 (target >= 0.97)"] == "0.52"
