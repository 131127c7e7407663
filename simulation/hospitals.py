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
from fedward.client.release import exact_metrics
from fedward.client.trainer import HistoryEntry, TrainResult
from fedward.common.config import RunConfig, RunSpec, SimulatedData, SimulationSettings
from fedward.common.data import Record, label_set, read_records, train_val_split
from fedward.common.errors import ConfigError, DataError
from fedward.simulation import partition

DP_STATE = "fedward.dp"  # node-state record holding the accountant history within a run


class SimulatedSite:
    """A simulated hospital's site: accepts every run, adds the simulation's local settings,
    keeps the run's accountant history in the node state (no ledger, no audit log).

    Unlike a deployed hospital it reports exact metrics: training loss, example counts and
    evaluation of every round, unnoised and uncharged (the report says so)."""

    releases_exact_metrics = True

    def __init__(self, context: Context, settings: SimulationSettings | None) -> None:
        self.context = context
        self.settings = settings

    def check_policy(self, spec: RunSpec) -> RunConfig:
        return RunConfig.with_spec(spec, self.settings)

    def admit(self, spec, run_id, server_round, global_arrays) -> tuple[RunConfig, None]:
        return self.check_policy(spec), None

    def run_history(self, run_id: str, server_round: int) -> list[HistoryEntry]:
        record = self.context.state.get(DP_STATE)
        if record is None:
            return []
        return [tuple(entry) for entry in json.loads(str(record["history"]))]

    def check_budget(self, config: RunConfig, num_train: int) -> None:
        return None  # the trainer still refuses a round past the run's own epsilon

    def record(self, config, run_id, server_round, result: TrainResult, global_arrays) -> None:
        self.context.state[DP_STATE] = ConfigRecord({"history": json.dumps(result.history)})

    def refused(self, run_id: str, server_round: int, stage: str, exc: Exception) -> None:
        return None  # the coordinator's round table shows it

    def admit_evaluation(self, spec: RunSpec, run_id: str, server_round: int) -> RunConfig:
        return self.check_policy(spec)

    def release_evaluation(self, config, run_id, server_round, predictions) -> dict[str, float]:
        return exact_metrics(predictions)


def prepare_config(config: RunConfig) -> RunConfig:
    """Check the simulation and fill in what the coordinator must know before round 1: the
    label set of the data."""
    if config.min_hospitals > config.hospitals:
        raise ConfigError(
            f"field 'min_hospitals': {config.min_hospitals} is more than hospitals "
            f"({config.hospitals}) in this simulation"
        )
    if config.labels:
        return config
    if config.task == "ner":
        from fedward.common.ner import label_list

        labels = label_list(
            _pooled_sentences(config.data, config.hospitals, config.notes_per_hospital, config.seed)
        )
    elif config.data is None:
        from fedward.common.synthetic import DIAGNOSES

        labels = sorted(DIAGNOSES)
    else:
        records = _pooled_records(config.data, config.text_column, config.label_column, None)
        labels = label_set(records, config.data)
    return config.model_copy(update={"labels": labels})


def simulated_data(config: RunConfig, context: Context) -> HospitalData:
    """The share of hospital `partition-id` (a `client.app.DataSource`)."""
    hospital = int(context.node_config["partition-id"])
    # The split depends on the task, the seed and every field of `SimulatedData`, no other.
    shared = SimulatedData(**config.values_of(SimulatedData)).model_dump_json()
    train, val, source = _hospital_split(config.task, config.seed, shared, hospital)
    return HospitalData(hospital_name(context), list(train), list(val), source)


@lru_cache(maxsize=8)
def _hospital_split(
    task: str, seed: int, shared_json: str, hospital: int
) -> tuple[tuple, tuple, str]:
    shared = SimulatedData.model_validate_json(shared_json)
    data, text_column, label_column = shared.data, shared.text_column, shared.label_column
    scheme, alpha, hospitals = shared.partition, shared.alpha, shared.hospitals
    per_hospital, val_fraction = shared.notes_per_hospital, shared.val_fraction
    if task == "ner":
        examples = _ner_share(data, scheme, hospitals, per_hospital, seed, hospital)
        cut = max(1, round(len(examples) * (1 - val_fraction)))
        train, val = examples[:cut], examples[cut:] or examples[-1:]
        return tuple(train), tuple(val), data or "synthetic NER notes"
    if data is None and scheme == "auto":
        from fedward.common.synthetic import generate_notes

        notes = generate_notes(hospital, per_hospital, seed, num_hospitals=hospitals)
        records = [Record(n["text"], n["label"], n["hospital"]) for n in notes]
        source = f"synthetic notes of hospital-{hospital}"
    else:
        group_column = scheme.removeprefix("column:") if scheme.startswith("column:") else None
        pooled = _pooled_records(data, text_column, label_column, group_column)
        if data is None:
            pooled = _synthetic_pool(hospitals, per_hospital, seed)
        shares = _split(
            scheme,
            [r.label for r in pooled],
            [r.group or "" for r in pooled],
            hospitals,
            alpha,
            seed,
        )
        records = [pooled[i] for i in shares[hospital]]
        source = f"{data or 'synthetic notes'} ({scheme} share {hospital + 1}/{hospitals})"
    train, val = train_val_split(records, val_fraction, seed + hospital)
    return tuple(train), tuple(val), source


def _split(scheme, labels, groups, hospitals, alpha, seed) -> list[list[int]]:
    if scheme in ("iid", "auto"):
        return partition.iid(len(labels), hospitals, seed)
    if scheme == "dirichlet":
        return partition.dirichlet(labels, hospitals, alpha, seed)
    if scheme == "blocks":
        return partition.blocks(len(labels), hospitals)
    return partition.by_column(groups, hospitals)


@lru_cache(maxsize=4)
def _pooled_records(data, text_column, label_column, group_column) -> tuple[Record, ...]:
    if data is None:
        return ()
    return tuple(read_records(data, text_column, label_column, group_column))


@lru_cache(maxsize=4)
def _synthetic_pool(hospitals: int, per_hospital: int, seed: int) -> tuple[Record, ...]:
    from fedward.common.synthetic import generate_notes

    pooled = []
    for hospital in range(hospitals):
        for note in generate_notes(hospital, per_hospital, seed, num_hospitals=hospitals):
            pooled.append(Record(note["text"], note["label"], note["hospital"]))
    return tuple(pooled)


@lru_cache(maxsize=4)
def _pooled_sentences(data, hospitals, per_hospital, seed) -> tuple:
    from fedward.common.ner import read_conll

    if data is None:
        from fedward.common.synthetic import generate_ner_notes

        return tuple(
            tuple(sentence)
            for hospital in range(hospitals)
            for sentence in generate_ner_notes(
                hospital, per_hospital, seed, num_hospitals=hospitals
            )
        )
    path = Path(data)
    if path.is_dir():
        path = _conll_train_file(path)
    return tuple(tuple(sentence) for sentence in read_conll(path))


def _ner_share(data, scheme, hospitals, per_hospital, seed, hospital) -> list:
    if data is None and scheme == "auto":
        from fedward.common.synthetic import generate_ner_notes

        return generate_ner_notes(hospital, per_hospital, seed, num_hospitals=hospitals)
    sentences = _pooled_sentences(data, hospitals, per_hospital, seed)
    if scheme in ("blocks", "auto"):
        shares = partition.blocks(len(sentences), hospitals)
    elif scheme == "iid":
        shares = partition.iid(len(sentences), hospitals, seed)
    else:
        raise DataError(f"partition '{scheme}' is not available for NER; use blocks or iid")
    return [list(sentences[i]) for i in shares[hospital]]


def _conll_train_file(folder: Path) -> Path:
    for name in ("train.tsv", "train.txt", "train.conll"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no train.tsv/train.txt/train.conll in this folder; pass a file")
