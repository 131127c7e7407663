"""Classification data: reading CSV/TSV/JSONL/`label<TAB>text` records, label maps, validation
splits, batching.

Every problem with a data file raises `DataError` naming the file (and line) and what to do.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from fedward.common.errors import DataError
from fedward.common.protocol.reasons import Reason

#: Fewest examples a label needs: one for training and one for validation.
MIN_EXAMPLES_PER_LABEL = 2


@dataclass(frozen=True)
class Record:
    """One labelled note. `group` is an optional column value used for column partitioning;
    `patient` names the patient the note belongs to (the schema's patient column), the unit of
    patient-level DP."""

    text: str
    label: str
    group: str | None = None
    patient: str | None = None


def read_records(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    patient_column: str | None = None,
) -> list[Record]:
    """Read labelled notes from a `.csv`, `.tsv`, `.jsonl` or `.txt` file.

    The format follows the extension. `.csv`/`.tsv` have a header line naming the columns,
    except a `.tsv` whose first line names neither `text_column` nor `label_column`: that one,
    like every `.txt`, is headerless `label<TAB>text`, one note a line (as Chinese
    classification sets are often shipped); the text is everything after the first tab.

    Raises `DataError` for a missing/unreadable/empty file, text that is not UTF-8, a missing
    column, an empty text, label or patient, a `label<TAB>text` line without a tab, or a
    malformed JSON line; each names the file and line.
    """
    path = Path(path)
    text = _read_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it needs a header and at least 2 records")
    suffix = path.suffix.lower()
    first_line = text.lstrip("\n").split("\n", 1)[0].rstrip("\r").split("\t")
    if suffix == ".txt" or (
        suffix == ".tsv" and not {text_column, label_column} & {f.strip() for f in first_line}
    ):
        rows = _label_text_rows(path, text, text_column, label_column)
    elif suffix in {".jsonl", ".ndjson"}:
        rows = _jsonl_rows(path, text)
    elif suffix in {".csv", ".tsv"}:
        rows = _csv_rows(path, text, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(
            f"{path}: unknown data format '{suffix}'; use a .csv, .tsv, .jsonl or .txt "
            "(label<TAB>text) file"
        )

    records = []
    for line, row in rows:
        for column in (text_column, label_column, group_column, patient_column):
            if column is not None and column not in row:
                present = ", ".join(sorted(row)) or "none"
                raise DataError(
                    f"{path}:{line}: column '{column}' is missing (columns present: {present}); "
                    + (
                        _delimiter_hint(list(row))
                        or "pass the right name with --text-column/--label-column/--patient-column"
                    )
                )
        note, label = row[text_column], row[label_column]
        note = "" if note is None else str(note).strip()
        label = "" if label is None else str(label).strip()
        if not note:
            raise DataError(f"{path}:{line}: empty text in column '{text_column}'")
        if not label:
            raise DataError(f"{path}:{line}: empty label in column '{label_column}'")
        group = None if group_column is None else str(row[group_column])
        patient = None
        if patient_column is not None:
            patient = "" if row[patient_column] is None else str(row[patient_column]).strip()
            if not patient:
                raise DataError(
                    f"{path}:{line}: empty patient in column '{patient_column}'; fill in the "
                    "patient of every record (or leave out --patient-column for record-level DP)"
                )
        records.append(Record(note, label, group, patient))
    if not records:
        raise DataError(f"{path}: no records after the header; it needs at least 2")
    return records


def label_set(records: list[Record], source: str) -> list[str]:
    """The sorted label list; a label with fewer than 2 examples raises `DataError`."""
    counts = Counter(record.label for record in records)
    too_few = sorted(label for label, count in counts.items() if count < MIN_EXAMPLES_PER_LABEL)
    if too_few:
        shown = ", ".join(f"'{label}' ({counts[label]})" for label in too_few[:5])
        raise DataError(
            f"{source}: label {shown} has fewer than {MIN_EXAMPLES_PER_LABEL} examples; "
            f"add examples or remove the label"
        )
    if len(counts) < 2:
        raise DataError(f"{source}: only one label ({next(iter(counts))}); need at least 2")
    return sorted(counts)


def train_val_split(
    records: list[Record], val_fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Deterministic split, whole patients on one side; every label with at least 2 units
    keeps one on each side.

    The unit is the patient where records name one (all of a patient's notes go to the same
    side, so that no validation note has its patient's other notes in training: a model could
    otherwise score by recognising the patient), else the record. Units are stratified by their
    label (a patient's most frequent one).
    """
    rng = random.Random(seed)
    units: dict[object, list[Record]] = {}
    for position, record in enumerate(records):
        key = ("patient", record.patient) if record.patient is not None else ("record", position)
        units.setdefault(key, []).append(record)
    by_label: dict[str, list[list[Record]]] = {}
    for members in units.values():
        label = Counter(r.label for r in members).most_common(1)[0][0]
        by_label.setdefault(label, []).append(members)
    train, val = [], []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        n_val = round(len(group) * val_fraction)
        if len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        val.extend(record for members in group[:n_val] for record in members)
        train.extend(record for members in group[n_val:] for record in members)
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def patient_units(examples: list) -> list[int]:
    """The patient of each example as a number 0..P-1 (in order of first appearance): the
    privacy units of patient-level DP. Examples are `Record`s or NER `PatientSentence`s; one
    without a patient raises `DataError` (the data schema names no patient column)."""
    numbers: dict[str, int] = {}
    units = []
    for example in examples:
        patient = getattr(example, "patient", None)
        if patient is None:
            raise DataError(
                "patient-level DP needs the patient of every record: name the data's patient "
                "column (--patient-column)",
                reason=Reason("data.no_patient"),
            )
        units.append(numbers.setdefault(patient, len(numbers)))
    return units


class EncodedDataset(torch.utils.data.Dataset):
    """Token ids and label ids of a list of examples, unpadded (padding happens per batch).

    `units`, under patient-level DP, gives for each encoded example the number of its patient
    (an NER sentence cut into pieces gives each piece its sentence's patient); None: each
    example is its own unit (record-level DP).
    """

    def __init__(
        self,
        input_ids: list[list[int]],
        labels: list[int] | list[list[int]],
        units: list[int] | None = None,
    ):
        if units is not None and len(units) != len(input_ids):
            raise ValueError(f"{len(units)} units for {len(input_ids)} examples")
        self.input_ids = input_ids
        self.labels = labels
        self.units = units

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_units(self) -> int:
        """How many privacy units the examples belong to: patients, or the examples."""
        return len(self.input_ids) if self.units is None else len(set(self.units))

    def unit_members(self) -> list[list[int]]:
        """For each unit 0..num_units-1, the positions of its examples (units numbered densely,
        as `patient_units` numbers them); every example is a unit of its own without units."""
        if self.units is None:
            return [[i] for i in range(len(self.input_ids))]
        members: dict[int, list[int]] = {}
        for position, unit in enumerate(self.units):
            members.setdefault(unit, []).append(position)
        return [members[unit] for unit in sorted(members)]

    def __getitem__(self, index: int) -> tuple[list[int], int | list[int]]:
        return self.input_ids[index], self.labels[index]


def encode_classification(
    tokenizer,
    records: list[Record],
    label_to_id: dict[str, int],
    max_length: int,
    units: list[int] | None = None,
) -> EncodedDataset:
    """Tokenize notes (truncated to `max_length`) and map labels to ids; `units` (a patient
    number per note, or None) is kept with them."""
    unknown = sorted({r.label for r in records} - set(label_to_id))
    if unknown:
        # The labels are the hospital's data (or, with a wrong label column, its notes): not
        # even their number leaves (it would tell whether a record carries a label); the text
        # is for the hospital's own log.
        raise DataError(
            f"{len(unknown)} labels {unknown[:5]} are not in the run's label set "
            f"{list(label_to_id)}; fix the data or the run config's 'labels'",
            reason=Reason("data.labels_mismatch"),
        )
    if not records:  # the tokenizer fails on an empty batch; the gate judges the count
        return EncodedDataset([], [], [] if units is not None else None)
    encoded = tokenizer(
        [r.text for r in records], truncation=True, max_length=max_length, padding=False
    )
    return EncodedDataset(encoded["input_ids"], [label_to_id[r.label] for r in records], units)


def pad_batch(
    batch: list[tuple[list[int], int | list[int]]], pad_id: int, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collate to (input_ids, attention_mask, labels), padded to the longest example or `pad_to`.

    Token-level labels (NER) are padded with -100 so that padding is ignored by the loss.
    """
    longest = max((len(ids) for ids, _ in batch), default=1)
    width = max(pad_to or 0, longest)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    token_labels = bool(batch) and isinstance(batch[0][1], list)
    labels = (
        torch.full((len(batch), width), -100, dtype=torch.long)
        if token_labels
        else torch.zeros(len(batch), dtype=torch.long)
    )
    for row, (ids, label) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        if token_labels:
            labels[row, : len(label)] = torch.tensor(label, dtype=torch.long)
        else:
            labels[row] = label
    return input_ids, attention_mask, labels


def length_groups(lengths: list[int], overhead_tokens: int) -> list[list[int]]:
    """Split a batch into micro-batches of similar length, to pad each only to its own longest.

    Returns groups of positions into `lengths` (each group's examples contiguous in length
    order) minimising the padded tokens of all groups plus `overhead_tokens` for each group (the
    fixed cost of one more forward and backward pass, counted in tokens). Exact dynamic
    programming over the sorted lengths: a batch of a few hundred takes well under a millisecond.
    """
    order = sorted(range(len(lengths)), key=lambda position: lengths[position])
    if not order:
        return []
    # best[j]: cheapest split of the j shortest; a group order[i:j] costs (j - i) * its longest.
    best = [0] + [None] * len(order)
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        width = lengths[order[j - 1]]
        best[j], cut[j] = min((best[i] + (j - i) * width + overhead_tokens, i) for i in range(j))
    groups = []
    j = len(order)
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the --data path") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; pass a .csv or .jsonl file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: text is not UTF-8 (byte 0x{raw[exc.start]:02x}); "
            "re-save the file as UTF-8"
        ) from None


def _csv_rows(path: Path, text: str, delimiter: str) -> list[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    try:
        for row in reader:
            if None in row:
                raise DataError(
                    f"{path}:{reader.line_num}: more fields than the header has columns; "
                    "quote text that contains the delimiter"
                )
            if not any((value or "").strip() for value in row.values()):
                continue
            rows.append((reader.line_num, row))
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            raise DataError(
                f"{path}:{reader.line_num + 1}: a note is too long (a field over "
                f"{csv.field_size_limit():,} characters); shorten or split it, or close the "
                "quote left open before it"
            ) from None
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    if reader.fieldnames is None:
        raise DataError(f"{path}: no header line; the first line must name the columns")
    return rows


#: Delimiters a spreadsheet may have saved instead of commas, by the name a user knows.
_OTHER_DELIMITERS = {";": "semicolons", "\t": "tabs", "|": "'|'"}


def _delimiter_hint(columns: list[str]) -> str:
    """For a header read as one column that holds another delimiter: which, and the fix."""
    if len(columns) != 1:
        return ""
    for delimiter, name in _OTHER_DELIMITERS.items():
        if delimiter in columns[0]:
            return (
                f"the file is delimited by {name}, not commas; re-save it comma-separated "
                "(or tab-separated, named .tsv)"
            )
    return ""


def _label_text_rows(
    path: Path, text: str, text_column: str, label_column: str
) -> list[tuple[int, dict[str, str]]]:
    """Headerless `label<TAB>text` lines as rows of the two columns; blank lines are skipped."""
    rows = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(
                f"{path}:{line_number}: no tab between label and text in {line[:40]!r}; each "
                "line must be `label<TAB>text` (or give the file a header and a .csv/.tsv name)"
            )
        label, note = line.split("\t", 1)
        rows.append((line_number, {label_column: label, text_column: note}))
    return rows


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_number}: each line must be a JSON object")
        rows.append((line_number, row))
    return rows
