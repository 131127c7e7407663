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


def test_only_trains_the_named_rows_and_set_reaches_the_run(
    shared_data, tiny_model_dir, tmp_path, monkeypatch
):
    seen = []

    def fake_train_and_score(config, test):
        seen.append(config)
        return 0.5

    monkeypatch.setattr(utility, "SHARED", shared_data)
    monkeypatch.setattr(utility, "train_and_score", fake_train_and_score)
    args = bench_args(
        tiny_model_dir,
        only=["centralized", "federated LoRA, DP epsilon 8"],
        overrides=utility.parse_overrides(["max_grad_norm=0.5"]),
    )
    rows = dict(utility.run_corpus("classification", args, tmp_path))

    # the named rows (not FFA-LoRA, not epsilon 1, no local-only) and the ratios they allow
    assert list(rows) == [
        "centralized LoRA, no DP (pooled)",
        "centralized LoRA, DP epsilon 8 (pooled)",
        "federated LoRA, DP epsilon 8",
        "ratio: federated DP epsilon 8 / centralized (target >= 0.95)",
        "ratio: centralized DP epsilon 8 / centralized (DP alone)",
    ]
    assert rows["ratio: federated DP epsilon 8 / centralized (target >= 0.95)"] == "1.00"
    central, central_private, private = seen
    assert (central.hospitals, central.dp) == (1, False)
    assert (central_private.hospitals, central_private.dp, central_private.epsilon) == (
        1,
        True,
        8.0,
    )
    assert (private.hospitals, private.dp, private.epsilon, private.lora_variant) == (
        3,
        True,
        8.0,
        "lora",
    )
    assert central.max_grad_norm == private.max_grad_norm == 0.5


def test_repeats_trains_each_dp_row_again_and_reports_mean_and_range(
    shared_data, tiny_model_dir, tmp_path, monkeypatch
):
    scores = iter([0.60, 0.40, 0.50])
    seen = []

    def fake_train_and_score(config, test):
        seen.append(config)
        return next(scores)

    monkeypatch.setattr(utility, "SHARED", shared_data)
    monkeypatch.setattr(utility, "train_and_score", fake_train_and_score)
    args = bench_args(
        tiny_model_dir, only=["no DP (pooled)", "federated LoRA, DP epsilon 8"], repeats=2
    )
    rows = dict(utility.run_corpus("classification", args, tmp_path))

    # the row without DP is deterministic and trained once; the DP row twice, in its own folders
    assert [config.dp for config in seen] == [False, True, True]
    assert len({config.out for config in seen}) == 3
    assert rows["centralized LoRA, no DP (pooled)"] == "0.600"
    assert rows["federated LoRA, DP epsilon 8"] == "0.450 (0.400-0.500, 2 runs)"
    assert rows["ratio: federated DP epsilon 8 / centralized (target >= 0.95)"] == "0.75"
