"""Decoding: predictions on first word pieces back to word tags, and tags to entity spans in
the text (the same strict IOB2 rule the metrics use, so `fedward predict` shows exactly the
entities the metrics count)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from fedward.common.tasks.ner.encoding import IGNORE_INDEX

logger = logging.getLogger(__name__)

# --- decoding -----------------------------------------------------------------------------------


def labels_to_tags(
    label_ids: Sequence[int], id_to_label: Mapping[int, str] | Sequence[str]
) -> list[str]:
    """The true word-level tags of one example: its labels where they are not -100.

    Args:
        label_ids: The example's label id per word piece, -100 on pieces without a label.
        id_to_label: Label id -> tag (the run's label list, or a mapping).

    Returns:
        One tag per labelled piece (each word's first piece), in order.
    """
    return [id_to_label[int(label)] for label in label_ids if int(label) != IGNORE_INDEX]


def predictions_to_tags(
    pred_ids: Sequence[int],
    label_ids: Sequence[int],
    id_to_label: Mapping[int, str] | Sequence[str],
) -> list[str]:
    """The predicted word-level tags of one example: predictions on the pieces that carry a
    label (each word's first piece), aligned one to one with `labels_to_tags(label_ids, ...)`.

    `pred_ids` and `label_ids` are per piece and may both include padding (labelled -100).

    Args:
        pred_ids: The predicted label id of each piece (the argmax of the logits).
        label_ids: The true label id of each piece, -100 on pieces without a label.
        id_to_label: Label id -> tag (the run's label list, or a mapping).

    Returns:
        The predicted tag of each piece whose label is not -100, in order.

    Raises:
        ValueError: `pred_ids` and `label_ids` differ in length.
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

    Args:
        pred_ids: The predicted label id of each piece of the encoded sentence.
        word_ids: The word index of each piece (the fast tokenizer's `word_ids()`), None for
            special tokens.
        id_to_label: Label id -> tag (the run's label list, or a mapping).
        num_words: The number of words of the sentence.

    Returns:
        `num_words` tags, one per word.
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

    Args:
        text: The raw text; whitespace separates words and is dropped.

    Returns:
        (words, offsets): the words in order, and the (start, exclusive end) character offsets
        of each in `text`, so that `text[start:end]` is the word.
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

    Args:
        words: The sentence's words.
        tags: The IOB2 tag of each word.
        text: The original text the words come from, or None.
        offsets: The (start, exclusive end) character offsets of each word in `text`; used
            only with `text`.

    Returns:
        The entities in order of their first word, as `EntitySpan`s; character offsets are
        None when no `text` is given.

    Raises:
        ValueError: `words` and `tags` differ in length, or (`text` without `offsets`) a word
            is not found in the text.
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
