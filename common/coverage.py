"""Vocabulary coverage: how much of a hospital's text its model can see at all.

A tokenizer maps what its vocabulary lacks to one unknown token (`[UNK]`). Trained on such text,
a model learns from, and is scored on, a blur: the packaged all-MiniLM-L6-v2 knows a few hundred
Han characters, so a Chinese note becomes mostly `[UNK]`, and a run would still train and report
a score without a word of warning. Before a hospital trains or evaluates, `check_vocabulary`
measures the share of its text's units that the run's tokenizer cannot represent, and above the
run spec's `max_unknown_rate` refuses with one line naming the model, the share and what to do.

A unit is a character in scripts written without spaces (Chinese, Japanese, Korean) and a word
(a run of letters and digits, or one punctuation mark) otherwise, split as `ner.split_words`
does. A unit counts as unknown when any of its pieces is the unknown token, or when the tokenizer
drops it entirely (it then reaches the model as nothing). The share, one number, leaves the hospital
only in simulation's report; a refusal carries only the run's own limit.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence

from fedward.common.errors import DataError
from fedward.common.protocol.reasons import Reason
from fedward.common.tasks.ner import split_words

log = logging.getLogger(__name__)


class VocabularyError(DataError):
    """The run's model cannot represent too much of a hospital's text.

    `unknown_rate` and `max_unknown_rate` hold the two numbers of the message, so that a
    refusal can carry them as parameters rather than as text.
    """

    def __init__(self, model: str, unknown_rate: float, max_unknown_rate: float) -> None:
        self.model = model
        self.unknown_rate = unknown_rate
        self.max_unknown_rate = max_unknown_rate
        super().__init__(
            f"model {model} maps {unknown_rate:.1%} of the text's characters and words to its "
            f"unknown token (limit {max_unknown_rate:.1%}); use a model whose vocabulary "
            "covers the text, e.g. a Chinese BERT (bert-base-chinese, MC-BERT) for Chinese notes",
            # Only the run's own limit leaves: the share is derived from the hospital's text
            # (and, against limits a coordinator chooses, would be searched for digit by digit).
            reason=Reason("data.vocabulary", {"max_unknown_rate": max_unknown_rate}),
        )


def example_units(example) -> list[str]:
    """The units of one example: a `Record`'s text, or a tagged sentence's words, split into
    characters (scripts without spaces) and words."""
    if isinstance(example, list | tuple):  # a sentence of (word, tag)
        return [unit for word, _ in example for unit in split_words(word)[0]]
    return split_words(example.text)[0]


def unknown_rate(tokenizer, units: Iterable[str]) -> float:
    """Share of `units` (with repetition) that `tokenizer` maps to its unknown token or to
    nothing; 0.0 for no units. Each distinct unit is tokenized once, on its own."""
    counts = Counter(units)
    total = sum(counts.values())
    if not total:
        return 0.0
    distinct = list(counts)
    pieces = tokenizer(distinct, add_special_tokens=False)["input_ids"]
    unknown_id = getattr(tokenizer, "unk_token_id", None)
    unknown = sum(
        counts[unit]
        for unit, ids in zip(distinct, pieces, strict=True)
        if not ids or (unknown_id is not None and unknown_id in ids)
    )
    return unknown / total


def check_vocabulary(tokenizer, examples: Sequence, model: str, max_unknown_rate: float) -> float:
    """The unknown share of `examples`; raises `VocabularyError` when it exceeds the limit."""
    share = unknown_rate(
        tokenizer, (unit for example in examples for unit in example_units(example))
    )
    log.info("model %s: %.2f%% of the units are unknown to its tokenizer", model, 100 * share)
    if share > max_unknown_rate:
        raise VocabularyError(model, share, max_unknown_rate)
    return share
