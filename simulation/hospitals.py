"""Where simulated hospitals get their data: synthetic notes, or a share of a pooled file.

Runs inside each simulation worker. Reading and partitioning are cached per process, so a worker
serving many virtual hospitals reads the pooled file once.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flwr.app import Context

from fedward.client.app import HospitalData, hospital_name
from fedward.common.config import RunConfig
from fedward.common.data import Record, label_set, read_records, train_val_split
from fedward.common.errors import DataError
from fedward.simulation import partition


def prepare_config(config: RunConfig) -> RunConfig:
    """Fill in what the coordinator must know before round 1: the label set of the data."""
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
        task,
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
