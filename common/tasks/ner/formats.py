"""Reading NER data: CoNLL files and folders, and entity JSON (CBLUE/CMeEE), into sentences.

A sentence is a list of (word, tag) pairs with IOB2 tags, whatever scheme the file used: the
readers detect the scheme and convert (`schemes.py`). A malformed file raises `DataError`
naming the file, the line and the problem.
"""

from __future__ import annotations

import codecs
import logging
import re
from pathlib import Path
from typing import Any

from fedward.common.errors import DataError
from fedward.common.tasks.ner.schemes import PatientSentence, Sentence, detect_scheme, to_iob2

logger = logging.getLogger(__name__)

#: File name stems that name each split inside a data folder, and the key they are returned under.
SPLIT_NAMES = {
    "train": "train",
    "dev": "devel",
    "devel": "devel",
    "valid": "devel",
    "validation": "devel",
    "test": "test",
}
#: File extensions read as CoNLL inside a data folder (other files, e.g. a LICENSE, are ignored).
CONLL_SUFFIXES = {".tsv", ".conll", ".txt", ".iob", ".iob2", ".bio", ".bioes"}
#: File extensions read as entity JSON (CBLUE/CMeEE: text plus entities with offsets).
JSON_SUFFIXES = {".json", ".jsonl"}

# --- reading ------------------------------------------------------------------------------------


def read_conll(path: str | Path) -> list[Sentence]:
    """Read one CoNLL-style file into sentences of (word, tag), tags converted to IOB2.

    Format: one `word<TAB>tag` per line (with more tab-separated columns, the first is the word
    and the last the tag), or `word tag` separated by spaces in a file whose first line has no
    tab (character-per-line Chinese corpora, `字 B_disease`; `B_`/`I_` tags read as `B-`/`I-`),
    a blank line between sentences, `-DOCSTART-` lines skipped. The tag scheme (IOB1, IOB2,
    BIOES, BILOU) is detected from the whole file (`detect_scheme`).

    Args:
        path: The CoNLL file (UTF-8, a byte-order mark allowed).

    Returns:
        The file's sentences in order, each a list of (word, IOB2 tag) pairs.

    Raises:
        DataError: naming the file (and the line where there is one) for a missing, unreadable
            or folder path, bytes that are not UTF-8, a line without the file's separator, an
            empty word or tag, a tag outside O/B-/I-/E-/S-/L-/U-, both E-/S- and L-/U- tags, a
            tag sequence that the detected scheme forbids, or a file without any sentence.
    """
    path = Path(path)
    text = _read_text(path)
    sentences, lines = _parse_conll(text, path)
    if not sentences:
        raise DataError(
            f"{path}: the file is empty (no `word<TAB>tag` lines); "
            "point the data path at a CoNLL file with one word and its tag per line"
        )
    tag_sequences = [[tag for _, tag in sentence] for sentence in sentences]
    scheme = detect_scheme(tag_sequences, source=str(path), lines=lines)
    converted = [
        list(
            zip(
                [word for word, _ in sentence],
                to_iob2(tags, scheme, source=str(path), lines=at),
                strict=True,
            )
        )
        for sentence, tags, at in zip(sentences, tag_sequences, lines, strict=True)
    ]
    logger.info(
        "read %s: %d sentences, %d entities, tags %s%s",
        path,
        len(converted),
        sum(tag.startswith("B-") for sentence in converted for _, tag in sentence),
        scheme,
        "" if scheme == "IOB2" else " (converted to IOB2)",
    )
    return converted


def read_conll_splits(path: str | Path) -> dict[str, list[Sentence]]:
    """Read a NER data set: a folder of split files, or a single file (all of it is 'train').

    In a folder, `train.*` is required; `dev.*`, `devel.*`, `valid.*` or `validation.*` is
    returned as 'devel', and `test.*` as 'test', where present (a prefix before an underscore
    is allowed, as in CMeEE's `CMeEE_train.json`). Extensions: .tsv, .conll, .txt, .iob, .iob2,
    .bio, .bioes (CoNLL) and .json, .jsonl (entity JSON); other files (README, LICENSE) are
    ignored. Each file is read with `read_ner_file`, so each may use its own format and tag
    scheme; all come back in IOB2.

    Args:
        path: A data folder, or a single CoNLL or entity-JSON file.

    Returns:
        The sentences of each split present: {"train": [...]}, plus "devel" and "test" where a
        folder has them; each sentence a list of (word, IOB2 tag) pairs.

    Raises:
        DataError: the path does not exist, a folder has no training file or several files for
            one split, or a file does not read (see `read_conll`, `read_entity_json`).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; check the NER data path")
    if path.is_file():
        return {"train": read_ner_file(path)}

    found: dict[str, list[Path]] = {}
    for file in sorted(path.iterdir()):
        split = SPLIT_NAMES.get(file.stem.lower().rsplit("_", 1)[-1])
        suffix = file.suffix.lower()
        if file.is_file() and split is not None and suffix in CONLL_SUFFIXES | JSON_SUFFIXES:
            found.setdefault(split, []).append(file)
    for split, files in found.items():
        if len(files) > 1:
            names = ", ".join(file.name for file in files)
            raise DataError(
                f"{path}: several files hold the {split!r} split ({names}); keep one of them"
            )
    if "train" not in found:
        present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise DataError(
            f"{path}: no training file in the folder (found: {present}); name it train.tsv "
            "(optionally also devel.tsv and test.tsv), one `word<TAB>tag` per line"
        )
    return {split: read_ner_file(files[0]) for split, files in found.items()}


def read_ner_file(path: str | Path, patient_column: str | None = None) -> list[Sentence]:
    """One NER file, its format told by its extension: .json/.jsonl is entity JSON
    (`read_entity_json`), anything else CoNLL, one word (or character) and its tag per line
    (`read_conll`). With `patient_column`, each sentence is a `PatientSentence` naming its
    patient, which only entity JSON can carry (a field of each record).

    Args:
        path: The file.
        patient_column: The field of each entity-JSON record that names its patient; None for
            sentences without patients.

    Returns:
        The file's sentences in order, each a list of (word, IOB2 tag) pairs; `PatientSentence`s
        when `patient_column` is given.

    Raises:
        DataError: `patient_column` is given for a CoNLL file, or the file does not read (see
            `read_conll`, `read_entity_json`).
    """
    path = Path(path)
    if path.suffix.lower() in JSON_SUFFIXES:
        return read_entity_json(path, patient_column)
    if patient_column is not None:
        raise DataError(
            f"{path}: a CoNLL file has no column for the patient ('{patient_column}'); for "
            "patient-level DP give the records as entity JSON with a patient field"
        )
    return read_conll(path)


def read_entity_json(path: str | Path, patient_column: str | None = None) -> list[Sentence]:
    """Read CBLUE/CMeEE-style entity JSON into character sentences with IOB2 tags.

    The file is a JSON array of records or one record per line (JSON lines). A record is
    `{"text": "...", "entities": [{"start_idx": 0, "end_idx": 3, "type": "dis"}, ...]}`.
    Offsets count characters. As in CMeEE, `end_idx` is *inclusive* (the entity is
    `text[start_idx:end_idx + 1]`); an entity written with `start`/`end` instead has an exclusive
    end (`text[start:end]`, like a Python slice). The type is `type` (or `label`). When an entity
    also gives its `entity` text, it must equal that slice: a mismatch (usually an off-by-one end
    convention) is an error, not a silent shift.

    Every character becomes a word. Nested or overlapping entities (CMeEE nests e.g. a body part
    inside a symptom) cannot all be tagged in IOB2; the rule is: the longest entity is kept, on a
    tie the one that starts first, and every entity overlapping a kept one is dropped (their
    number is logged).

    Args:
        path: The JSON or JSON-lines file (UTF-8, a byte-order mark allowed).
        patient_column: The record field that names the record's patient; None for sentences
            without patients.

    Returns:
        One sentence per record, in order: a list of (character, IOB2 tag) pairs; with
        `patient_column`, a `PatientSentence` whose patient is that field (as a stripped string).

    Raises:
        DataError: naming the file and the line (JSON lines) or record (array) for a missing,
            unreadable or non-UTF-8 file, an empty file or one without records, JSON that does
            not parse, a record that is not an object or has no text, `entities` that is not a
            list, an entity without integer offsets or a type (a name without spaces), offsets
            outside its text, an entity text that does not match its offsets, or (with
            `patient_column`) a record without its patient field.
    """
    path = Path(path)
    records = _json_records(path)
    sentences: list[Sentence] = []
    dropped = kept = 0
    for where, record in records:
        entities = _record_entities(where, record)
        chosen = _outermost_entities(entities)
        dropped += len(entities) - len(chosen)
        kept += len(chosen)
        tags = ["O"] * len(record["text"])
        for start, end, entity_type in chosen:
            tags[start] = f"B-{entity_type}"
            for i in range(start + 1, end):
                tags[i] = f"I-{entity_type}"
        pairs = list(zip(record["text"], tags, strict=True))
        if patient_column is None:
            sentences.append(pairs)
            continue
        patient = record.get(patient_column)
        if patient is None or not str(patient).strip():
            raise DataError(f"{where}: no patient in field '{patient_column}'")
        sentences.append(PatientSentence(pairs, str(patient).strip()))
    if not sentences:
        raise DataError(f"{path}: no records; it needs JSON records with text and entities")
    logger.info(
        "read %s: %d texts, %d entities%s",
        path,
        len(sentences),
        kept,
        f" ({dropped} nested or overlapping entities dropped: the longest is kept)"
        if dropped
        else "",
    )
    return sentences


def _json_records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) of a JSON array's records or a JSON-lines file's lines, where naming the
    record or the line for messages; `DataError` for an empty file or JSON that does not parse."""
    import json

    text = _read_text(path)
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the file is empty; it needs JSON records with text and entities")
    if stripped.startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        return [(f"{path}, record {n}", record) for n, record in enumerate(array, start=1)]
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{number}: not valid JSON ({exc.msg}); the file must be a JSON "
                "array of records or one JSON record per line"
            ) from None
    return records


def _record_entities(where: str, record: Any) -> list[tuple[int, int, str]]:
    """(start, exclusive end, type) of each entity of one JSON record, checked."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: each record must be a JSON object with 'text' and 'entities'")
    text = record.get("text")
    if not isinstance(text, str) or not text:
        raise DataError(f"{where}: the record has no 'text' (a non-empty string)")
    raw_entities = record.get("entities", [])
    if not isinstance(raw_entities, list):
        raise DataError(f"{where}: 'entities' must be a list of objects")
    entities = []
    for n, entity in enumerate(raw_entities, start=1):
        at = f"{where}, entity {n}"
        if not isinstance(entity, dict):
            raise DataError(f"{at}: must be an object with start_idx, end_idx and type")
        if "start_idx" in entity:
            start, last = entity.get("start_idx"), entity.get("end_idx")
            convention = "end_idx is inclusive (CMeEE)"
            end = last + 1 if isinstance(last, int) else None
        else:
            start, end = entity.get("start"), entity.get("end")
            convention = "end is exclusive"
        if not isinstance(start, int) or not isinstance(end, int):
            raise DataError(
                f"{at}: needs integer offsets: start_idx and end_idx (CMeEE, end inclusive) "
                "or start and end (end exclusive)"
            )
        if not 0 <= start < end <= len(text):
            raise DataError(
                f"{at}: offsets [{start}, {end}) fall outside the text of {len(text)} characters "
                f"({convention})"
            )
        entity_type = entity.get("type", entity.get("label"))
        if not isinstance(entity_type, str) or not entity_type or re.search(r"\s", entity_type):
            raise DataError(f"{at}: needs a 'type' (a name without spaces), got {entity_type!r}")
        given = entity.get("entity")
        if given is not None and given != text[start:end]:
            raise DataError(
                f"{at}: entity text {given!r} is not the text at its offsets "
                f"({text[start:end]!r}; {convention}); fix the offsets"
            )
        entities.append((start, end, entity_type))
    return entities


def _outermost_entities(entities: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Non-overlapping entities: longest first, then earliest; overlapping ones are dropped."""
    kept: list[tuple[int, int, str]] = []
    for start, end, entity_type in sorted(entities, key=lambda e: (e[0] - e[1], e[0])):
        if all(end <= s or start >= e for s, e, _ in kept):
            kept.append((start, end, entity_type))
    return sorted(kept)


def _read_text(path: Path) -> str:
    """The file's text, decoded as UTF-8 (a byte-order mark is allowed and dropped)."""
    if not path.exists():
        raise DataError(f"{path}: no such file; check the NER data path")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a CoNLL file; use read_conll_splits")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(
            f"{path}: cannot be read ({error.strerror}); check its permissions"
        ) from error
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[error.start]:02x}); the file is in "
            "another encoding (e.g. Latin-1 or Windows-1252): re-save it as UTF-8, "
            f"e.g. `iconv -f latin1 -t utf-8 {path.name}`"
        ) from error


def _parse_conll(text: str, path: Path) -> tuple[list[Sentence], list[list[int]]]:
    """Split CoNLL text into sentences of raw (word, tag) and, in parallel, their line numbers.

    Columns are separated by tabs, or, in a file whose first line has no tab, by spaces (as in
    character-per-line Chinese corpora: `字 B_disease`). Only ASCII spaces and tabs separate: an
    ideographic space (U+3000) is a character like any other. Tags written `B_type`/`I_type` are
    read as `B-type`/`I-type`.
    """
    sentences: list[Sentence] = []
    lines: list[list[int]] = []
    sentence: Sentence = []
    at: list[int] = []
    separator: str | None = None  # "\t", or " " when the file's first line has no tab
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip(" \t") or line.startswith("-DOCSTART-"):
            if sentence:
                sentences.append(sentence)
                lines.append(at)
                sentence, at = [], []
            continue
        if separator is None:
            separator = "\t" if "\t" in line else " "
        if separator == "\t":
            if "\t" not in line:
                raise DataError(
                    f"{path}:{number}: no tab between word and tag in {line[:60]!r}; each line "
                    "must be `word<TAB>tag` like the file's first line (or separate every line's "
                    "columns with spaces)"
                )
            columns = [column.strip(" ") for column in line.split("\t")]
        else:
            columns = [column for column in re.split(r"[ \t]+", line) if column]
            if len(columns) < 2:
                raise DataError(
                    f"{path}:{number}: no tag after the word in {line[:60]!r}; each line must "
                    "be `word TAG` (a space or tab between them), e.g. `字 B_disease`"
                )
        word, tag = columns[0], _underscore_tag(columns[-1])
        if not word:
            raise DataError(f"{path}:{number}: no word before the tab; write `word<TAB>tag`")
        if not tag:
            raise DataError(f"{path}:{number}: no tag after the tab; write `word<TAB>tag`")
        sentence.append((word, tag))
        at.append(number)
    if sentence:
        sentences.append(sentence)
        lines.append(at)
    return sentences, lines


def _underscore_tag(tag: str) -> str:
    """`B_disease` -> `B-disease` (corpora that join prefix and type with '_'); others as given."""
    if len(tag) > 2 and tag[0] in "BIESLU" and tag[1] == "_":
        return f"{tag[0]}-{tag[2:]}"
    return tag
