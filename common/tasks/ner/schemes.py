"""Tag schemes: IOB1, IOB2, BIOES and BILOU detected from the data and converted to IOB2, so
that the rest of fedward only ever sees one scheme."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Literal

from fedward.common.errors import DataError

logger = logging.getLogger(__name__)

#: Tag schemes the reader understands. BILOU is BIOES with L (last) for E and U (unit) for S.
TagScheme = Literal["IOB1", "IOB2", "BIOES", "BILOU"]

#: One sentence: (word, tag) pairs, tags in IOB2 once read.
Sentence = list[tuple[str, str]]


class PatientSentence(list):
    """A sentence that knows which patient it belongs to: the unit of patient-level DP.

    A plain list of (word, tag) pairs to everything else (reading, splitting, encoding), with
    the patient as an attribute, so that it follows the sentence through splits and filters.
    """

    def __init__(self, pairs=(), patient: str | None = None) -> None:
        super().__init__(pairs)
        self.patient = patient


_TAG = re.compile(r"(?:O|([BIESLU])-([^\s-]\S*))")
_ALLOWED_PREFIXES = {
    "IOB1": "BI",
    "IOB2": "BI",
    "BIOES": "BIES",
    "BILOU": "BILU",
}

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

    Args:
        tag_sequences: The tags of each sentence, as written in the data.
        source: What the tags come from (a file path), for messages.
        lines: The line number of each tag, one sequence per sentence parallel to
            `tag_sequences`; None names positions as sentence and tag numbers instead.

    Returns:
        "BIOES", "BILOU", or, with only O/B-/I- tags, "IOB1" when more entities start with I-
        than with B-, else "IOB2".

    Raises:
        DataError: a tag that is none of O, B-X, I-X, E-X, S-X, L-X, U-X, or data that use both
            E-/S- (BIOES) and L-/U- (BILOU) tags.
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
    becomes I-X. IOB2 comes back unchanged.

    Args:
        tags: The sentence's tags, as written in the data.
        scheme: The scheme they are written in (`detect_scheme`).
        source: What the tags come from (a file path), for messages.
        lines: The line number of each tag, parallel to `tags`; None names positions as tag
            numbers instead.

    Returns:
        The IOB2 tags, one per tag of `tags`.

    Raises:
        DataError: naming the position (the file and line when `source` and `lines` are given)
            for a malformed tag, a tag the scheme does not allow, or a sequence it forbids: an
            I-X that does not continue an X entity (IOB2, BIOES, BILOU), or a BIOES/BILOU entity
            that is not closed by E-X/L-X.
        ValueError: `scheme` is not one of IOB1, IOB2, BIOES, BILOU.
    """
    if scheme not in _ALLOWED_PREFIXES:
        raise ValueError(
            f"unknown tag scheme {scheme!r}; expected one of {list(_ALLOWED_PREFIXES)}"
        )
    allowed = _ALLOWED_PREFIXES[scheme]
    step = _iob_step if scheme in ("IOB1", "IOB2") else _ending_step

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
        problem, written, open_type = step(tag, prefix, entity_type, open_type, scheme, after)
        if problem:
            raise fail(i, problem)
        converted.append(written)
    if open_type and scheme in ("BIOES", "BILOU"):
        end = "L" if scheme == "BILOU" else "E"
        raise fail(
            len(tags) - 1,
            f"the sentence ends inside a {open_type!r} entity; under {scheme} it must end with "
            f"'{end}-{open_type}'",
        )
    return converted


def _iob_step(
    tag: str, prefix: str, entity_type: str, open_type: str, scheme: str, after: str
) -> tuple[str, str, str]:
    """One IOB1/IOB2 tag: (problem, or "", the tag in IOB2, the entity type it leaves open)."""
    if prefix == "I" and entity_type != open_type:
        if scheme == "IOB2":
            return (
                f"{tag!r} {after} does not continue an entity of type {entity_type!r} "
                f"(IOB2 starts every entity with B-); change it to 'B-{entity_type}' "
                "or fix the tag before it",
                "",
                open_type,
            )
        return "", f"B-{entity_type}", entity_type
    return "", tag, entity_type


def _ending_step(
    tag: str, prefix: str, entity_type: str, open_type: str, scheme: str, after: str
) -> tuple[str, str, str]:
    """One BIOES/BILOU tag, where every entity is B (I)* E, or a single S: (problem, or "", the
    tag in IOB2, the entity type it leaves open)."""
    end, single = ("L", "U") if scheme == "BILOU" else ("E", "S")
    if open_type and not (prefix in ("I", end) and entity_type == open_type):
        problem = (
            f"{tag!r} {after}: the {open_type!r} entity is not closed; under {scheme} it "
            f"must end with '{end}-{open_type}'"
        )
        return problem, "", open_type
    if not open_type and prefix in ("I", end):
        problem = (
            f"{tag!r} {after} does not continue an entity of type {entity_type!r}; under "
            f"{scheme} an entity starts with 'B-{entity_type}' (or is a single "
            f"'{single}-{entity_type}')"
        )
        return problem, "", open_type
    if prefix in ("B", single):
        written = f"B-{entity_type}"
    elif prefix in ("I", end):
        written = f"I-{entity_type}"
    else:
        written = "O"
    return "", written, entity_type if prefix in ("B", "I") else ""


def label_list(sentences: Sequence[Sequence[tuple[str, str]]]) -> list[str]:
    """The model's output labels for IOB2 sentences: 'O', then B-X, I-X for each type X, sorted.

    Both B- and I- are listed for every entity type seen, even if the data never uses I-X (only
    one-word entities): every hospital then derives the same labels from the same set of types.

    Args:
        sentences: Sentences of (word, tag) pairs, tags in IOB2.

    Returns:
        ["O", "B-A", "I-A", "B-B", "I-B", ...] over the entity types in sorted order; just
        ["O"] when no sentence has an entity.
    """
    types = {tag[2:] for sentence in sentences for _, tag in sentence if tag != "O"}
    return ["O"] + [f"{prefix}-{entity_type}" for entity_type in sorted(types) for prefix in "BI"]
