"""Word pieces: a word's first piece carries its label (the others get -100, which the loss
ignores); sentences longer than the model's window are cut at clause ends."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fedward.common.errors import DataError, ModelError
from fedward.common.tasks.ner.schemes import Sentence

logger = logging.getLogger(__name__)

#: Label id of word pieces the loss ignores (later pieces of a word, special tokens).
IGNORE_INDEX = -100

# --- word pieces --------------------------------------------------------------------------------


def align_labels(
    word_ids: Sequence[int | None],
    word_tags: Sequence[str],
    label_to_id: Mapping[str, int],
) -> list[int]:
    """Label id per word piece: the word's label on its first piece, -100 on later pieces and on
    special tokens (word id None), so the loss sees each word exactly once.

    Args:
        word_ids: The word index of each piece of one encoded sentence (the fast tokenizer's
            `word_ids()`), None for special tokens.
        word_tags: The sentence's IOB2 tag of each word, indexed by those word indices.
        label_to_id: The run's label list: tag -> label id.

    Returns:
        One label id per piece, as long as `word_ids`: the tag's id on a word's first piece,
        -100 (`IGNORE_INDEX`) elsewhere.

    Raises:
        DataError: a word's tag is not in `label_to_id`.
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
    tokenizer: Any,
    sentences: Sequence[Sequence[tuple[str, str]]],
    max_length: int,
    with_origins: bool = False,
) -> Any:
    """Cut sentences longer than `max_length` word pieces into pieces that fit, so that no word
    is lost to truncation (long Chinese records run to hundreds of characters).

    A cut is only made before a word that does not continue an entity (its tag is not I-X), so
    no entity is split or lost; within that rule the cut is made after the last clause end
    (。，；! ...) in the second half of the piece, else as late as possible. An entity longer
    than a whole piece cannot be kept whole: it is cut where the piece is full and its remainder
    starts the next piece as a new entity of the same type (a warning counts them). Special
    tokens ([CLS], [SEP]) are accounted for. Unlabelled text (all tags 'O') is cut the same way.

    A single word with more pieces than fit is a piece on its own (encoding then truncates it).

    Args:
        tokenizer: A Hugging Face tokenizer that can encode pre-split words
            (`is_split_into_words`) and report `word_ids`, i.e. a fast one.
        sentences: Sentences of (word, tag) pairs, tags in IOB2 ('O' for unlabelled text).
        max_length: The model's window in word pieces, special tokens included.
        with_origins: Also return, for each piece, the index of the sentence it comes from.

    Returns:
        The pieces, in order, each a new list of (word, tag) pairs (a sentence that fits comes
        back whole, as a plain list: a `PatientSentence`'s patient is not kept). With
        `with_origins`: (pieces, the index in `sentences` of each piece's sentence), which
        patient-level DP needs to keep a cut sentence's pieces with their patient.
    """
    budget = max(1, max_length - tokenizer.num_special_tokens_to_add(pair=False))
    pieces_per_word = _pieces_per_word(tokenizer, sentences)
    result: list[Sentence] = []
    origins: list[int] = []
    records_cut = entities_cut = 0
    for origin, (sentence, sizes) in enumerate(zip(sentences, pieces_per_word, strict=True)):
        if sum(sizes) <= budget:
            result.append(list(sentence))
            origins.append(origin)
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
            origins.append(origin)
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
    return (result, origins) if with_origins else result


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

    Args:
        tokenizer: A fast Hugging Face tokenizer (`is_fast`).
        sentences: Sentences of (word, tag) pairs, tags in IOB2.
        label_to_id: The run's label list: tag -> label id.
        max_length: The most word pieces of an example, special tokens included.

    Returns:
        One example per sentence, in order: {"input_ids", "attention_mask", "labels"}, three
        lists of ints of the same length (at most `max_length`); `labels` as `align_labels`
        gives them (-100 on special tokens and on later pieces of a word).

    Raises:
        ModelError: the tokenizer is not a fast tokenizer.
        DataError: a tag is not in `label_to_id`.
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
