"""Named-entity recognition: CoNLL or entity-JSON files in, word-piece labels out, entity-level
metrics back.

The NER task's data and metrics layer, shared by hospitals (training, evaluation) and the
coordinator (reports, `fedward predict`). Everything here is a pure function except the
readers at the top, which turn files into sentences:

    sentence  = [(word, tag), ...]          tags are IOB2 once read: O, B-TYPE, I-TYPE

Files may use IOB1, IOB2, BIOES or BILOU tags; the reader detects which from the data and
converts to IOB2, so the rest of fedward only ever sees one scheme. A word becomes one or more
word pieces in the model; only a word's first piece carries its label (the others get -100,
which the loss ignores), and at evaluation time the prediction on that first piece is the
word's prediction.

Metrics are entity-level, computed with seqeval in *strict* IOB2 mode: an entity counts as
found only if its type and both boundaries match exactly, and a predicted I-TYPE that does not
continue a B-TYPE/I-TYPE of the same type is not an entity at all. (seqeval's default,
conlleval-compatible mode would instead let such a stray I- start an entity.) Strict mode scores
what the tags say under the scheme the model is trained on, and `entity_spans` applies the same
rule, so the entities `fedward predict` prints are exactly the ones the metrics count.
"""

from __future__ import annotations

import codecs
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from fedward.common.errors import DataError, ModelError

logger = logging.getLogger(__name__)

#: Label id of word pieces the loss ignores (later pieces of a word, special tokens).
IGNORE_INDEX = -100

#: Tag schemes the reader understands. BILOU is BIOES with L (last) for E and U (unit) for S.
TagScheme = Literal["IOB1", "IOB2", "BIOES", "BILOU"]

Sentence = list[tuple[str, str]]

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

_TAG = re.compile(r"(?:O|([BIESLU])-([^\s-]\S*))")
_ALLOWED_PREFIXES = {
    "IOB1": "BI",
    "IOB2": "BI",
    "BIOES": "BIES",
    "BILOU": "BILU",
}


# --- reading ------------------------------------------------------------------------------------


def read_conll(path: str | Path) -> list[Sentence]:
    """Read one CoNLL-style file into sentences of (word, tag), tags converted to IOB2.

    Format: one `word<TAB>tag` per line (with more tab-separated columns, the first is the word
    and the last the tag), or `word tag` separated by spaces in a file whose first line has no
    tab (character-per-line Chinese corpora, `字 B_disease`; `B_`/`I_` tags read as `B-`/`I-`),
    a blank line between sentences, `-DOCSTART-` lines skipped. The tag scheme (IOB1, IOB2,
    BIOES, BILOU) is detected from the whole file (`detect_scheme`).

    Raises `DataError` naming the file and line for: a missing or unreadable file, bytes that are
    not UTF-8, a line without the file's separator, an empty word or tag, a tag outside
    O/B-/I-/E-/S-/L-/U-,
    a tag sequence that the detected scheme forbids, or a file without any sentence.
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


def read_ner_file(path: str | Path) -> list[Sentence]:
    """One NER file, its format told by its extension: .json/.jsonl is entity JSON
    (`read_entity_json`), anything else CoNLL, one word (or character) and its tag per line
    (`read_conll`)."""
    path = Path(path)
    if path.suffix.lower() in JSON_SUFFIXES:
        return read_entity_json(path)
    return read_conll(path)


def read_entity_json(path: str | Path) -> list[Sentence]:
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
    number is logged). Raises `DataError` naming the file and the line (JSON lines) or record
    (array) for: JSON that does not parse, a record without text, an entity without a type or
    with offsets outside its text, or an entity text that does not match its offsets.
    """
    import json

    path = Path(path)
    text = _read_text(path)
    records: list[tuple[str, Any]] = []
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the file is empty; it needs JSON records with text and entities")
    if stripped.startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        records = [(f"{path}, record {n}", record) for n, record in enumerate(array, start=1)]
    else:
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
        sentences.append(list(zip(record["text"], tags, strict=True)))
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


# --- tag schemes --------------------------------------------------------------------------------


def _where(source: str, lines: Sequence[int] | None, index: int) -> str:
    """'file:line' when line numbers are known, else 'source, tag N' (1-based)."""
    if lines is not None:
        return f"{source}:{lines[index]}"
    return f"{source}, tag {index + 1}"


def _split_tag(tag: str) -> tuple[str, str]:
    """('B', 'Disease') for 'B-Disease'; ('O', '') for 'O'. Assumes the tag is well formed."""
    return ("O", "") if tag == "O" else (tag[0], tag[2:])


def detect_scheme(
    tag_sequences: Sequence[Sequence[str]],
    *,
    source: str = "tags",
    lines: Sequence[Sequence[int]] | None = None,
) -> TagScheme:
    """Which tag scheme the sequences are written in: IOB1, IOB2, BIOES or BILOU.

    E-/S- tags mean BIOES, L-/U- tags mean BILOU (both at once is an error). With only O/B-/I-,
    the question is how entities start: IOB2 always starts one with B-, IOB1 with I- (B- only
    separates two adjacent entities of the same type). The scheme is the one most entity starts
    agree with; no I- start at all means IOB2, and in IOB2 data an I- start is then reported by
    `to_iob2` as an error. `source` and `lines` (parallel to the tags) only make messages name
    the file and line.

    Raises `DataError` for a tag that is none of O, B-X, I-X, E-X, S-X, L-X, U-X.
    """
    first_at: dict[str, str] = {}  # prefix letter -> where it first occurs
    b_starts = i_starts = 0
    for n, tags in enumerate(tag_sequences):
        at = lines[n] if lines is not None else None
        where = source if at is not None else f"{source}, sentence {n + 1}"
        previous_type = ""
        for i, tag in enumerate(tags):
            match = _TAG.fullmatch(tag)
            if match is None:
                raise DataError(
                    f"{_where(where, at, i)}: unknown tag {tag!r}; "
                    "tags must be O or PREFIX-TYPE with PREFIX one of B, I, E, S, L, U "
                    "(schemes IOB1, IOB2, BIOES, BILOU), e.g. B-Disease"
                )
            prefix, entity_type = _split_tag(tag)
            first_at.setdefault(prefix, _where(where, at, i))
            starts_entity = prefix in "BI" and entity_type != previous_type
            b_starts += starts_entity and prefix == "B"
            i_starts += starts_entity and prefix == "I"
            previous_type = entity_type
    bioes = [p for p in "ES" if p in first_at]
    bilou = [p for p in "LU" if p in first_at]
    if bioes and bilou:
        raise DataError(
            f"{first_at[bilou[0]]}: a {bilou[0]}- tag (BILOU) in data that also uses "
            f"{bioes[0]}- tags (BIOES, first at {first_at[bioes[0]]}); use one scheme: "
            "L-/U- or E-/S-"
        )
    if bioes:
        return "BIOES"
    if bilou:
        return "BILOU"
    scheme: TagScheme = "IOB1" if i_starts > b_starts else "IOB2"
    logger.debug(
        "%s: %d entities start with B-, %d with I-: %s", source, b_starts, i_starts, scheme
    )
    return scheme


def to_iob2(
    tags: Sequence[str],
    scheme: TagScheme,
    *,
    source: str = "tags",
    lines: Sequence[int] | None = None,
) -> list[str]:
    """One sentence's tags, written in `scheme`, rewritten in IOB2 (B- starts every entity).

    IOB1: an I-X that starts an entity becomes B-X. BIOES/BILOU: S-X/U-X becomes B-X, E-X/L-X
    becomes I-X. IOB2 comes back unchanged. Raises `DataError` naming the position (the file and
    line when `source` and `lines` are given) for a tag the scheme does not allow or a sequence
    it forbids: an I-X that does not continue an X entity (IOB2, BIOES, BILOU), or a BIOES/BILOU
    entity that is not closed by E-X/L-X.
    """
    if scheme not in _ALLOWED_PREFIXES:
        raise ValueError(
            f"unknown tag scheme {scheme!r}; expected one of {list(_ALLOWED_PREFIXES)}"
        )
    allowed = _ALLOWED_PREFIXES[scheme]
    end, single = ("L", "U") if scheme == "BILOU" else ("E", "S")

    def fail(index: int, what: str) -> DataError:
        return DataError(f"{_where(source, lines, index)}: {what}")

    converted: list[str] = []
    open_type = ""  # type of the entity the previous tag leaves open ("" when none)
    for i, tag in enumerate(tags):
        if tag != "O" and _TAG.fullmatch(tag) is None:
            raise fail(i, f"unknown tag {tag!r}; tags must be O or PREFIX-TYPE, e.g. B-Disease")
        prefix, entity_type = _split_tag(tag)
        if prefix != "O" and prefix not in allowed:
            raise fail(i, f"tag {tag!r} does not belong to the {scheme} scheme used by this data")
        after = f"after {tags[i - 1]!r}" if i else "at the start of the sentence"

        if scheme in ("IOB1", "IOB2"):
            continues = prefix == "I" and entity_type == open_type
            if prefix == "I" and not continues:
                if scheme == "IOB2":
                    raise fail(
                        i,
                        f"{tag!r} {after} does not continue an entity of type {entity_type!r} "
                        f"(IOB2 starts every entity with B-); change it to 'B-{entity_type}' "
                        "or fix the tag before it",
                    )
                converted.append(f"B-{entity_type}")
            else:
                converted.append(tag)
            open_type = entity_type
            continue

        # BIOES / BILOU: every entity is B (I)* E, or a single S.
        if open_type and not (prefix in ("I", end) and entity_type == open_type):
            raise fail(
                i,
                f"{tag!r} {after}: the {open_type!r} entity is not closed; under {scheme} it "
                f"must end with '{end}-{open_type}'",
            )
        if not open_type and prefix in ("I", end):
            raise fail(
                i,
                f"{tag!r} {after} does not continue an entity of type {entity_type!r}; under "
                f"{scheme} an entity starts with 'B-{entity_type}' (or is a single "
                f"'{single}-{entity_type}')",
            )
        if prefix in ("B", single):
            converted.append(f"B-{entity_type}")
        elif prefix in ("I", end):
            converted.append(f"I-{entity_type}")
        else:
            converted.append("O")
        open_type = entity_type if prefix in ("B", "I") else ""
    if open_type and scheme in ("BIOES", "BILOU"):
        raise fail(
            len(tags) - 1,
            f"the sentence ends inside a {open_type!r} entity; under {scheme} it must end with "
            f"'{end}-{open_type}'",
        )
    return converted


def label_list(sentences: Sequence[Sequence[tuple[str, str]]]) -> list[str]:
    """The model's output labels for IOB2 sentences: 'O', then B-X, I-X for each type X, sorted.

    Both B- and I- are listed for every entity type seen, even if the data never uses I-X (only
    one-word entities): every hospital then derives the same labels from the same set of types.
    """
    types = {tag[2:] for sentence in sentences for _, tag in sentence if tag != "O"}
    return ["O"] + [f"{prefix}-{entity_type}" for entity_type in sorted(types) for prefix in "BI"]


# --- word pieces --------------------------------------------------------------------------------


def align_labels(
    word_ids: Sequence[int | None],
    word_tags: Sequence[str],
    label_to_id: Mapping[str, int],
) -> list[int]:
    """Label id per word piece: the word's label on its first piece, -100 on later pieces and on
    special tokens (word id None), so the loss sees each word exactly once.

    Raises `DataError` if a tag is not in `label_to_id` (the run's label list).
    """
    labels: list[int] = []
    previous: int | None = None
    for word_id in word_ids:
        if word_id is None or word_id == previous:
            labels.append(IGNORE_INDEX)
        else:
            tag = word_tags[word_id]
            if tag not in label_to_id:
                raise DataError(
                    f"tag {tag!r} is not in the run's label list {sorted(label_to_id)}; add it to "
                    "`labels` in the run config so that the model has an output for it"
                )
            labels.append(label_to_id[tag])
        previous = word_id
    return labels


#: Characters after which a long sentence is preferably cut (ends of clauses, any script).
_CLAUSE_ENDS = frozenset("。！？；，、.!?;,")


def cut_long_sentences(
    tokenizer: Any, sentences: Sequence[Sequence[tuple[str, str]]], max_length: int
) -> list[Sentence]:
    """Cut sentences longer than `max_length` word pieces into pieces that fit, so that no word
    is lost to truncation (long Chinese records run to hundreds of characters).

    A cut is only made before a word that does not continue an entity (its tag is not I-X), so
    no entity is split or lost; within that rule the cut is made after the last clause end
    (。，；! ...) in the second half of the piece, else as late as possible. An entity longer
    than a whole piece cannot be kept whole: it is cut where the piece is full and its remainder
    starts the next piece as a new entity of the same type (a warning counts them). Special
    tokens ([CLS], [SEP]) are accounted for. Unlabelled text (all tags 'O') is cut the same way.
    """
    budget = max(1, max_length - tokenizer.num_special_tokens_to_add(pair=False))
    pieces_per_word = _pieces_per_word(tokenizer, sentences)
    result: list[Sentence] = []
    records_cut = entities_cut = 0
    for sentence, sizes in zip(sentences, pieces_per_word, strict=True):
        if sum(sizes) <= budget:
            result.append(list(sentence))
            continue
        records_cut += 1
        start = 0
        while start < len(sentence):
            end, used = start, 0
            while end < len(sentence) and (end == start or used + sizes[end] <= budget):
                used += sizes[end]
                end += 1
            if end < len(sentence):
                end, split_entity = _cut_point(sentence, start, end)
                entities_cut += split_entity
            piece = list(sentence[start:end])
            word, tag = piece[0]
            if tag.startswith("I-"):  # the remainder of an entity longer than a piece
                piece[0] = (word, "B-" + tag[2:])
            result.append(piece)
            start = end
    if records_cut:
        logger.info(
            "%d of %d sentences are longer than max_length=%d word pieces: cut into %d pieces "
            "at boundaries outside entities",
            records_cut,
            len(sentences),
            max_length,
            len(result) - len(sentences) + records_cut,
        )
    if entities_cut:
        logger.warning(
            "%d entities are longer than max_length=%d word pieces and were cut into parts",
            entities_cut,
            max_length,
        )
    return result


def _cut_point(sentence: Sequence[tuple[str, str]], start: int, end: int) -> tuple[int, bool]:
    """Where to end a piece that may hold words start..end-1: (cut, whether it splits an
    entity). See `cut_long_sentences`."""
    allowed = [i for i in range(start + 1, end + 1) if not sentence[i][1].startswith("I-")]
    if not allowed:
        return end, True
    half = start + (end - start) // 2
    after_clause = [i for i in allowed if i > half and sentence[i - 1][0] in _CLAUSE_ENDS]
    return (after_clause or allowed)[-1], False


def _pieces_per_word(tokenizer: Any, sentences: Sequence[Sequence[tuple[str, str]]]) -> list:
    """For each sentence, the number of word pieces of each of its words."""
    if not sentences:
        return []
    words = [[word for word, _ in sentence] for sentence in sentences]
    encoding = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    counts = []
    for i, sentence in enumerate(sentences):
        sizes = [0] * len(sentence)
        for word_id in encoding.word_ids(i):
            if word_id is not None:
                sizes[word_id] += 1
        counts.append(sizes)
    return counts


def encode_sentences(
    tokenizer: Any,
    sentences: Sequence[Sequence[tuple[str, str]]],
    label_to_id: Mapping[str, int],
    max_length: int,
) -> list[dict[str, list[int]]]:
    """Tokenize pre-split sentences into model examples: input_ids, attention_mask, labels.

    Needs a fast (Rust) Hugging Face tokenizer, which knows which word each piece came from.
    Sentences longer than `max_length` pieces are truncated (their last words are then neither
    trained on nor scored; a warning says how many). Nothing is padded: batches are padded later.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; NER needs one to map "
            "word pieces to words: use a model folder that has a tokenizer.json"
        )
    if not sentences:
        return []
    words = [[word for word, _ in sentence] for sentence in sentences]
    encoding = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    examples = []
    truncated = 0
    for i, sentence in enumerate(sentences):
        word_ids = encoding.word_ids(i)
        kept = {word_id for word_id in word_ids if word_id is not None}
        truncated += bool(kept) and max(kept) + 1 < len(sentence)
        examples.append(
            {
                "input_ids": list(encoding["input_ids"][i]),
                "attention_mask": list(encoding["attention_mask"][i]),
                "labels": align_labels(word_ids, [tag for _, tag in sentence], label_to_id),
            }
        )
    if truncated:
        logger.warning(
            "%d of %d sentences are longer than max_length=%d word pieces and were truncated; "
            "raise max_length to train on their last words",
            truncated,
            len(sentences),
            max_length,
        )
    return examples


# --- decoding -----------------------------------------------------------------------------------


def labels_to_tags(
    label_ids: Sequence[int], id_to_label: Mapping[int, str] | Sequence[str]
) -> list[str]:
    """The true word-level tags of one example: its labels where they are not -100."""
    return [id_to_label[int(label)] for label in label_ids if int(label) != IGNORE_INDEX]


def predictions_to_tags(
    pred_ids: Sequence[int],
    label_ids: Sequence[int],
    id_to_label: Mapping[int, str] | Sequence[str],
) -> list[str]:
    """The predicted word-level tags of one example: predictions on the pieces that carry a
    label (each word's first piece), aligned one to one with `labels_to_tags(label_ids, ...)`.

    `pred_ids` and `label_ids` are per piece and may both include padding (labelled -100).
    """
    if len(pred_ids) != len(label_ids):
        raise ValueError(f"{len(pred_ids)} predictions for {len(label_ids)} labels")
    return [
        id_to_label[int(pred)]
        for pred, label in zip(pred_ids, label_ids, strict=True)
        if int(label) != IGNORE_INDEX
    ]


def predictions_to_word_tags(
    pred_ids: Sequence[int],
    word_ids: Sequence[int | None],
    id_to_label: Mapping[int, str] | Sequence[str],
    num_words: int,
) -> list[str]:
    """One predicted tag per word of an unlabelled sentence (for `fedward predict`): the
    prediction on each word's first piece; 'O' for words that have no piece (truncated away).
    """
    tags = ["O"] * num_words
    seen: set[int] = set()
    for pred, word_id in zip(pred_ids, word_ids, strict=False):
        if word_id is not None and word_id not in seen:
            tags[word_id] = id_to_label[int(pred)]
            seen.add(word_id)
    return tags


#: Scripts written without spaces between words (Han, kana, Hangul syllables, CJK
#: compatibility ideographs): every character is a word of its own, as in character-per-line
#: corpora such as cMedQANER and CMeEE.
CJK_CHARACTERS = (
    "\u2e80-\u2fdf\u3005-\u3007\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
)
_WORD = re.compile(rf"[{CJK_CHARACTERS}]|(?:(?![{CJK_CHARACTERS}])\w)+|[^\w\s]")


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Split raw text into words the way the NER corpora are tokenized (runs of letters/digits,
    each punctuation mark on its own, each Chinese/Japanese/Korean character on its own) and
    their character offsets [start, end) in `text`.
    """
    matches = list(_WORD.finditer(text))
    return [m.group() for m in matches], [(m.start(), m.end()) for m in matches]


class EntitySpan(NamedTuple):
    """One entity found in a sentence. Word and character ends are exclusive (like slices)."""

    entity_type: str
    start_word: int
    end_word: int
    text: str
    start_char: int | None = None
    end_char: int | None = None


def entity_spans(
    words: Sequence[str],
    tags: Sequence[str],
    *,
    text: str | None = None,
    offsets: Sequence[tuple[int, int]] | None = None,
) -> list[EntitySpan]:
    """The entities in one IOB2-tagged sentence, read with the same strict rule as `ner_metrics`:
    an entity is B-X followed by any I-X; an I- that does not continue it is ignored.

    With the original `text` and each word's character `offsets` (e.g. from `split_words`),
    spans also carry character offsets and their text is the original slice; with `text` alone
    the words are located in it in order. Otherwise the text is the words joined by spaces.
    """
    if len(words) != len(tags):
        raise ValueError(f"{len(words)} words but {len(tags)} tags")
    if text is not None and offsets is None:
        offsets = _locate_words(text, words)
    spans: list[EntitySpan] = []
    i = 0
    while i < len(tags):
        if not tags[i].startswith("B-"):
            i += 1
            continue
        entity_type = tags[i][2:]
        end = i + 1
        while end < len(tags) and tags[end] == f"I-{entity_type}":
            end += 1
        if text is not None and offsets is not None:
            start_char, end_char = offsets[i][0], offsets[end - 1][1]
            spans.append(
                EntitySpan(entity_type, i, end, text[start_char:end_char], start_char, end_char)
            )
        else:
            spans.append(EntitySpan(entity_type, i, end, " ".join(words[i:end])))
        i = end
    return spans


def _locate_words(text: str, words: Sequence[str]) -> list[tuple[int, int]]:
    """Character offsets of each word in `text`, searching left to right."""
    offsets = []
    position = 0
    for word in words:
        start = text.find(word, position)
        if start < 0:
            raise ValueError(f"word {word!r} not found in the text after character {position}")
        position = start + len(word)
        offsets.append((start, position))
    return offsets


# --- metrics ------------------------------------------------------------------------------------


def ner_metrics(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict:
    """Entity-level precision, recall and F1 (seqeval, strict IOB2; see the module docstring).

    Returns {"precision", "recall", "f1": micro-averaged over all entities, "support": number of
    true entities, "per_type": {TYPE: {"precision", "recall", "f1", "support"}}}. Types that
    occur only in the predictions are listed with support 0. A score with nothing to divide by
    (no predictions, or no true entities) is 0.0.
    """
    from seqeval.metrics.v1 import precision_recall_fscore_support
    from seqeval.scheme import IOB2, Entities

    if len(true_tags) != len(pred_tags):
        raise ValueError(f"{len(true_tags)} true sentences but {len(pred_tags)} predicted")
    for n, (true, pred) in enumerate(zip(true_tags, pred_tags, strict=True)):
        if len(true) != len(pred):
            raise ValueError(f"sentence {n}: {len(true)} true tags but {len(pred)} predicted")
    true_lists = [list(tags) for tags in true_tags]
    pred_lists = [list(tags) for tags in pred_tags]
    if not true_lists:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "per_type": {}}
    # Extract the entities once (strict IOB2) and let seqeval count and divide.
    entities = {
        "entities_true": Entities(true_lists, IOB2),
        "entities_pred": Entities(pred_lists, IOB2),
    }
    types = sorted(entities["entities_true"].unique_tags | entities["entities_pred"].unique_tags)

    def scores(average: str | None) -> tuple[Any, Any, Any, Any]:
        return precision_recall_fscore_support(
            true_lists, pred_lists, average=average, scheme=IOB2, zero_division=0, **entities
        )

    precision, recall, f1, support = scores("micro")
    metrics: dict[str, Any] = {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "support": int(support),
    }
    per_type = zip(types, *scores(None), strict=True)
    metrics["per_type"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in per_type
    }
    return metrics
