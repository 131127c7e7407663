"""Simulated hospitals: where their data come from (synthetic notes, or a share of a pooled
file) and their site (`SimulatedSite`: no policy or ledger, the DP history in the node state).

Runs inside each simulation worker. Reading and partitioning are cached per process, so a worker
serving many virtual hospitals reads the pooled file once.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from flwr.app import ConfigRecord, Context

from fedward.client.app import HospitalData, hospital_name
from fedward.client.model_cache import cached_model
from fedward.client.own_model import OwnModel
from fedward.client.personalize import OWN_FOLDER
from fedward.client.privacy.accounting import DPPlan, plan_dp, privacy_units
from fedward.client.privacy.release import exact_metrics
from fedward.client.secagg import SecAggIdentity
from fedward.client.trainer import HistoryEntry, TrainResult
from fedward.common.config import (
    DataSchema,
    ModelSpec,
    PrivacySpec,
    RunConfig,
    RunSpec,
    SimulatedData,
    TaskSpec,
    TrainingSpec,
)
from fedward.common.data import EncodedDataset
from fedward.common.errors import ConfigError, DataError
from fedward.common.files.atomic import write_json_atomic
from fedward.common.model import save_adapter, set_adapter_arrays
from fedward.common.tasks import Task
from fedward.simulation import partition
from fedward.simulation.synthetic import synthetic_examples, synthetic_labels

DP_STATE = "fedward.dp"  # node-state record holding the accountant history within a run


class SimulatedSite:
    """A simulated hospital's site: accepts every run, adds the simulation's local settings,
    keeps the run's accountant history in the node state (no ledger, no audit log).

    Unlike a deployed hospital it reports exact metrics: training loss, example counts and
    evaluation of every round, unnoised and uncharged (the report says so)."""

    releases_exact_metrics = True

    def __init__(self, context: Context, settings: RunConfig | None) -> None:
        self.context = context
        self.settings = settings
        self._rounds: int | None = None  # the admitted run's rounds

    def check_policy(self, spec: RunSpec) -> RunConfig:
        settings = self.settings or RunConfig()
        return settings.model_copy(update={"spec": spec})

    def admit(self, spec, run_id, server_round, global_arrays) -> tuple[RunConfig, None]:
        self._rounds = spec.federation.rounds  # the run's, for `check_budget`'s plan
        return self.check_policy(spec), None

    def run_history(self, run_id: str, server_round: int) -> list[HistoryEntry]:
        record = self.context.state.get(DP_STATE)
        if record is None:
            return []
        return [tuple(entry) for entry in json.loads(str(record["history"]))]

    def check_budget(
        self, privacy: PrivacySpec, training: TrainingSpec, dataset: EncodedDataset
    ) -> DPPlan | None:
        """The round's DP plan on the units trained (no ledger: the trainer still refuses a
        round past the run's own epsilon)."""
        if not privacy.dp:
            return None
        if self._rounds is None:
            raise RuntimeError("SimulatedSite.check_budget called before SimulatedSite.admit")
        return plan_dp(privacy, training, self._rounds, max(privacy_units(privacy, dataset), 1))

    def record(self, privacy, run_id, server_round, result: TrainResult, global_arrays) -> None:
        self.context.state[DP_STATE] = ConfigRecord({"history": json.dumps(result.history)})

    def refused(self, run_id: str, server_round: int, stage: str, exc: Exception) -> None:
        return None  # the coordinator's round table shows it

    def admit_evaluation(self, spec: RunSpec, run_id: str, server_round: int) -> RunConfig:
        return self.check_policy(spec)

    def release_evaluation(self, run_id, server_round, predictions) -> dict[str, float]:
        return exact_metrics(predictions)

    def keep_own_model(self, run_id: str, own: OwnModel) -> None:
        """The simulation's output folder holds each hospital's own adapter (`own/<name>/`),
        which `fedward predict --adapter` reads; the report's figures go in the reply."""
        name = hospital_name(self.context)
        model = cached_model(own.model, own.task, own.seed)
        set_adapter_arrays(model, own.arrays)
        folder = Path((self.settings or RunConfig()).local.out) / OWN_FOLDER / name
        save_adapter(model, folder, list(own.task.labels or []), own.task, own.model)
        write_json_atomic(folder / "report.json", {"hospital": name, **own.report.as_dict()})

    def secagg_identity(self) -> SecAggIdentity:
        """Generated keys, and the roster of the whole simulated federation."""
        node_config = self.context.node_config
        return SecAggIdentity.simulated(
            int(node_config["partition-id"]), int(node_config["num-partitions"])
        )


def prepare_config(config: RunConfig) -> RunConfig:
    """Check the simulation and fill in what the coordinator must know before round 1: the
    privacy unit (`privacy_unit`) and the label set of the data."""
    if config.spec.federation.min_hospitals > config.simulation.hospitals:
        raise ConfigError(
            f"field 'min_hospitals': {config.spec.federation.min_hospitals} is more than hospitals "
            f"({config.simulation.hospitals}) in this simulation; pass --min-hospitals "
            f"{config.simulation.hospitals} or more hospitals"
        )
    sampled = max(round(config.spec.federation.fraction * config.simulation.hospitals), 1)
    trusted = config.spec.privacy.noise_hospitals
    if trusted > sampled:
        raise ConfigError(
            f"field 'noise_hospitals': the noise is split over {trusted} "
            f"honest hospitals, but a round samples about {sampled} of the "
            f"{config.simulation.hospitals}; pass --noise-hospitals {sampled} or fewer"
        )
    unit = privacy_unit(config.spec.privacy, config.simulation, config.data_schema)
    if unit != config.spec.privacy.dp_unit:
        config = config.updated(dp_unit=unit)
    spec, simulation, schema = config.spec, config.simulation, config.data_schema
    check_pooled_vocabulary(spec.task, spec.model, spec.training.seed, simulation, schema)
    if spec.task.labels:
        return config
    task = spec.task.definition
    if simulation.data is None:
        labels = synthetic_labels(
            spec.task.name,
            simulation.hospitals,
            [simulation.notes_of(h) for h in range(simulation.hospitals)],
            spec.training.seed,
        )
    else:
        pooled = _pooled_as_hospitals_read_it(spec.task, simulation, schema)
        labels = task.label_set(list(pooled), simulation.data)
    return config.updated(labels=labels)


def privacy_unit(privacy: PrivacySpec, simulation: SimulatedData, schema: DataSchema) -> str:
    """The run's DP unit: as set, else the patient where the data have patients (the synthetic
    notes always do; a file when `patient_column` names its column), else the record.

    Args:
        privacy: The run's privacy group (`dp_unit`, and whether it was set).
        simulation: Where the simulated hospitals' data come from (`data`: None for the
            synthetic notes).
        schema: How the data file is read (`patient_column`).

    Returns:
        "patient" or "record": the spec's `dp_unit` unless it was left unset.

    Raises:
        ConfigError: a patient-level run on a file without a patient column.
    """
    has_patients = simulation.data is None or schema.patient_column
    if "dp_unit" not in privacy.model_fields_set and has_patients:
        return "patient"
    if privacy.per_patient and not has_patients:
        raise ConfigError(
            "field 'dp_unit': patient-level DP needs the data's patient column; pass "
            "--patient-column NAME (or --dp-unit record)"
        )
    return privacy.dp_unit


def check_pooled_vocabulary(
    task: TaskSpec, model: ModelSpec, seed: int, simulation: SimulatedData, schema: DataSchema
) -> float:
    """The vocabulary guard before any hospital starts: the unknown share of the pooled data
    file (or of the first hospital's synthetic notes); `VocabularyError` above the run's
    `max_unknown_rate`. Each hospital still checks its own share before every round.

    Args:
        task: The run's task group (`max_unknown_rate`; the task that reads the data).
        model: The run's model group (whose tokenizer is checked).
        seed: The run's seed (the synthetic notes').
        simulation: The simulated hospitals and where their data come from.
        schema: How the data file is read.

    Returns:
        The unknown share found.
    """
    from fedward.client.model_cache import cached_tokenizer
    from fedward.common.coverage import check_vocabulary

    if simulation.data is None:
        examples = synthetic_examples(
            task.name, 0, simulation.notes_of(0), seed, simulation.hospitals
        )
    else:
        examples = _pooled_as_hospitals_read_it(task, simulation, schema)
    tokenizer = cached_tokenizer(model.name)
    return check_vocabulary(tokenizer, examples, model.name, task.max_unknown_rate)


def _pooled_as_hospitals_read_it(
    task: TaskSpec, simulation: SimulatedData, schema: DataSchema
) -> tuple:
    """The data file read with every column the hospitals will read (the patient column and a
    `column:NAME` partition's group included), so that a bad cell fails here, before round 1,
    with its file and line, not inside every hospital's worker."""
    scheme = simulation.partition
    return _pooled(
        task.definition,
        simulation.data,
        schema.text_column,
        schema.label_column,
        scheme.removeprefix("column:") if scheme.startswith("column:") else None,
        schema.patient_column,
    )


def simulated_data(config: RunConfig, context: Context) -> HospitalData:
    """The share of hospital `partition-id` (a `client.app.DataSource`: the client calls it
    with the whole config, so it takes it, and passes on only the groups the split reads)."""
    train, val, source = _share(
        config.spec.task,
        config.spec.training.seed,
        config.simulation,
        config.data_schema,
        int(context.node_config["partition-id"]),
    )
    return HospitalData(hospital_name(context), train, val, source)


def hospital_shares(
    task: TaskSpec, seed: int, simulation: SimulatedData, schema: DataSchema
) -> list[HospitalData]:
    """Every simulated hospital's share, as its ClientApp reads it (`simulated_data`): for
    benchmarks that train the hospitals' own models outside a run.

    Args:
        task: The run's task group (the task that reads and splits the data).
        seed: The run's seed (`spec.training.seed`).
        simulation: The simulated hospitals and where their data come from.
        schema: How the data file is read.

    Returns:
        One `HospitalData` per hospital, named `hospital-<number>`.
    """
    return [
        hospital_share(task, seed, simulation, schema, number)
        for number in range(simulation.hospitals)
    ]


def hospital_share(
    task: TaskSpec, seed: int, simulation: SimulatedData, schema: DataSchema, hospital: int
) -> HospitalData:
    """Simulated hospital `hospital`'s share, as its ClientApp reads it (`simulated_data`).

    Args:
        task: The run's task group (the task that reads and splits the data).
        seed: The run's seed (`spec.training.seed`).
        simulation: The simulated hospitals and where their data come from.
        schema: How the data file is read.
        hospital: The hospital's index (its `partition-id`).

    Returns:
        Its training and validation examples, named `hospital-<hospital>`.
    """
    return HospitalData(f"hospital-{hospital}", *_share(task, seed, simulation, schema, hospital))


def _share(
    task: TaskSpec, seed: int, simulation: SimulatedData, schema: DataSchema, hospital: int
) -> tuple[list, list, str]:
    # The split depends on the task, the seed and every field of `SimulatedData`, no other.
    shared = json.dumps({**simulation.values_of(SimulatedData), **schema.model_dump()})
    train, val, source = _hospital_split(task.definition, seed, shared, hospital)
    return list(train), list(val), source


@lru_cache(maxsize=8)
def _hospital_split(
    task: Task, seed: int, shared_json: str, hospital: int
) -> tuple[tuple, tuple, str]:
    shared = json.loads(shared_json)
    data, text_column, label_column = shared["data"], shared["text_column"], shared["label_column"]
    patient_column = shared.get("patient_column")
    scheme, alpha, hospitals = shared["partition"], shared["alpha"], shared["hospitals"]
    sizes = [int(size) for size in shared["notes_per_hospital"].split(",")]
    sizes = sizes * hospitals if len(sizes) == 1 else sizes
    val_fraction = shared["val_fraction"]
    if data is None and scheme == "auto":
        examples = synthetic_examples(task.name, hospital, sizes[hospital], seed, hospitals)
        source = f"synthetic notes of hospital-{hospital}"
    else:
        group_column = scheme.removeprefix("column:") if scheme.startswith("column:") else None
        if data is None:
            pooled = _synthetic_pool(task.name, hospitals, tuple(sizes), seed)
        else:
            pooled = _pooled(task, data, text_column, label_column, group_column, patient_column)
        shares = _split(task, scheme, pooled, hospitals, alpha, seed)
        examples = [pooled[i] for i in shares[hospital]]
        source = f"{data or 'synthetic notes'} ({scheme} share {hospital + 1}/{hospitals})"
    train, val = task.split(examples, val_fraction, seed + hospital)
    return tuple(train), tuple(val), source


def _split(task: Task, scheme: str, pooled, hospitals, alpha, seed) -> list[list[int]]:
    """Each hospital's indices into `pooled`; iid and Dirichlet shares keep each patient whole
    at one hospital where the examples name patients."""
    if scheme == "auto":
        scheme = task.pooled_partition
    if scheme.split(":")[0] not in task.partitions:
        raise DataError(
            f"partition '{scheme}' is not available for the task '{task.name}'; use "
            f"{' or '.join(task.partitions)}"
        )
    patients = [getattr(example, "patient", None) for example in pooled]
    patients = patients if any(patient is not None for patient in patients) else None
    if scheme == "iid":
        return partition.iid(len(pooled), hospitals, seed, patients)
    if scheme == "dirichlet":
        return partition.dirichlet([r.label for r in pooled], hospitals, alpha, seed, patients)
    if scheme == "blocks":
        return partition.blocks(len(pooled), hospitals)
    return partition.by_column([r.group or "" for r in pooled], hospitals)


@lru_cache(maxsize=4)
def _pooled(
    task: Task, data, text_column, label_column, group_column, patient_column=None
) -> tuple:
    return tuple(task.read(data, text_column, label_column, group_column, patient_column))


@lru_cache(maxsize=4)
def _synthetic_pool(task_name: str, hospitals: int, sizes: tuple[int, ...], seed: int) -> tuple:
    return tuple(
        example
        for hospital in range(hospitals)
        for example in synthetic_examples(task_name, hospital, sizes[hospital], seed, hospitals)
    )
