"""Many hospitals on few workers: sampling, dropouts at every stage, one model per worker."""

from __future__ import annotations

import json

import pytest

from fedward.common.config import RunConfig
from fedward.simulation.app import DROPOUT_STAGES, dropout_stage
from fedward.simulation.hospitals import simulated_data
from fedward.simulation.runner import plan_workers, simulate


class _Context:
    """The two fields of a Flower Context that `simulated_data` reads."""

    def __init__(self, hospital: int) -> None:
        self.node_config = {"partition-id": hospital}
        self.node_id = hospital


def _config(tiny_model_dir, tmp_path, **values) -> RunConfig:
    base = {
        "model": tiny_model_dir,
        "notes_per_hospital": 20,
        "rounds": 1,
        "max_length": 48,
        "out": str(tmp_path / "out"),
    }
    return RunConfig.build({**base, **values})


def test_more_hospitals_than_workers_each_trains_on_its_own_data(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, hospitals=5, workers=2, seed=7)
    assert plan_workers(config.simulation, config.local.device).workers == 2

    result = simulate(config)

    row = result.rounds[0]
    assert row["status"] == "ok"
    trained = {name: h for name, h in row["hospitals"].items() if h.get("trained")}
    assert sorted(trained) == [f"hospital-{i}" for i in range(5)]
    prepared = config.updated(**{"labels": result_labels(result)})
    for hospital in range(5):
        own = simulated_data(prepared, _Context(hospital))
        assert trained[f"hospital-{hospital}"]["num_train_examples"] == len(own.train)
    # The base model is built once per worker process, however many hospitals it serves.
    workers = {h["worker_pid"]: h["model_loads"] for h in trained.values()}
    assert 1 <= len(workers) <= 2
    assert set(workers.values()) == {1}


def result_labels(result) -> list[str]:
    return json.loads((result.adapter_dir / "fedward.json").read_text())["labels"]


def _scenario(hospitals: int, rounds: int, rate: float) -> int:
    """A seed whose dropouts include a recoverable late-stage drop in an otherwise fine round."""
    for seed in range(500):
        stages = [
            [dropout_stage(seed, r, h, rate) for h in range(hospitals)]
            for r in range(1, rounds + 1)
        ]
        first = stages[0]
        survivors = sum(stage in (None, "unmask") for stage in first)
        late = any(stage in ("share_keys", "masked_update", "unmask") for stage in first)
        # Enough survivors: the signatures a hospital needs on the survivor set before it
        # reveals shares are at least a majority of the round's cohort.
        majority = hospitals // 2 + 1
        if late and survivors >= majority and sum(s is not None for s in first) >= 2:
            return seed
    raise AssertionError("no seed gives the scenario")


def test_dropouts_at_any_stage_are_recovered_or_fail_cleanly(tiny_model_dir, tmp_path):
    hospitals, rounds, rate = 6, 2, 0.4
    seed = _scenario(hospitals, rounds, rate)
    config = _config(
        tiny_model_dir, tmp_path, hospitals=hospitals, rounds=rounds, dropout_rate=rate, seed=seed
    )

    result = simulate(config)

    assert len(result.rounds) == rounds
    for server_round, row in enumerate(result.rounds, start=1):
        stages = {
            f"hospital-{h}": dropout_stage(seed, server_round, h, rate) for h in range(hospitals)
        }
        assert set(stages.values()) <= {None, *DROPOUT_STAGES}
        trained = {name for name, h in row["hospitals"].items() if h.get("trained")}
        if row["status"] == "ok":
            # In the sum: everyone who sent a masked update (a drop at unmask is recovered).
            assert trained == {name for name, stage in stages.items() if stage in (None, "unmask")}
            assert len(row["dropped"]) == sum(
                stage is not None and stage != "unmask" for stage in stages.values()
            )
        else:
            assert row["status"].startswith("failed")
            assert "global adapter unchanged" in row["status"]
    # Round 1 was chosen to include a late drop with enough survivors: it must have completed.
    assert result.rounds[0]["status"] == "ok"
    assert result.rounds[0]["dropped"]


def test_too_many_dropouts_fail_the_round_and_keep_the_adapter(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, hospitals=3, rounds=1, dropout_rate=0.95, seed=1)
    stages = [dropout_stage(1, 1, h, 0.95) for h in range(3)]
    assert sum(stage in (None, "unmask") for stage in stages) < 2  # the scenario under test

    from fedward.common.model import build_model, get_adapter_arrays

    result = simulate(config)

    row = result.rounds[0]
    assert row["status"].startswith("failed")
    assert result.arrays is not None
    labels = result_labels(result)
    initial = get_adapter_arrays(
        build_model(config.updated(**{"labels": labels}).spec, len(labels))
    )
    for name, value in initial.items():
        assert (result.arrays[name] == value).all(), name


@pytest.mark.parametrize("cpus, hospitals, expected", [(2, 50, 2), (16, 3, 3), (1, 10, 1)])
def test_worker_count_follows_the_machine_not_the_hospitals(cpus, hospitals, expected):
    config = RunConfig(hospitals=hospitals)
    assert (
        plan_workers(config.simulation, config.local.device, cpus=cpus, gpus=0).workers == expected
    )
