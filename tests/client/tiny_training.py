"""A tiny model's local training, for the tests that compare two ways of training it
(the frozen-prefix cache, length-bucketed micro-batches): settings, notes of varying length and
one call of `train_locally`. The 4-layer model itself is the `four_layer_model_dir` fixture."""

from __future__ import annotations

import random

import numpy as np

from fedward.client.trainer import train_locally
from fedward.common.config import RunConfig
from fedward.common.data import EncodedDataset, Record, encode_classification
from fedward.common.model import build_model, get_adapter_arrays
from fedward.common.tasks.ner import encode_sentences

LABELS = ["migraine", "pneumonia"]
TAGS = ["O", "B-Disease", "I-Disease"]
WORDS = {
    "pneumonia": ["cough", "fever", "sputum", "crackles", "consolidation", "chest"],
    "migraine": ["headache", "aura", "photophobia", "throbbing", "nausea", "left"],
}


def config(model_dir: str, **overrides) -> RunConfig:
    values = dict(
        model=model_dir,
        hospitals=2,
        rounds=3,
        local_epochs=2,
        batch_size=8,
        learning_rate=0.05,
        target_epsilon=50.0,
        max_length=24,
        lora_layers=2,
        lora_variant="lora",  # the trainer's harder path: per-sample gradients inside layers
        dp=False,
        device="cpu",
    )
    if overrides.get("task") == "ner":
        values["labels"] = TAGS  # as a simulation fills them in from the data
    return RunConfig(**{**values, **overrides})


def data(config: RunConfig, tokenizer, count: int = 40, seed: int = 0) -> EncodedDataset:
    """Notes (or tagged sentences) of varying length, so that batches need padding."""
    rng = random.Random(seed)
    if config.spec.task.name == "ner":
        sentences = []
        for _ in range(count):
            words = [(rng.choice(WORDS["migraine"]), "O") for _ in range(rng.randint(2, 9))]
            words.insert(rng.randrange(len(words)), ("pneumonia", "B-Disease"))
            sentences.append(words)
        tag_to_id = {tag: i for i, tag in enumerate(TAGS)}
        encoded = encode_sentences(tokenizer, sentences, tag_to_id, config.spec.task.max_length)
        return EncodedDataset([e["input_ids"] for e in encoded], [e["labels"] for e in encoded])
    records = []
    for i in range(count):
        label = LABELS[i % 2]
        words = [rng.choice(WORDS[label]) for _ in range(rng.randint(2, 12))]
        records.append(Record(" ".join(words), label))
    label_to_id = {label: i for i, label in enumerate(LABELS)}
    return encode_classification(tokenizer, records, label_to_id, config.spec.task.max_length)


def tokenizer(model_dir: str):
    from fedward.common.model import load_tokenizer

    return load_tokenizer(model_dir)


def num_labels(config: RunConfig) -> int:
    return len(TAGS) if config.spec.task.name == "ner" else len(LABELS)


def train(config, dataset, tokenizer, who="hospital-a", model=None, start=None, history=()):
    model = model if model is not None else build_model(config.spec, num_labels(config))
    start = start if start is not None else get_adapter_arrays(model)
    result = train_locally(
        model, dataset, config, start, list(history), tokenizer.pad_token_id, who=who
    )
    return model, start, result


def relative_difference(a: dict, b: dict) -> float:
    flat_a = np.concatenate([a[name].ravel() for name in sorted(a)])
    flat_b = np.concatenate([b[name].ravel() for name in sorted(b)])
    return float(np.linalg.norm(flat_a - flat_b) / np.linalg.norm(flat_b))
