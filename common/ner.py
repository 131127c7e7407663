"""Named-entity recognition: CoNLL files in, word-piece labels out, entity-level metrics back.

The NER task's data and metrics layer, shared by hospitals (training, evaluation) and the
coordinator (reports, `fedward predict`). Everything here is a pure function except the two
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
    and the last the tag), a blank line between sentences, `-DOCSTART-` lines skipped. The tag
    scheme (IOB1, IOB2, BIOES, BILOU) is detected from the whole file (`detect_scheme`).

    Raises `DataError` naming the file and line for: a missing or unreadable file, bytes that are
    not UTF-8, a line without a tab, an empty word or tag, a tag outside O/B-/I-/E-/S-/L-/U-,
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
    returned as 'devel', and `test.*` as 'test', where present. Extensions: .tsv, .conll, .txt,
    .iob, .iob2, .bio, .bioes; other files (README, LICENSE) are ignored. Each file is read with
    `read_conll`, so each may use its own tag scheme; all come back in IOB2.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; check the NER data path")
    if path.is_file():
        return {"train": read_conll(path)}

    found: dict[str, list[Path]] = {}
    for file in sorted(path.iterdir()):
        split = SPLIT_NAMES.get(file.stem.lower())
        if file.is_file() and split is not None and file.suffix.lower() in CONLL_SUFFIXES:
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
    return {split: read_conll(files[0]) for split, files in found.items()}


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
    """Split CoNLL text into sentences of raw (word, tag) and, in parallel, their line numbers."""
    sentences: list[Sentence] = []
    lines: list[list[int]] = []
    sentence: Sentence = []
    at: list[int] = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip() or line.startswith("-DOCSTART-"):
            if sentence:
                sentences.append(sentence)
                lines.append(at)
                sentence, at = [], []
            continue
        if "\t" not in line:
            raise DataError(
                f"{path}:{number}: no tab between word and tag in {line[:60]!r}; each line must "
                "be `word<TAB>tag` (if the file separates columns with spaces, replace them "
                "with a tab)"
            )
        columns = line.split("\t")
        word, tag = columns[0].strip(), columns[-1].strip()
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


_WORD = re.compile(r"\w+|[^\w\s]")


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Split raw text into words the way the NER corpora are tokenized (runs of letters/digits,
    each punctuation mark on its own) and their character offsets [start, end) in `text`.
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
