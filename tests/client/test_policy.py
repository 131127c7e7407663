"""Site policy: what a hospital accepts, decided before any record is read."""

import pytest

from fedward.client.policy import SitePolicy, model_content_hash
from fedward.common.config import RunConfig, RunSpec
from fedward.common.errors import ConfigError, ModelError, PolicyError

POLICY_TOML = """
[policy]
allowed_models = ["all-MiniLM-L6-v2"]
allowed_tasks = ["classification"]
lifetime_epsilon = 8.0
max_delta = 1e-5
max_rounds = 20
min_examples = 50
"""


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "site-policy.toml"
    path.write_text(POLICY_TOML)
    return path


def test_load_and_accept_a_conforming_run(policy_file):
    policy = SitePolicy.load(policy_file)
    assert policy.require_secure_aggregation is True  # default
    policy.check(RunSpec(task="classification", target_epsilon=4.0, rounds=10), model_hash=None)


def test_refusal_lists_every_broken_rule(policy_file):
    policy = SitePolicy.load(policy_file)
    run = RunSpec(
        task="ner",
        model="some/other-model",
        target_epsilon=12.0,
        rounds=50,
        secure_aggregation=False,
    )
    with pytest.raises(PolicyError) as caught:
        policy.check(run)
    reason = str(caught.value)
    assert "task 'ner' is not allowed" in reason
    assert "base model 'some/other-model' is not allowed" in reason
    assert "epsilon 12" in reason and "lifetime_epsilon 8" in reason
    assert "50 rounds" in reason
    assert "secure aggregation is off" in reason
    assert str(policy_file) not in reason  # reasons go to the coordinator: no local paths


def test_dp_off_refused_unless_policy_allows(policy_file):
    policy = SitePolicy.load(policy_file)
    with pytest.raises(PolicyError, match="differential privacy is off"):
        policy.check(RunSpec(dp=False, rounds=5))
    SitePolicy.permissive(require_dp=False).check(RunSpec(dp=False))


def test_example_count_checked_separately(policy_file):
    policy = SitePolicy.load(policy_file)
    policy.check_examples(50)
    with pytest.raises(PolicyError, match="only 12 local training examples.*at least 50"):
        policy.check_examples(12)
    with pytest.raises(PolicyError, match="only 12"):
        policy.check(RunSpec(rounds=5), num_examples=12)


def test_model_hash_pinning(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"weights-v1")
    (model_dir / "config.json").write_text("{}")
    digest = model_content_hash(model_dir)
    policy = SitePolicy.permissive(allowed_model_hashes=[digest])
    policy.check(RunSpec(), model_hash=digest)

    # A config edit leaves the hash alone; a weight edit changes it and is refused.
    (model_dir / "config.json").write_text('{"edited": true}')
    assert model_content_hash(model_dir) == digest
    (model_dir / "model.safetensors").write_bytes(b"weights-v2")
    changed = model_content_hash(model_dir)
    assert changed != digest
    with pytest.raises(PolicyError, match="not an allowed model version"):
        policy.check(RunSpec(), model_hash=changed)
    with pytest.raises(PolicyError, match="hash could not be computed"):
        policy.check(RunSpec(), model_hash=None)


def test_model_hash_needs_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weight files"):
        model_content_hash(tmp_path)
    with pytest.raises(ModelError, match="not found"):
        model_content_hash(tmp_path / "missing")


def test_approved_run_config_digests():
    approved = RunConfig(rounds=5)
    policy = SitePolicy.permissive(approved_run_configs=[approved.digest()])
    policy.check(RunSpec(rounds=5))
    with pytest.raises(PolicyError, match="not on the site's approved list"):
        policy.check(RunSpec(rounds=6))


def test_permissive_policy_still_requires_secure_aggregation():
    policy = SitePolicy.permissive()
    policy.check(RunSpec(task="ner", target_epsilon=50, rounds=500), num_examples=3)
    with pytest.raises(PolicyError, match="secure aggregation"):
        policy.check(RunSpec(secure_aggregation=False))
    SitePolicy.permissive(require_secure_aggregation=False).check(RunSpec(secure_aggregation=False))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lifetime_epsilon = -1\n", r"field 'lifetime_epsilon'"),
        ("allowed_tasks = ['summarise']\nlifetime_epsilon = 1\n", r"field 'allowed_tasks\.0'"),
        ("lifetime_epsilon = 1\nlifetime_epsilonn = 2\n", r"unknown field 'lifetime_epsilonn'"),
        ("min_examples = 10\n", r"field 'lifetime_epsilon' is required"),
        ("lifetime_epsilon = 1\napproved_run_configs = ['abc']\n", r"approved_run_configs"),
        ("lifetime_epsilon = \n", r"not valid TOML"),
    ],
)
def test_bad_policy_file_names_file_and_field(tmp_path, text, expected):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as caught:
        SitePolicy.load(path)
    assert str(path) in str(caught.value)


def test_missing_policy_file(tmp_path):
    with pytest.raises(ConfigError, match="site policy file not found"):
        SitePolicy.load(tmp_path / "nope.toml")


def test_declared_labels_must_all_be_listed_by_the_run():
    """The hospital's own label set (issue 28): a run may list more labels, never fewer; judged
    from the policy alone, so the answer is the same whatever the records hold."""
    policy = SitePolicy.build({"lifetime_epsilon": 8.0, "labels": ["cardiac", "respiratory"]})
    policy.check(RunSpec(labels=["cardiac", "respiratory", "renal"], target_epsilon=4.0))
    with pytest.raises(PolicyError) as caught:
        policy.check(RunSpec(labels=["cardiac", "hiv-positive"], target_epsilon=4.0))
    assert caught.value.reason.params == {"rules": "labels"}  # which label: only in the log
    assert "respiratory" in str(caught.value)
    for labels in ([], ["cardiac", "cardiac"]):
        with pytest.raises(ConfigError, match="labels"):
            SitePolicy.build({"lifetime_epsilon": 8.0, "labels": labels})


def test_the_vocabulary_limit_defaults_to_the_run_specs_default():
    assert (
        SitePolicy.build({"lifetime_epsilon": 8.0}).max_unknown_rate
        == RunConfig().spec.task.max_unknown_rate
    )
    with pytest.raises(ConfigError, match="max_unknown_rate"):
        SitePolicy.build({"lifetime_epsilon": 8.0, "max_unknown_rate": 1.5})


def test_the_old_max_epsilon_key_is_refused_naming_its_new_name(tmp_path):
    # A policy written before the rename must not load with a default budget in its place.
    path = tmp_path / "site-policy.toml"
    path.write_text("max_epsilon = 2.0\n")
    with pytest.raises(ConfigError, match="'max_epsilon' is now called 'lifetime_epsilon'"):
        SitePolicy.load(path)


def test_a_patient_policy_refuses_a_record_level_run():
    patient = SitePolicy.build({"lifetime_epsilon": 8.0, "dp_unit": "patient"})
    record = SitePolicy.build({"lifetime_epsilon": 8.0, "dp_unit": "record"})
    by_record, by_patient = RunSpec(dp_unit="record"), RunSpec(dp_unit="patient")
    with pytest.raises(PolicyError) as refused:
        patient.check(by_record)
    assert refused.value.reason.params["rules"] == "dp_unit"
    patient.check(by_patient)
    record.check(by_record)
    record.check(by_patient)  # the stronger unit is always accepted
    # unset, the unit follows the hospital's schema (client/site/pins.py: patient data per patient)
    assert SitePolicy.build({"lifetime_epsilon": 8.0}).dp_unit is None
