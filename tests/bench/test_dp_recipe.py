"""Tests for the DP recipe sweep (bench/dp_recipe.py): its grid and one real, tiny setting."""

from __future__ import annotations

import argparse

import pytest

from bench import dp_recipe


def test_grid_is_the_product_of_its_axes_and_refuses_unknown_fields_and_bad_values():
    settings = dp_recipe.grid_settings(["batch_size=64,256", "local-epochs=1,3,5"])
    assert len(settings) == 6
    assert {"batch_size": "256", "local_epochs": "5"} in settings
    assert dp_recipe.grid_settings(["setting=central,federated"]) == [
        {"setting": "central"},
        {"setting": "federated"},
    ]
    with pytest.raises(SystemExit, match="'speed=1,2'"):
        dp_recipe.grid_settings(["speed=1,2"])
    with pytest.raises(SystemExit, match="batch_size"):
        dp_recipe.grid_settings(["batch_size=64,many"])


def test_grid_values_are_checked_against_the_corpus_task():
    # NER's class-weighted loss is a valid NER grid, and refused up front for classification
    assert dp_recipe.grid_settings(["outside_tag_weight=0.1,0.3"], {"task": "ner"}) == [
        {"outside_tag_weight": "0.1"},
        {"outside_tag_weight": "0.3"},
    ]
    with pytest.raises(SystemExit, match="NER only"):
        dp_recipe.grid_settings(["outside_tag_weight=0.1"], {"task": "classification"})


def test_a_federated_setting_trains_every_hospital_under_its_dp_plan(tiny_model_dir):
    args = argparse.Namespace(
        seed=7,
        hospitals=2,
        max_train=0,
        threads=1,
        fixed={"model": tiny_model_dir, "notes_per_hospital": "30", "max_length": "32"},
    )
    values = {"rounds": "2", "target_epsilon": "3", "batch_size": "8"}
    run = dp_recipe.train_setting("synthetic", "federated", values, args)

    # the epsilon each hospital spent over both rounds is the one asked for, not more
    assert run["epsilon"] == pytest.approx(3.0, rel=0.01)
    assert 0.0 <= run["score"] <= 1.0
    plain = dp_recipe.train_setting("synthetic", "central", {**values, "dp": "false"}, args)
    assert plain["epsilon"] is None
