"""Tests for the frozen-prefix cache (client/prefix_cache.py) through `train_locally`."""

from __future__ import annotations

import pytest
import torch
from tiny_training import LABELS
from tiny_training import config as _config
from tiny_training import data as _data
from tiny_training import relative_difference as _relative_difference
from tiny_training import tokenizer as _tokenizer
from tiny_training import train as _train

from fedward.client import prefix_cache
from fedward.common.data import pad_batch
from fedward.common.model import build_model, get_adapter_arrays, split_frozen_prefix

pytestmark = pytest.mark.usefixtures("fresh_prefix_caches")


@pytest.mark.parametrize(
    "task, padding, variant",
    [
        ("classification", "dynamic", "lora"),
        ("classification", "max_length", "lora"),
        ("ner", "dynamic", "lora"),
        ("classification", "dynamic", "head"),
        ("ner", "dynamic", "head"),
    ],
)
def test_cached_training_gives_the_same_update_as_uncached(
    four_layer_model_dir, monkeypatch, task, padding, variant
):
    """DP off, same seed: the cache changes where the states come from, not the update.

    With float32 storage the two paths do the same arithmetic on the real tokens (padding keys
    are masked to exactly zero weight), so they agree to float32 round-off (matrix products of
    other shapes round differently; AdamW's division by the root of tiny second moments
    magnifies that to about 1e-6 of the update, hence 1e-4). The default 16-bit
    storage rounds the states by at most 2**-11 of their size; over 10 AdamW steps that moves the
    update by well under 1% (measured: about 1e-3), far below DP noise.
    """
    config = _config(four_layer_model_dir, task=task, padding=padding, lora_variant=variant)
    tokenizer = _tokenizer(four_layer_model_dir)
    dataset = _data(config, tokenizer)
    model, start, uncached = _train(config.updated(**{"prefix_cache": False}), dataset, tokenizer)
    assert prefix_cache.build_count == 0 or prefix_cache.cache_usage()["caches"] == 0

    builds = prefix_cache.build_count
    _, _, cached16 = _train(config, dataset, tokenizer, model=model, start=start)
    assert prefix_cache.build_count == builds + 1
    assert _relative_difference(cached16.delta, uncached.delta) < 1e-2
    assert abs(cached16.train_loss - uncached.train_loss) < 1e-2 * abs(uncached.train_loss)

    prefix_cache.drop_prefix_caches()
    monkeypatch.setattr(prefix_cache, "storage_dtype", lambda device: torch.float32)
    _, _, cached32 = _train(config, dataset, tokenizer, model=model, start=start)
    assert _relative_difference(cached32.delta, uncached.delta) < 1e-4
    assert cached32.train_loss == pytest.approx(uncached.train_loss, rel=1e-5)


def test_16_bit_storage_moves_loss_and_gradients_little(four_layer_model_dir):
    """Why float16 on CPU: on the tiny model (and on all-MiniLM-L6-v2, see
    bench/results/train_throughput.md) float16 states move the gradient by about 1e-4 of its
    norm, bfloat16 by about 1e-3; both far below DP noise, float16 the closer."""
    config = _config(four_layer_model_dir)
    tokenizer = _tokenizer(four_layer_model_dir)
    dataset = _data(config, tokenizer)
    model = build_model(config.spec, len(LABELS)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)  # a trained-looking adapter, not B = 0
    prefix, top = split_frozen_prefix(model)
    batch = [(dataset.input_ids[i], dataset.labels[i]) for i in range(len(dataset))]
    _, attention_mask, labels = pad_batch(batch, tokenizer.pad_token_id)
    input_ids = pad_batch(batch, tokenizer.pad_token_id)[0]
    with torch.no_grad():
        states = prefix(input_ids, attention_mask)
    trainable = [p for p in top.parameters() if p.requires_grad]

    def loss_and_gradient(hidden):
        for parameter in trainable:
            parameter.grad = None
        loss = top(hidden_states=hidden, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        return float(loss), torch.cat([p.grad.flatten() for p in trainable])

    exact_loss, exact = loss_and_gradient(states)
    errors = {}
    for dtype in (torch.float16, torch.bfloat16):
        loss, gradient = loss_and_gradient(states.to(dtype).float())
        errors[dtype] = float((gradient - exact).norm() / exact.norm())
        assert abs(loss - exact_loss) < 1e-3 * abs(exact_loss)
    assert errors[torch.float16] < 1e-3
    assert errors[torch.float16] < errors[torch.bfloat16]
    assert prefix_cache.storage_dtype(torch.device("cpu")) == torch.float16


def test_dp_clips_per_sample_gradients_of_exactly_the_trainable_parameters(
    four_layer_model_dir, monkeypatch
):
    """Under DP the cached path's per-sample gradients cover every trainable tensor (LoRA in the
    top layers and the head) with one row per sampled example, none of the frozen ones, and
    clipping bounds each example's whole gradient: as the uncached path does."""
    from opacus.optimizers.optimizer import DPOptimizer

    config = _config(four_layer_model_dir, dp=True, local_epochs=1)
    tokenizer = _tokenizer(four_layer_model_dir)
    dataset = _data(config, tokenizer)
    seen: list[dict] = []
    original = DPOptimizer.clip_and_accumulate

    def recording(self):
        per_sample = {id(p): p.grad_sample.clone() for p in self.params}
        original(self)
        seen.append(
            {
                "per_sample": per_sample,
                "summed": {id(p): p.summed_grad.clone() for p in self.params},
                "max_grad_norm": self.max_grad_norm,
            }
        )

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", recording)

    for use_cache in (False, True):
        seen.clear()
        builds = prefix_cache.build_count
        model, _, result = _train(config.updated(**{"prefix_cache": use_cache}), dataset, tokenizer)
        assert prefix_cache.build_count == builds + int(use_cache)
        assert result.epsilon_spent is not None
        trainable = {id(p): p for p in model.parameters() if p.requires_grad}
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert seen, "no DP step was taken"
        for step in seen:
            assert set(step["per_sample"]) == set(trainable)
            rows = {g.shape[0] for g in step["per_sample"].values()}
            assert len(rows) == 1  # one row per example of the Poisson batch, for every tensor
            for key, gradient in step["per_sample"].items():
                assert gradient.shape[1:] == trainable[key].shape
            norms = torch.stack(
                [g.flatten(1).norm(dim=1) for g in step["per_sample"].values()], dim=1
            ).norm(dim=1)
            factor = (step["max_grad_norm"] / (norms + 1e-6)).clamp(max=1.0)
            for key, gradient in step["per_sample"].items():
                expected = torch.einsum("i,i...->...", factor, gradient)
                torch.testing.assert_close(step["summed"][key], expected, rtol=1e-4, atol=1e-6)
        assert all(getattr(p, "grad_sample", None) is None for p in frozen)


@pytest.mark.parametrize("variant, cached_layers", [("lora", 2), ("ffa", 2), ("head", 4)])
def test_the_cache_ends_below_the_lowest_layer_that_trains(
    four_layer_model_dir, variant, cached_layers
):
    """LoRA in the top 2 of 4 layers: the bottom 2 are cached (FFA-LoRA's frozen A factors
    do not move the split, its B factors train there); head-only: all 4 layers are."""
    config = _config(four_layer_model_dir, lora_variant=variant)
    prefix, top = split_frozen_prefix(build_model(config.spec, len(LABELS)))
    assert len(prefix.encoder.encoder.layer) == cached_layers
    assert len(top.task_model.encoder.encoder.layer) == 4 - cached_layers
    assert all(not p.requires_grad for p in prefix.parameters())


@pytest.mark.parametrize("lora_layers", [0, 4])
def test_cache_is_off_when_lora_reaches_the_bottom_layer(four_layer_model_dir, lora_layers):
    config = _config(four_layer_model_dir, lora_layers=lora_layers, local_epochs=1)
    tokenizer = _tokenizer(four_layer_model_dir)
    model = build_model(config.spec, len(LABELS))
    assert split_frozen_prefix(model) is None
    _train(config, _data(config, tokenizer), tokenizer, model=model)
    assert prefix_cache.build_count == 0 or prefix_cache.cache_usage()["caches"] == 0


def test_cache_is_off_by_local_setting(four_layer_model_dir):
    config = _config(four_layer_model_dir, prefix_cache=False, local_epochs=1)
    tokenizer = _tokenizer(four_layer_model_dir)
    builds = prefix_cache.build_count
    _train(config, _data(config, tokenizer), tokenizer)
    assert prefix_cache.build_count == builds
    assert "prefix_cache" not in config.spec.model_dump()  # hospitals do not agree on it


def test_cache_is_built_once_per_hospital_and_run(four_layer_model_dir):
    """Rounds 2 and 3 reuse round 1's cache; a second hospital gets its own; a new run (a
    different run spec) starts afresh."""
    config = _config(four_layer_model_dir, local_epochs=1)
    tokenizer = _tokenizer(four_layer_model_dir)
    data_a = _data(config, tokenizer, seed=1)
    data_b = _data(config, tokenizer, seed=2)
    model = build_model(config.spec, len(LABELS))
    builds = prefix_cache.build_count
    start = get_adapter_arrays(model)
    for _ in range(config.spec.federation.rounds):
        _, _, result_a = _train(config, data_a, tokenizer, "hospital-a", model, start)
        _train(config, data_b, tokenizer, "hospital-b", model, start)
        start = {name: start[name] + result_a.delta[name] for name in start}
    assert prefix_cache.build_count == builds + 2
    assert prefix_cache.cache_usage()["caches"] == 2

    new_run = config.updated(**{"rounds": 5})
    _train(new_run, data_a, tokenizer, "hospital-a", model)
    assert prefix_cache.build_count == builds + 3
    assert prefix_cache.cache_usage()["caches"] == 1  # hospital-b's states of the old run: gone


def test_memory_limit_spills_to_disk_and_the_files_go_at_the_end(four_layer_model_dir):
    config = _config(four_layer_model_dir, local_epochs=1)
    tokenizer = _tokenizer(four_layer_model_dir)
    dataset = _data(config, tokenizer)
    model, start, in_memory = _train(config, dataset, tokenizer, "hospital-a")
    assert prefix_cache.cache_usage()["memory_bytes"] > 0
    assert prefix_cache.spill_folder() is None

    prefix_cache.drop_prefix_caches()
    spilling = config.updated(**{"prefix_cache_mb": 0})
    _, _, on_disk = _train(spilling, dataset, tokenizer, "hospital-a", model, start)
    usage = prefix_cache.cache_usage()
    assert usage["memory_bytes"] == 0 and usage["disk_bytes"] > 0
    folder = prefix_cache.spill_folder()
    files = list(folder.iterdir())
    assert len(files) == 1 and files[0].stat().st_size == usage["disk_bytes"]
    assert _relative_difference(on_disk.delta, in_memory.delta) < 1e-5

    _train(spilling, dataset, tokenizer, "hospital-a", model, start)  # round 2: read back
    assert len(list(folder.iterdir())) == 1

    prefix_cache.drop_prefix_caches()  # the end of the run
    assert not folder.exists()
    assert prefix_cache.cache_usage() == {"caches": 0, "memory_bytes": 0, "disk_bytes": 0}


def test_states_too_large_for_16_bits_turn_the_cache_off_and_training_goes_on(
    four_layer_model_dir, monkeypatch
):
    """A model whose frozen states would overflow float16 trains uncached, not with an error."""
    from fedward.common.model import FrozenPrefix

    config = _config(four_layer_model_dir, local_epochs=1)
    tokenizer = _tokenizer(four_layer_model_dir)
    forward = FrozenPrefix.forward
    monkeypatch.setattr(FrozenPrefix, "forward", lambda self, *a: forward(self, *a) * 1e5)
    monkeypatch.setattr(prefix_cache, "_split_problem", lambda *args: None)
    builds = prefix_cache.build_count
    _, _, result = _train(config, _data(config, tokenizer), tokenizer)
    assert result.num_examples > 0
    assert prefix_cache.build_count == builds
    assert prefix_cache.cache_usage()["caches"] == 0
