"""Length-bucketed micro-batches (client/trainer.py): a batch of notes of different lengths is
split into micro-batches padded only to their own longest, and the update must be the one the
whole batch would have given, with and without DP, for both tasks and both training paths.

Under DP this is the guarantee at stake: every example's gradient must still be clipped on its
own and the batch's noise drawn once. The DP cases fix the secret randomness (Poisson sampling
and noise) so that the two runs draw the same batches and the same noise; any difference in
how examples are weighted, clipped or noised would then show in the update."""

from __future__ import annotations

import secrets

import pytest
from tiny_training import config, data, relative_difference, tokenizer, train

from fedward.client import prefix_cache, trainer

pytestmark = pytest.mark.usefixtures("fresh_prefix_caches")


def _count_forward_passes(monkeypatch) -> list[int]:
    """Micro-batch sizes, recorded as the trainer builds them."""
    sizes: list[int] = []
    original = trainer._micro_batch_indices

    def recording(indices, lengths):
        groups = original(indices, lengths)
        sizes.extend(len(group) for group in groups)
        return groups

    monkeypatch.setattr(trainer, "_micro_batch_indices", recording)
    return sizes


@pytest.mark.parametrize("task", ["classification", "ner"])
@pytest.mark.parametrize("dp", [False, True])
@pytest.mark.parametrize("use_cache", [False, True])
def test_micro_batches_give_the_update_of_the_whole_batch(
    four_layer_model_dir, monkeypatch, task, dp, use_cache
):
    # Fix the OS-drawn randomness of DP (Poisson sampling, noise) for both runs alike.
    monkeypatch.setattr(secrets, "randbits", lambda bits: 12345)
    # Split at every length change, so that the tiny batches do split.
    monkeypatch.setattr(trainer, "MICRO_BATCH_OVERHEAD_TOKENS", 0)
    settings = config(
        four_layer_model_dir, task=task, dp=dp, prefix_cache=use_cache, local_epochs=1
    )
    tok = tokenizer(four_layer_model_dir)
    dataset = data(settings, tok)

    model, start, whole = train(settings.updated(**{"length_bucketing": False}), dataset, tok)
    prefix_cache.drop_prefix_caches()
    sizes = _count_forward_passes(monkeypatch)
    _, _, bucketed = train(settings, dataset, tok, model=model, start=start)

    assert len(sizes) > 2 * len(dataset) / settings.spec.training.batch_size, "no batch was split"
    assert relative_difference(bucketed.delta, whole.delta) < 1e-4
    assert bucketed.train_loss == pytest.approx(whole.train_loss, rel=1e-4)
    assert bucketed.epsilon_spent == whole.epsilon_spent


def test_micro_batches_are_not_used_when_padding_to_max_length(four_layer_model_dir, monkeypatch):
    monkeypatch.setattr(trainer, "MICRO_BATCH_OVERHEAD_TOKENS", 0)
    settings = config(four_layer_model_dir, padding="max_length", local_epochs=1)
    tok = tokenizer(four_layer_model_dir)
    sizes = _count_forward_passes(monkeypatch)
    train(settings, data(settings, tok), tok)
    assert sizes == []
