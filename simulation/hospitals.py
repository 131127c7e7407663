"""Where simulated hospitals get their data: synthetic notes, or a share of a pooled file.

Runs inside each simulation worker. Reading and partitioning are cached per process, so a worker
serving many virtual hospitals reads the pooled file once.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context

from fedward.client.app import HospitalData, hospital_name
from fedward.common.config import RunConfig
from fedward.common.errors import DataError
from fedward.common.tasks import Task, task_named
from fedward.simulation import partition


def prepare_config(config: RunConfig) -> RunConfig:
    """Fill in what the coordinator must know before round 1: the label set of the data."""
    if config.labels:
        return config
    task = task_named(config.task)
    if config.data is None:
        labels = task.synthetic_labels(config.hospitals, config.notes_per_hospital, config.seed)
    else:
        pooled = _pooled(config.task, config.data, config.text_column, config.label_column, None)
        labels = task.label_set(list(pooled), config.data)
    return config.model_copy(update={"labels": labels})


def simulated_data(config: RunConfig, context: Context) -> HospitalData:
    """The share of hospital `partition-id` (a `client.app.DataSource`)."""
    hospital = int(context.node_config["partition-id"])
    train, val, source = _hospital_split(_data_key(config), hospital)
    return HospitalData(hospital_name(context), list(train), list(val), source)


def _data_key(config: RunConfig) -> tuple:
    return (
        config.task,
        config.data,
        config.text_column,
        config.label_column,
        config.partition,
        config.alpha,
        config.hospitals,
        config.notes_per_hospital,
        config.val_fraction,
        config.seed,
    )


@lru_cache(maxsize=8)
def _hospital_split(key: tuple, hospital: int) -> tuple[tuple, tuple, str]:
    (
        task_name,
        data,
        text_column,
        label_column,
        scheme,
        alpha,
        hospitals,
        per_hospital,
        val_fraction,
        seed,
    ) = key
    task = task_named(task_name)
    if data is None and scheme == "auto":
        examples = task.synthetic_notes(hospital, per_hospital, seed, hospitals)
        source = f"synthetic notes of hospital-{hospital}"
    else:
        group_column = scheme.removeprefix("column:") if scheme.startswith("column:") else None
        if data is None:
            pooled = _synthetic_pool(task_name, hospitals, per_hospital, seed)
        else:
            pooled = _pooled(task_name, data, text_column, label_column, group_column)
        shares = _split(task, scheme, pooled, hospitals, alpha, seed)
        examples = [pooled[i] for i in shares[hospital]]
        source = f"{data or 'synthetic notes'} ({scheme} share {hospital + 1}/{hospitals})"
    train, val = task.split(examples, val_fraction, seed + hospital)
    return tuple(train), tuple(val), source


def _split(task: Task, scheme: str, pooled, hospitals, alpha, seed) -> list[list[int]]:
    if scheme == "auto":
        scheme = task.pooled_partition
    if scheme.split(":")[0] not in task.partitions:
        raise DataError(
            f"partition '{scheme}' is not available for the task '{task.name}'; use "
            f"{' or '.join(task.partitions)}"
        )
    if scheme == "iid":
        return partition.iid(len(pooled), hospitals, seed)
    if scheme == "dirichlet":
        return partition.dirichlet([r.label for r in pooled], hospitals, alpha, seed)
    if scheme == "blocks":
        return partition.blocks(len(pooled), hospitals)
    return partition.by_column([r.group or "" for r in pooled], hospitals)


@lru_cache(maxsize=4)
def _pooled(task_name, data, text_column, label_column, group_column) -> tuple:
    return tuple(task_named(task_name).read(data, text_column, label_column, group_column))


@lru_cache(maxsize=4)
def _synthetic_pool(task_name: str, hospitals: int, per_hospital: int, seed: int) -> tuple:
    task = task_named(task_name)
    return tuple(
        example
        for hospital in range(hospitals)
        for example in task.synthetic_notes(hospital, per_hospital, seed, hospitals)
    )
