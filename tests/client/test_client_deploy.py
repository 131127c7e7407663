"""A hospital's SuperNode settings (client/deploy/supernode.py), without processes."""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

import pytest

from fedward.client.deploy import supernode
from fedward.client.site import Site
from fedward.common.config import DataSchema, RunSpec
from fedward.common.errors import ConfigError, DataError, PolicyError


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("notes.csv", "policy.toml", "ca.crt", "node.key")}
    paths["notes.csv"].write_text("text,label\nx,a\n", encoding="utf-8")
    paths["policy.toml"].write_text("lifetime_epsilon = 8.0\n", encoding="utf-8")
    paths["ca.crt"].write_text("pem", encoding="utf-8")
    paths["node.key"].write_text("key", encoding="utf-8")
    return paths


def _settings(files, tmp_path, **values) -> supernode.HospitalSettings:
    base = {
        "server": "fl.example.org:8000",
        "data": files["notes.csv"],
        "policy": files["policy.toml"],
        "ledger": tmp_path / "my ledger",
        "ca": files["ca.crt"],
        "key": files["node.key"],
        "name": "st-mary",
        "dataset_id": "icu-notes",
    }
    return supernode.HospitalSettings(**{**base, **values})


def test_the_supernode_gets_tls_its_key_and_a_node_config_file(files, tmp_path):
    command = supernode.prepare_supernode(_settings(files, tmp_path))
    assert Path(command[0]).name == "flower-supernode"
    assert command[command.index("--root-certificates") + 1] == str(files["ca.crt"])
    assert command[command.index("--auth-supernode-private-key") + 1] == str(files["node.key"])
    assert "--insecure" not in command
    node_config_file = Path(command[command.index("--node-config") + 1])
    assert node_config_file.suffix == ".toml"  # Flower reads a .toml file as the node config
    values = tomllib.loads(node_config_file.read_text(encoding="utf-8"))
    assert values == {
        "data-path": str(files["notes.csv"].resolve()),
        "policy": str(files["policy.toml"].resolve()),
        "ledger": str((tmp_path / "my ledger").resolve()),
        "audit-log": str((tmp_path / "my ledger" / "audit.jsonl").resolve()),
        "hospital-name": "st-mary",
        "dataset-id": "icu-notes",  # the ledger's name, required
        "device": "auto",
        "prefix-cache": True,
        "prefix-cache-mb": 512,
        "own-model": True,  # the hospital's own model at a run's last round, kept at home
        "text-column": "text",
        "label-column": "label",
        "val-fraction": 0.2,
    }


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"ca": None}, ConfigError, "--ca: required"),
        ({"insecure": True}, ConfigError, "node authentication needs TLS"),
        ({"server": "fl.example.org"}, ConfigError, "give HOST:PORT"),
        ({"device": "tpu"}, ConfigError, "use auto, cpu or cuda"),
        ({"data": Path("/nonexistent/notes.csv")}, DataError, "data file not found"),
        ({"policy": Path("/nonexistent/policy.toml")}, ConfigError, "site policy file not found"),
        ({"dataset_id": None}, ConfigError, "--dataset-id: required"),
        ({"dataset_id": "../other"}, ConfigError, "--dataset-id '../other'"),
    ],
)
def test_bad_settings_stop_before_anything_starts(files, tmp_path, change, error, message):
    with pytest.raises(error, match=message):
        supernode.prepare_supernode(_settings(files, tmp_path, **change))
    assert not (tmp_path / "my ledger").exists()


def test_every_hospital_process_runs_without_a_model_hub(files, tmp_path, monkeypatch):
    """Issue 28, 3(b): the SuperNode and every ClientApp process it leads to are offline."""
    started = {}

    class Started:
        def __init__(self, command, env=None, preexec_fn=None):
            started["env"] = env

    monkeypatch.setattr(supernode.subprocess, "Popen", Started)
    monkeypatch.setattr(supernode, "_stop", lambda process: None)
    monkeypatch.setattr("fedward.client.deploy.runtime.serve_tasks", lambda address, supernode: 0)
    for name in supernode.OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    command = supernode.prepare_supernode(_settings(files, tmp_path))
    assert supernode.run_supernode(command, _settings(files, tmp_path)) == 0
    for name, value in supernode.OFFLINE_ENV.items():
        assert started["env"][name] == value  # the SuperNode
        assert os.environ[name] == value  # this process, and the ClientApp processes it starts


def test_insecure_mode_runs_without_certificates_or_key(files, tmp_path):
    command = supernode.prepare_supernode(
        _settings(files, tmp_path, insecure=True, ca=None, key=None)
    )
    assert "--insecure" in command and "--auth-supernode-private-key" not in command


def test_flower_starts_no_client_app_itself(files, tmp_path):
    """The SuperNode runs in process isolation: only fedward's own task processes
    (client/deploy/runtime.py) run a ClientApp, never one Flower loads from the app bundle."""
    command = supernode.prepare_supernode(_settings(files, tmp_path))
    assert command[command.index("--isolation") + 1] == "process"


def test_each_task_runs_in_this_python_without_the_working_directory_on_its_path():
    from fedward.client.deploy.runtime import task_command

    command = task_command("127.0.0.1:9094", "token")
    assert command[:4] == [sys.executable, "-P", "-m", "fedward.client.deploy.runtime"]


def test_the_hospitals_data_schema_reaches_its_clientapp(files, tmp_path):
    """`fedward client start --text-column/--label-column/--patient-column/--val-fraction`: the
    schema is the hospital's, written into its node config, and the site reads the data file
    with it."""
    schema = DataSchema(
        text_column="note", label_column="diagnosis", patient_column="mrn", val_fraction=0.3
    )
    command = supernode.prepare_supernode(_settings(files, tmp_path, schema=schema))
    node_config_file = Path(command[command.index("--node-config") + 1])
    values = tomllib.loads(node_config_file.read_text(encoding="utf-8"))
    assert Site.open(values, "st-mary").schema == schema


def test_the_hospital_sets_its_own_prefix_cache_and_a_bad_value_refuses_every_round(
    files, tmp_path
):
    """`fedward client start --no-prefix-cache --prefix-cache-mb N`: the hospital's machine,
    the hospital's choice. It reaches the config the trainer uses; the run spec cannot set it."""
    import dataclasses

    settings = dataclasses.replace(
        _settings(files, tmp_path), prefix_cache=False, prefix_cache_mb=64
    )
    command = supernode.prepare_supernode(settings)
    values = tomllib.loads(Path(command[command.index("--node-config") + 1]).read_text("utf-8"))
    site = Site.open(values, "st-mary")
    config = site.check_policy(RunSpec(labels=["a", "b"]))
    assert (config.local.prefix_cache, config.local.prefix_cache_mb) == (False, 64)
    assert (
        Site.open({**values, "prefix-cache": True}, "st-mary")
        .check_policy(RunSpec(labels=["a", "b"]))
        .local.prefix_cache
    )

    with pytest.raises(PolicyError, match=r"local settings \(prefix cache, own model\)"):
        Site.open({**values, "prefix-cache-mb": -1}, "st-mary")
    with pytest.raises(ConfigError, match="--prefix-cache-mb -1"):
        supernode.prepare_supernode(dataclasses.replace(settings, prefix_cache_mb=-1))
