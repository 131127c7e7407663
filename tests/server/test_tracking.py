"""`--tracking mlflow`: a simulation recorded in MLflow and read back with MLflow's own client.

One tiny simulation (2 hospitals, 2 rounds, about 30 s) runs through the command's own code path
(`run_simulation_with_report`, as `fedward simulate --tracking mlflow` calls it); the test then
opens the local store in the output folder with `MlflowClient` and finds the run spec as
parameters, every round's global metrics and epsilon, and the adapter as an artifact that PEFT
can load. The pure parts (which numbers a row gives, which URI a flag names) are tested alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedward.common.config import RunConfig
from fedward.common.errors import ConfigError
from fedward.common.protocol.reasons import Reason
from fedward.server.tracking import metric_key, round_metrics, tracking_uri

pytest.importorskip("mlflow", reason='MLflow\'s client is not installed (pip install -e ".[dev]")')


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    from fedward.simulation.cli import run_simulation_with_report
    from fedward.simulation.hospitals import prepare_config

    out = tmp_path_factory.mktemp("tracked") / "out"
    config = RunConfig(
        model=tiny_model_dir,
        hospitals=2,
        min_hospitals=2,
        rounds=2,
        notes_per_hospital=40,
        max_length=64,
        device="cpu",
        secure_aggregation=False,
        out=str(out),
    )
    run_simulation_with_report(config, tracking="mlflow")
    return prepare_config(config), out


def _the_run(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedward")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def test_the_run_spec_is_recorded_as_parameters(tracked_run):
    config, out = tracked_run
    _, run = _the_run(out)
    params = run.data.params
    assert params["task"] == "classification"
    assert (
        float(params["target_epsilon"]) == config.spec.privacy.target_epsilon
        and params["dp"] == "True"
    )
    assert params["rounds"] == "2" and params["model"] == config.spec.model.name
    assert json.loads(params["labels"]) == config.spec.task.labels
    assert params["local.hospitals"] == "2" and params["local.out"] == str(out)
    assert run.data.tags["fedward.spec_sha256"] == config.digest()
    assert run.data.tags["fedward.kind"] == "simulation"
    assert run.info.status == "FINISHED"
    history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    assert run.data.tags["fedward.run_id"] == history["run_id"]


def test_every_round_s_metrics_and_epsilon_are_recorded(tracked_run):
    _, out = tracked_run
    client, run = _the_run(out)
    rows = json.loads((out / "history.json").read_text(encoding="utf-8"))["rounds"]
    loss = client.get_metric_history(run.info.run_id, "global.loss")
    assert [(m.step, m.value) for m in loss] == [(r["round"], r["global"]["loss"]) for r in rows]
    accuracy = client.get_metric_history(run.info.run_id, "global.accuracy")
    assert [m.value for m in accuracy] == [r["global"]["accuracy"] for r in rows]
    for name in ("hospital-0", "hospital-1"):
        epsilon = client.get_metric_history(run.info.run_id, f"epsilon.{name}")
        assert [m.step for m in epsilon] == [1, 2]
        assert [m.value for m in epsilon] == [r["hospitals"][name]["epsilon"] for r in rows]
        assert 0 < epsilon[0].value < epsilon[1].value
    participants = client.get_metric_history(run.info.run_id, "participants")
    assert [m.value for m in participants] == [2.0, 2.0]
    # worth joining: each hospital's alone / global / own, at the last round
    for name in ("hospital-0", "hospital-1"):
        for which in ("alone", "global", "own"):
            (figure,) = client.get_metric_history(run.info.run_id, f"joining.{which}.{name}")
            assert figure.step == 2
            assert figure.value == rows[-1]["hospitals"][name][f"personal_{which}"]


def test_the_adapter_is_an_artifact_peft_loads(tracked_run, tmp_path):
    import mlflow
    from peft import PeftConfig

    _, out = tracked_run
    client, run = _the_run(out)
    names = {item.path for item in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= names
    assert "history.json" in {item.path for item in client.list_artifacts(run.info.run_id)}
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id,
        artifact_path="adapter",
        dst_path=str(tmp_path),
        tracking_uri=f"sqlite:///{out / 'mlflow.db'}",
    )
    assert PeftConfig.from_pretrained(local).peft_type is not None
    assert (Path(local) / "adapter_model.safetensors").read_bytes() == (
        out / "adapter" / "adapter_model.safetensors"
    ).read_bytes()


def test_a_round_with_a_refusal_and_missing_numbers_gives_only_numbers():
    row = {
        "round": 3,
        "status": "failed: too few hospitals",
        "train_loss": None,
        "global": {"loss": 1.5, "accuracy": None},
        "hospitals": {
            "north": {"trained": True, "epsilon": 4.0},
            "south wing/2": {"trained": True, "epsilon": 5.0},
            "east": {"refused": Reason("budget.exceeded").render()},
        },
        "refused": {"east": Reason("budget.exceeded").render()},
        "rejected": {},
        "dropped": ["node-7"],
        "seconds": 12.0,
    }
    assert round_metrics(row) == {
        "global.loss": 1.5,
        "epsilon.north": 4.0,
        "epsilon.south wing/2": 5.0,
        "epsilon_max": 5.0,
        "participants": 2.0,
        "refused": 1.0,
        "dropped": 1.0,
        "round_ok": 0.0,
        "seconds": 12.0,
    }
    assert metric_key("st-mary's <hospital>") == "st-mary_s _hospital_"


def test_the_tracking_flag_names_a_local_store_or_a_server(tmp_path):
    assert tracking_uri("mlflow", tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking_uri("http://mlflow.example:5000", tmp_path) == "http://mlflow.example:5000"
    assert tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    with pytest.raises(ConfigError, match="--tracking 'tensorboard'"):
        tracking_uri("tensorboard", tmp_path)
