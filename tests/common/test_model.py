"""Tests for model construction and the adapter <-> arrays contract (common/model.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedward.common.config import RunConfig
from fedward.common.errors import ModelError
from fedward.common.model import (
    ADAPTER_META,
    adapter_spec,
    build_base,
    build_model,
    get_adapter_arrays,
    load_adapter_for_inference,
    load_tokenizer,
    save_adapter,
    set_adapter_arrays,
    trainable_fraction,
)
from fedward.common.tasks import CLASSIFICATION

LABELS = ["cold", "flu", "measles"]


@pytest.fixture(scope="module")
def config(tiny_model_dir) -> RunConfig:
    return RunConfig(model=tiny_model_dir, hospitals=2)


def _perturbed(arrays: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (value + rng.normal(0, 0.1, value.shape)).astype(np.float32)
        for name, value in arrays.items()
    }


def _logits(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    model.eval()
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**encoded).logits


def test_only_lora_factors_and_the_head_travel(config):
    model = build_model(config.spec, len(LABELS))
    names = [item.name for item in adapter_spec(model)]
    assert names and all(".lora_A." in n or ".lora_B." in n or "classifier" in n for n in names)
    assert any("classifier" in n for n in names)
    assert all(item.dtype == "float32" for item in adapter_spec(model))
    assert 0 < trainable_fraction(model) < 0.5


def test_same_seed_same_initial_adapter_other_seed_differs(config):
    first = get_adapter_arrays(build_model(config.spec, len(LABELS)))
    second = get_adapter_arrays(build_model(config.spec, len(LABELS)))
    other = get_adapter_arrays(build_model(config.updated(**{"seed": 1}).spec, len(LABELS)))
    assert all(np.array_equal(first[n], second[n]) for n in first)
    assert any(not np.array_equal(first[n], other[n]) for n in first)


def test_lora_layers_adapts_only_the_top_layers(tiny_model_dir):
    config = RunConfig(model=tiny_model_dir, hospitals=2, lora_variant="lora", lora_layers=1)
    model = build_model(config.spec, 2)
    lora_names = [item.name for item in adapter_spec(model) if "lora_" in item.name]
    assert lora_names and all(".layer.1." in n for n in lora_names)


def test_ffa_variant_freezes_a_and_sends_only_b(tiny_model_dir):
    model = build_model(RunConfig(model=tiny_model_dir, hospitals=2, lora_variant="ffa").spec, 2)
    names = [item.name for item in adapter_spec(model)]
    assert any(".lora_B." in n for n in names)
    assert not any(".lora_A." in n for n in names)


def test_head_variant_trains_and_sends_only_the_task_head(tiny_model_dir):
    """Head-only: no LoRA factor travels (a peer or the coordinator sees the head alone), and
    the untrained LoRA factors (B = 0) leave the base model's output as it was."""
    config = RunConfig(model=tiny_model_dir, hospitals=2, lora_variant="head")
    model = build_model(config.spec, 2)
    names = [item.name for item in adapter_spec(model)]
    assert names and all("modules_to_save" in n for n in names)
    assert not any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    lora = build_model(config.updated(**{"lora_variant": "lora"}).spec, 2).eval()
    ids = torch.tensor([[101, 2000, 2001, 102]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, lora(input_ids=ids).logits)


def test_arrays_round_trip_into_a_fresh_model(config):
    source = build_model(config.spec, len(LABELS))
    arrays = _perturbed(get_adapter_arrays(source))
    set_adapter_arrays(source, arrays)
    sent = get_adapter_arrays(source)

    fresh = build_model(config.spec, len(LABELS))
    set_adapter_arrays(fresh, sent)
    received = get_adapter_arrays(fresh)
    assert list(received) == list(sent)
    for name in sent:
        assert received[name].dtype == np.float32
        np.testing.assert_array_equal(received[name], arrays[name])


def test_get_adapter_arrays_returns_copies(config):
    model = build_model(config.spec, len(LABELS))
    arrays = get_adapter_arrays(model)
    name = next(iter(arrays))
    arrays[name][...] = 123.0
    assert not np.any(get_adapter_arrays(model)[name] == 123.0)


@pytest.mark.parametrize("breakage", ["shape", "missing", "extra", "dtype"])
def test_mismatched_arrays_raise_model_error_and_leave_the_model_alone(config, breakage):
    model = build_model(config.spec, len(LABELS))
    before = get_adapter_arrays(model)
    arrays = _perturbed(before)
    name = next(iter(arrays))
    if breakage == "shape":
        arrays[name] = np.zeros((3, 3), dtype=np.float32)
    elif breakage == "missing":
        del arrays[name]
    elif breakage == "extra":
        arrays["base_model.model.bert.pooler.dense.weight"] = np.zeros((32, 32), dtype=np.float32)
    else:
        arrays[name] = arrays[name].astype(np.float64)
    with pytest.raises(ModelError) as caught:
        set_adapter_arrays(model, arrays)
    message = str(caught.value)
    if breakage in ("shape", "dtype"):
        assert name in message
    after = get_adapter_arrays(model)
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_a_wrong_label_count_is_a_model_error(config):
    arrays = get_adapter_arrays(build_model(config.spec, 2))
    with pytest.raises(ModelError, match="shape"):
        set_adapter_arrays(build_model(config.spec, 3), arrays)


def test_saved_adapter_loads_with_peft_and_gives_the_same_logits(config, tmp_path):
    from peft import PeftModel

    tokenizer = load_tokenizer(config.spec.model.name)
    model = build_model(config.spec, len(LABELS))
    set_adapter_arrays(model, _perturbed(get_adapter_arrays(model), seed=3))
    texts = ["fever and cough for three days", "itchy red spots"]
    expected = _logits(model, tokenizer, texts)

    folder = save_adapter(model, tmp_path / "adapter", LABELS, config.spec.task, config.spec.model)
    meta = json.loads((folder / ADAPTER_META).read_text(encoding="utf-8"))
    assert meta["labels"] == LABELS and meta["task"] == "classification"

    torch.manual_seed(999)  # a different random head init must not matter: the head is saved
    base = build_base(CLASSIFICATION, config.spec.model.name, len(LABELS))
    loaded = PeftModel.from_pretrained(base, str(folder))
    torch.testing.assert_close(_logits(loaded, tokenizer, texts), expected)

    again, _, meta_again = load_adapter_for_inference(folder)
    assert meta_again == meta
    torch.testing.assert_close(_logits(again, tokenizer, texts), expected)


def test_a_failing_save_leaves_the_previous_adapter_intact(config, tmp_path, monkeypatch):
    model = build_model(config.spec, len(LABELS))
    target = save_adapter(model, tmp_path / "adapter", LABELS, config.spec.task, config.spec.model)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    set_adapter_arrays(model, _perturbed(get_adapter_arrays(model)))

    def half_written_then_crash(folder, *args, **kwargs):
        (folder / "adapter_model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", half_written_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, target, LABELS, config.spec.task, config.spec.model)
    after = {p.name: p.read_bytes() for p in target.iterdir()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging folder left


def test_unknown_model_folder_is_a_model_error_naming_the_field(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="field 'model'") as caught:
        load_tokenizer(str(missing))
    assert str(missing) in str(caught.value)
    with pytest.raises(ModelError, match="field 'model'"):
        build_model(RunConfig(model=str(missing), hospitals=2).spec, 2)
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ModelError, match="field 'model'"):
        build_model(RunConfig(model=str(empty), hospitals=2).spec, 2)


def test_too_many_lora_layers_is_a_model_error(tiny_model_dir):
    with pytest.raises(ModelError, match="field 'lora_layers': 5 is more than the 2 layers"):
        build_model(RunConfig(model=tiny_model_dir, hospitals=2, lora_layers=5).spec, 2)


def test_target_modules_that_match_nothing_are_a_model_error(tiny_model_dir):
    config = RunConfig(model=tiny_model_dir, hospitals=2, lora_target_modules=["q_proj"])
    with pytest.raises(ModelError, match="field 'lora_target_modules'"):
        build_model(config.spec, 2)


def test_loading_a_folder_that_is_not_an_adapter(tmp_path):
    with pytest.raises(ModelError, match="not a fedward adapter folder"):
        load_adapter_for_inference(tmp_path)


def test_classification_logits_do_not_depend_on_the_padding_of_the_batch(config):
    tokenizer = load_tokenizer(config.spec.model.name)
    model = build_model(config.spec, len(LABELS)).eval()
    short, long = "fever", "fever and cough for three days with chest pain and fatigue"
    alone = _logits(model, tokenizer, [short])
    padded = _logits(model, tokenizer, [short, long])
    torch.testing.assert_close(padded[:1], alone)
