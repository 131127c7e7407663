"""Canaries: records put into one hospital's training data at random, to be found again.

Each canary is a string of words drawn at random from the tokenizer's vocabulary with a label
drawn at random from the run's labels. Nothing in the text predicts the label, and the text is
far from every real note, so the only way a model can give a canary's label a high probability
is to have trained on that canary: what it learnt from the real notes and from the other
canaries tells it nothing about this one. That makes them memorised quickly (a few epochs of a
linear head on a frozen encoder already separate them without DP) while their inclusion stays
the only thing that differs between the two worlds the bound compares.

Each canary is included independently with probability 1/2 (the design the one-run bound
needs), from an operating-system seed unless a test passes one: the trainer never sees which
canaries were left out, and the audit keeps the draw to itself until the guesses are made.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass

from fedward.common.data import Record

#: Words in one canary: enough that two canaries share almost no word, short enough to be cheap.
CANARY_WORDS = 12


@dataclass(frozen=True)
class Canaries:
    """The canaries of one audit and, secretly, which of them were put into the training data."""

    records: tuple[Record, ...]
    included: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.records)

    def inserted(self) -> list[Record]:
        """The canaries that go into the hospital's training data."""
        return [record for record, inside in zip(self.records, self.included) if inside]


def canary_vocabulary(tokenizer) -> list[str]:
    """Whole alphabetic words of the tokenizer's vocabulary (no word pieces, no special
    tokens), so that a canary reads as text and passes the hospital's vocabulary guard."""
    words = [
        token
        for token in tokenizer.get_vocab()
        if token.isascii() and token.isalpha() and len(token) >= 4
    ]
    return sorted(words)


def draw_canaries(
    tokenizer, labels: list[str], count: int, seed: int | None = None, words: int = CANARY_WORDS
) -> Canaries:
    """`count` canaries with random text and random labels, each included w.p. 1/2, each the one
    note of a patient of its own.

    Args:
        tokenizer: The run's tokenizer, whose vocabulary the words come from.
        labels: The run's labels; each canary gets one uniformly at random.
        count: m, the number of canaries.
        seed: None (the default) draws from the operating system; tests pass one.
        words: Words per canary.

    Returns:
        The canaries and their inclusion bits.
    """
    if count < 1:
        raise ValueError(f"need at least one canary, got {count}")
    if len(labels) < 2:
        raise ValueError("canaries need at least two labels to draw from")
    rng = random.Random(secrets.randbits(64) if seed is None else seed)
    vocabulary = canary_vocabulary(tokenizer)
    # Each canary is a patient of its own, with one note: under patient-level DP the audit then
    # measures the unit the run protects, and a canary shares no patient with the real notes.
    records = tuple(
        Record(
            " ".join(rng.choices(vocabulary, k=words)), rng.choice(labels), patient=f"canary-{i}"
        )
        for i in range(count)
    )
    included = tuple(rng.random() < 0.5 for _ in range(count))
    return Canaries(records, included)
