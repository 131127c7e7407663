"""Simulated hospitals' data (simulation/hospitals.py), per task."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedward.client.app import read_hospital_file
from fedward.common.config import RunConfig
from fedward.common.errors import DataError
from fedward.simulation.hospitals import simulated_data

CONLL = "".join(f"word{i}\tB-Disease\nis\tO\nbad\tO\n\n" for i in range(10))


class _Context:
    """The two fields of a Flower Context that `simulated_data` reads."""

    def __init__(self, hospital: int) -> None:
        self.node_config = {"partition-id": hospital}
        self.node_id = hospital


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_a_hospital_file_splits_alike_in_deployment_and_in_simulation(task, tmp_path):
    if task == "ner":
        path = tmp_path / "notes.tsv"
        path.write_text(CONLL, encoding="utf-8")
    else:
        path = tmp_path / "notes.csv"
        rows = [f"note number {i},{'flu' if i % 2 else 'cold'}" for i in range(20)]
        path.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    config = RunConfig(
        task=task, data=str(path), hospitals=1, min_hospitals=1, partition="blocks", seed=5
    )

    deployed = read_hospital_file(
        Path(path), config.spec.task, config.data_schema, config.spec.training.seed, "hospital-0"
    )
    simulated = simulated_data(config, _Context(0))

    assert (simulated.train, simulated.val) == (deployed.train, deployed.val)
    assert deployed.val and len(deployed.train) > len(deployed.val)


def test_ner_has_no_label_skew_partition(tmp_path):
    path = tmp_path / "notes.tsv"
    path.write_text(CONLL, encoding="utf-8")
    config = RunConfig(task="ner", data=str(path), hospitals=2, partition="dirichlet")
    with pytest.raises(DataError, match="partition 'dirichlet' is not available.*blocks or iid"):
        simulated_data(config, _Context(0))


def test_the_simulation_runs_patient_level_dp_where_the_data_have_patients(tmp_path):
    from fedward.common.errors import ConfigError
    from fedward.simulation.hospitals import privacy_unit

    def unit(config: RunConfig) -> str:
        return privacy_unit(config.spec.privacy, config.simulation, config.data_schema)

    assert unit(RunConfig()) == "patient"  # synthetic notes
    assert unit(RunConfig(dp_unit="record")) == "record"
    path = str(tmp_path / "notes.csv")
    assert unit(RunConfig(data=path)) == "record"
    with_column = RunConfig(data=path, patient_column="mrn")
    assert unit(with_column) == "patient"
    with pytest.raises(ConfigError, match="patient-column"):
        unit(RunConfig(data=path, dp_unit="patient"))


def test_a_patient_column_reaches_the_simulated_hospitals(tmp_path):
    path = tmp_path / "notes.csv"
    rows = [f"note {i},{'ab'[i % 2]},p{i // 3}" for i in range(30)]
    path.write_text("text,label,mrn\n" + "\n".join(rows) + "\n", encoding="utf-8")
    config = RunConfig(data=str(path), patient_column="mrn", hospitals=2, partition="blocks")
    data = simulated_data(config, _Context(0))
    assert {record.patient for record in data.train + data.val} <= {f"p{i}" for i in range(10)}
