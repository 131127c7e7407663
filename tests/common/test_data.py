"""Tests for reading and batching classification data (common/data.py).

Every bad input must give a `DataError` that names the file (and line) and says what to do.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from itertools import pairwise

import pytest

from fedward.common.data import (
    EncodedDataset,
    Record,
    encode_classification,
    label_set,
    length_groups,
    pad_batch,
    read_records,
    train_val_split,
)
from fedward.common.errors import DataError


def _write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


# --- reading ---------------------------------------------------------------------------------


def test_reads_csv_with_quoted_commas_and_a_group_column(tmp_path):
    path = _write_csv(
        tmp_path / "notes.csv",
        ['"cough, fever, sputum",pneumonia,north', "headache with aura,migraine,south"],
        header="text,label,site",
    )
    records = read_records(path, group_column="site")
    assert records == [
        Record("cough, fever, sputum", "pneumonia", "north"),
        Record("headache with aura", "migraine", "south"),
    ]


def test_reads_jsonl_with_custom_columns_and_skips_blank_lines(tmp_path):
    path = tmp_path / "notes.jsonl"
    lines = [
        json.dumps({"note": "SOB, edema", "dx": "heart failure"}),
        "",
        json.dumps({"note": "polyuria", "dx": 2}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = read_records(path, text_column="note", label_column="dx")
    assert [(r.text, r.label) for r in records] == [
        ("SOB, edema", "heart failure"),
        ("polyuria", "2"),
    ]


def test_reads_tsv_and_a_utf8_bom(tmp_path):
    path = tmp_path / "notes.tsv"
    path.write_bytes("\ufefftext\tlabel\nfièvre, toux\tpneumonie\n".encode("utf-8"))
    assert read_records(path) == [Record("fièvre, toux", "pneumonie")]


def test_missing_file(tmp_path):
    path = tmp_path / "absent.csv"
    with pytest.raises(DataError, match="file not found") as caught:
        read_records(path)
    assert str(path) in str(caught.value)


def test_a_folder_is_not_a_data_file(tmp_path):
    folder = tmp_path / "notes.csv"
    folder.mkdir()
    with pytest.raises(DataError, match="is a folder") as caught:
        read_records(folder)
    assert str(folder) in str(caught.value)


def test_missing_column_lists_the_columns_present(tmp_path):
    path = _write_csv(tmp_path / "notes.csv", ["cough,pneumonia"], header="note,diagnosis")
    with pytest.raises(DataError) as caught:
        read_records(path)
    message = str(caught.value)
    assert f"{path}:2" in message
    assert "column 'text' is missing" in message
    assert "columns present: diagnosis, note" in message


def test_empty_file(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty") as caught:
        read_records(path)
    assert str(path) in str(caught.value)


def test_header_only_file(tmp_path):
    path = _write_csv(tmp_path / "notes.csv", [])
    with pytest.raises(DataError, match="no records") as caught:
        read_records(path)
    assert str(path) in str(caught.value)


def test_text_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_bytes(b"text,label\ncough,pneumonia\nfi\xe8vre,pneumonia\n")  # Latin-1 on line 3
    with pytest.raises(DataError, match="not UTF-8") as caught:
        read_records(path)
    assert f"{path}:3:" in str(caught.value)


def test_malformed_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text(
        '{"text": "cough", "label": "a"}\n{"text": "fever", "label": \n', encoding="utf-8"
    )
    with pytest.raises(DataError, match="not valid JSON") as caught:
        read_records(path)
    assert f"{path}:2:" in str(caught.value)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('["cough", "a"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}:1: each line must be a JSON object"):
        read_records(path)


def test_empty_text_or_label_names_the_line(tmp_path):
    path = _write_csv(tmp_path / "notes.csv", ["cough,pneumonia", "   ,pneumonia"])
    with pytest.raises(DataError, match=f"{path}:3: empty text"):
        read_records(path)
    path = _write_csv(tmp_path / "labels.csv", ["cough,pneumonia", "fever,"])
    with pytest.raises(DataError, match=f"{path}:3: empty label"):
        read_records(path)


def test_too_many_fields_names_the_line(tmp_path):
    path = _write_csv(tmp_path / "notes.csv", ["cough,pneumonia", "fever, chills,pneumonia"])
    with pytest.raises(DataError, match=f"{path}:3: more fields"):
        read_records(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "notes.xlsx"
    path.write_text("text,label\na,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unknown data format '.xlsx'"):
        read_records(path)


# --- labels and splits -----------------------------------------------------------------------


def test_label_set_is_sorted():
    records = [Record(f"n{i}", label) for i, label in enumerate("bbaacc")]
    assert label_set(records, "notes.csv") == ["a", "b", "c"]


def test_label_with_too_few_examples_is_named():
    records = [Record("x", "flu"), Record("y", "flu"), Record("z", "measles")]
    with pytest.raises(DataError) as caught:
        label_set(records, "notes.csv")
    message = str(caught.value)
    assert message.startswith("notes.csv:")
    assert "'measles' (1)" in message
    assert "'flu'" not in message


def test_a_single_label_is_not_a_classification_task():
    with pytest.raises(DataError, match="only one label"):
        label_set([Record("x", "flu"), Record("y", "flu")], "notes.csv")


def test_train_val_split_keeps_every_label_on_both_sides_and_is_deterministic():
    records = [
        Record(f"note {i}", label) for i, label in enumerate(["a"] * 2 + ["b"] * 30 + ["c"] * 5)
    ]
    train, val = train_val_split(records, 0.2, seed=7)
    assert sorted(train + val, key=lambda r: r.text) == sorted(records, key=lambda r: r.text)
    assert {r.label for r in train} == {r.label for r in val} == {"a", "b", "c"}
    assert Counter(r.label for r in val)["b"] == 6
    assert (train, val) == train_val_split(records, 0.2, seed=7)
    assert (train, val) != train_val_split(records, 0.2, seed=8)


def test_train_val_split_keeps_each_patient_whole_on_one_side():
    # A validation note whose patient has other notes in training would let a model score by
    # recognising the patient (issue 38: 84% of the default hospitals' validation notes).
    records = [
        Record(f"note {i}", label, patient=f"p{i % 40}") for i, label in enumerate(["a", "b"] * 100)
    ]
    train, val = train_val_split(records, 0.2, seed=3)
    assert {r.patient for r in train}.isdisjoint({r.patient for r in val})
    assert len(train) + len(val) == len(records)
    assert {r.label for r in val} == {"a", "b"}
    assert 0.1 < len(val) / len(records) < 0.3


# --- encoding and batching -------------------------------------------------------------------


def test_encode_maps_labels_and_truncates(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = [Record("fever " * 50, "flu"), Record("runny nose", "cold")]
    dataset = encode_classification(tokenizer, records, {"cold": 0, "flu": 1}, max_length=16)
    assert len(dataset) == 2
    assert len(dataset[0][0]) == 16 and dataset[0][1] == 1
    assert dataset[1][1] == 0 and len(dataset[1][0]) < 16


def test_encode_rejects_labels_outside_the_runs_label_set(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(DataError, match=r"\['measles'\] are not in the run's label set"):
        encode_classification(tokenizer, [Record("spots", "measles")], {"flu": 0, "cold": 1}, 16)


def test_pad_batch_pads_to_the_longest_or_to_a_fixed_width():
    batch = EncodedDataset([[5, 6, 7], [8]], [1, 0])
    input_ids, attention_mask, labels = pad_batch([batch[0], batch[1]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [1, 0]
    input_ids, attention_mask, _ = pad_batch([batch[0], batch[1]], pad_id=0, pad_to=5)
    assert input_ids.shape == (2, 5) and attention_mask.sum().item() == 4


def test_pad_batch_pads_token_labels_with_ignore_index():
    _, _, labels = pad_batch([([5, 6, 7], [1, 2, 1]), ([8], [0])], pad_id=0)
    assert labels.tolist() == [[1, 2, 1], [0, -100, -100]]


def _padded_cost(lengths, groups, overhead):
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def _cheapest_split(sorted_lengths, overhead):
    """Brute force over every way to cut the sorted lengths into contiguous groups."""
    n = len(sorted_lengths)
    best = None
    for mask in range(2 ** (n - 1)):
        cuts = [0] + [k + 1 for k in range(n - 1) if mask >> k & 1] + [n]
        cost = sum((b - a) * sorted_lengths[b - 1] + overhead for a, b in pairwise(cuts))
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("overhead", [0, 7, 40, 10_000])
def test_length_groups_is_the_cheapest_split_and_covers_every_example_once(seed, overhead):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 9))]
    groups = length_groups(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert _padded_cost(lengths, groups, overhead) == _cheapest_split(sorted(lengths), overhead)
    if overhead == 10_000:
        assert len(groups) == 1


def test_length_groups_of_nothing_is_nothing():
    assert length_groups([], 10) == []


def test_the_patient_column_names_each_records_patient(tmp_path):
    from fedward.common.data import patient_units

    path = tmp_path / "notes.csv"
    path.write_text("text,label,mrn\nchest pain,cardiac,p1\ncough,resp,p2\nedema,cardiac,p1\n")
    records = read_records(path, patient_column="mrn")
    assert [r.patient for r in records] == ["p1", "p2", "p1"]
    assert patient_units(records) == [0, 1, 0]
    assert read_records(path)[0].patient is None  # no column named: no patients
    path.write_text("text,label,mrn\nchest pain,cardiac,\n")
    with pytest.raises(DataError, match="empty patient"):
        read_records(path, patient_column="mrn")
    with pytest.raises(DataError, match="--patient-column"):
        read_records(path, patient_column="patient_id")


def test_a_semicolon_delimited_csv_names_its_delimiter(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("text;label\ncough;flu\nfever;flu\n", encoding="utf-8")
    with pytest.raises(DataError) as raised:
        read_records(path)
    message = str(raised.value)
    assert f"{path}:2: column 'text' is missing" in message
    assert "delimited by semicolons, not commas; re-save it comma-separated" in message


def test_a_note_longer_than_the_csv_field_limit_is_said_to_be_too_long(tmp_path):
    path = tmp_path / "notes.csv"
    long_note = "x" * (csv.field_size_limit() + 10)
    path.write_text(f"text,label\ncough,flu\n{long_note},flu\n", encoding="utf-8")
    with pytest.raises(DataError) as raised:
        read_records(path)
    message = str(raised.value)
    assert message.startswith(f"{path}:3: a note is too long"), message
    assert "malformed CSV" not in message
