"""Tests for `RunConfig` (common/config.py): validation, TOML loading, Flower round trip."""

from __future__ import annotations

import pytest

from fedward.common.config import (
    PACKAGED_MODEL,
    FederationSpec,
    PrivacySpec,
    RunConfig,
    RunSpec,
    flat_names,
)
from fedward.common.errors import ConfigError


def test_defaults_are_valid_and_private_by_default():
    config = RunConfig()
    assert config.spec.model.name == PACKAGED_MODEL
    assert config.spec.privacy.dp is True
    assert config.spec.secagg.secure_aggregation is True
    assert config.spec.federation.min_hospitals <= config.simulation.hospitals
    assert RunConfig.build({}) == config


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"rounds": 0}, "rounds"),
        ({"target_epsilon": -1}, "target_epsilon"),
        ({"target_epsilon": 0}, "target_epsilon"),
        ({"delta": 1.5}, "delta"),
        ({"partition": "bogus"}, "partition"),
        ({"partition": "column:"}, "partition"),
        ({"lora_target_modules": []}, "lora_target_modules"),
        ({"lora_target_modules": ["query", " "]}, "lora_target_modules"),
        ({"labels": ["only-one"]}, "labels"),
        ({"labels": ["a", "a"]}, "labels"),
        ({"task": "translation"}, "task"),
        ({"hospitals": 0}, "hospitals"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"lora_variant": "dora"}, "lora_variant"),
        ({"padding": "longest"}, "padding"),
        ({"secagg_bits": 64}, "secagg_bits"),
    ],
)
def test_each_bad_value_is_rejected_naming_the_field(values, field):
    with pytest.raises(ConfigError) as caught:
        RunConfig.build(values, source="my.toml")
    message = str(caught.value)
    assert f"'{field}'" in message
    assert message.startswith("my.toml: ")


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(ConfigError, match="unknown field 'roundz'"):
        RunConfig.build({"roundz": 3})


def test_more_min_hospitals_than_hospitals_is_rejected():
    with pytest.raises(ConfigError, match=r"min_hospitals \(5\) is more than hospitals \(3\)"):
        RunConfig.build({"hospitals": 3, "min_hospitals": 5})


def test_build_accepts_dashed_keys_like_the_cli():
    config = RunConfig.build({"local-epochs": 4, "lora-rank": 4})
    assert (config.spec.training.local_epochs, config.spec.model.lora_rank) == (4, 4)


def test_the_run_spec_is_frozen():
    config = RunConfig()
    with pytest.raises(ValueError, match="frozen"):
        config.spec.federation.rounds = 0
    with pytest.raises(ValueError, match="frozen"):
        config.spec.privacy = PrivacySpec(dp=False)
    changed = config.spec.model_copy(update={"federation": FederationSpec(rounds=5)})
    assert (config.spec.federation.rounds, changed.federation.rounds) == (3, 5)


def test_the_privacy_group_says_whether_training_is_per_patient():
    assert PrivacySpec(dp_unit="patient").per_patient
    assert not PrivacySpec(dp=False, dp_unit="patient").per_patient
    assert not PrivacySpec(dp_unit="record").per_patient


def test_the_task_group_hands_out_its_task():
    assert RunSpec(task="ner").task.definition.name == "ner"
    assert RunSpec().task.definition.primary_metric == "macro_f1"


def test_from_toml_reads_the_file_and_overrides_win(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 5\ntarget_epsilon = 4.0\npartition = "dirichlet"\n', encoding="utf-8")
    config = RunConfig.from_toml(path, overrides={"rounds": 7})
    assert config.spec.federation.rounds == 7  # the flag beats the file
    assert config.spec.privacy.target_epsilon == 4.0  # the file beats the default
    assert config.simulation.partition == "dirichlet"
    assert config.simulation.hospitals == RunConfig().simulation.hospitals  # untouched: the default


def test_from_toml_reads_a_fedward_table(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[fedward]\nhospitals = 4\nlora_target_modules = ["query"]\n', encoding="utf-8")
    config = RunConfig.from_toml(path)
    assert config.simulation.hospitals == 4
    assert config.spec.model.lora_target_modules == ["query"]


def test_from_toml_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="config file not found") as caught:
        RunConfig.from_toml(path)
    assert str(path) in str(caught.value)


def test_from_toml_invalid_toml(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("rounds = = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        RunConfig.from_toml(path)
    assert str(path) in str(caught.value)
    assert "line 1" in str(caught.value)


def test_from_toml_bad_value_names_file_and_field(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("target_epsilon = -1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_toml(path)
    assert str(path) in str(caught.value)
    assert "'target_epsilon'" in str(caught.value)


def test_from_toml_unreadable_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        RunConfig.from_toml(tmp_path)  # a folder


def test_flower_round_trip_keeps_every_value():
    config = RunConfig(
        hospitals=5,
        labels=["flu", "cold", "covid"],
        lora_target_modules=["query", "key", "value"],
        partition="column:site",
        target_epsilon=3.5,
        dp=False,
        data="notes.csv",
    )
    flat = config.to_flower()
    # Flower's run config holds only scalars: lists travel as JSON strings, keys use dashes.
    assert all(isinstance(value, (bool, int, float, str)) for value in flat.values())
    assert flat["lora-target-modules"] == '["query", "key", "value"]'
    assert flat["labels"] == '["flu", "cold", "covid"]'
    assert RunConfig.from_flower(flat) == config


def test_to_flower_drops_none_and_from_flower_ignores_flowers_own_keys():
    flat = RunConfig().to_flower()
    assert "labels" not in flat and "data" not in flat
    restored = RunConfig.from_flower({**flat, "partition-id": 3, "num-partitions": 10})
    assert restored == RunConfig()


def test_from_flower_bad_value_is_a_config_error():
    with pytest.raises(ConfigError, match="Flower run config.*'rounds'"):
        RunConfig.from_flower({"rounds": 0})


def test_digest_changes_with_any_option():
    assert RunConfig().digest() == RunConfig().digest()
    assert RunConfig().digest() != RunConfig(target_epsilon=7.9).digest()


def test_flower_app_config_lists_every_field_with_its_default():
    """`flwr run . --run-config k=v` only accepts keys in [tool.flwr.app.config]."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    table = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(table) == {name.replace("_", "-") for name in flat_names(RunConfig)}
    assert RunConfig.from_flower(table) == RunConfig()


def test_lora_target_modules_default_to_auto_and_a_named_list_still_loads(tmp_path):
    assert RunConfig().spec.model.lora_target_modules == "auto"
    assert (
        RunConfig.build({"lora-target-modules": ["auto"]}).spec.model.lora_target_modules == "auto"
    )  # CLI
    path = tmp_path / "old.toml"
    path.write_text('lora_target_modules = ["query", "value"]\n', encoding="utf-8")
    assert RunConfig.from_toml(path).spec.model.lora_target_modules == ["query", "value"]
    with pytest.raises(ConfigError, match="'lora_target_modules'"):
        RunConfig.build({"lora_target_modules": "query"})


def test_what_trains_defaults_by_task_and_the_run_spec_names_it():
    """Head-only for classification, LoRA for NER, a value set wins; the spec a hospital
    receives (and hashes) names the variant, so no hospital resolves it differently."""
    assert RunConfig().spec.model.lora_variant == "head"
    assert RunConfig(task="ner").spec.model.lora_variant == "lora"
    assert RunConfig(task="ner", lora_variant="head").spec.model.lora_variant == "head"
    spec = RunConfig(task="ner").spec
    assert spec.model.lora_variant == "lora"
    assert (
        RunConfig.from_flower(RunConfig(task="ner").to_flower()).spec.model.lora_variant == "lora"
    )
    assert spec.digest() != RunConfig(task="ner", lora_variant="head").spec.digest()


def test_the_o_tag_weight_defaults_by_task_and_the_run_spec_names_it():
    """NER's class-weighted loss: unset, each task's own weight (1 for classification, where it
    does not apply), resolved into the spec before it travels, so a hospital trains with the
    weight the digest it pinned names, whatever its fedward version's default."""
    from fedward.common.tasks import NER

    assert RunConfig().spec.training.outside_tag_weight == 1.0
    assert RunConfig(task="ner").spec.training.outside_tag_weight == NER.outside_tag_weight
    assert RunConfig(task="ner", outside_tag_weight=0.5).spec.training.outside_tag_weight == 0.5
    assert RunConfig.build(
        {"task": "ner", "outside_tag_weight": ""}
    ).spec.training.outside_tag_weight == (NER.outside_tag_weight)
    sent = RunConfig(task="ner", outside_tag_weight=0.5).spec.to_flower()
    assert sent["outside-tag-weight"] == 0.5
    assert RunSpec.from_flat(sent).training.outside_tag_weight == 0.5


def test_from_flat_reads_flowers_unset_values_back():
    # Flower's scalar config says "unset" with "": it must read back as the default, not crash.
    spec = RunSpec(rounds=4)
    flower = spec.to_flower()
    assert RunSpec.from_flat({**flower, "labels": ""}).digest() == spec.digest()
