"""NER's class-weighted loss (`outside_tag_weight`, client/trainer.py): the O tag's share of the
token loss scaled down. It changes what a sentence's gradient points at, never how examples are
clipped, noised or counted: the DP guarantee and the micro-batch arithmetic must hold as for the
plain loss."""

from __future__ import annotations

import secrets

import pytest
import torch
from tiny_training import TAGS, config, data, relative_difference, tokenizer, train

from fedward.client import prefix_cache, trainer
from fedward.client.trainer import predict, weighted_token_loss
from fedward.common.config import RunConfig
from fedward.common.errors import ConfigError

pytestmark = pytest.mark.usefixtures("fresh_prefix_caches")


def test_weight_one_is_the_plain_loss_and_a_smaller_weight_scales_only_o_terms():
    logits = torch.randn(2, 5, 3)
    labels = torch.tensor([[0, 1, 2, -100, 0], [0, 0, -100, -100, 1]])
    plain = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 3), labels.reshape(-1), ignore_index=-100
    )
    assert weighted_token_loss(logits, labels, 0, 1.0) == pytest.approx(float(plain))

    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 3), labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    flat = labels.reshape(-1)
    expected = (0.25 * per_token[flat == 0].sum() + per_token[flat > 0].sum()) / 7
    assert weighted_token_loss(logits, labels, 0, 0.25) == pytest.approx(float(expected))


def _o_probability(config, dataset, tok, result, start, model) -> float:
    """Mean probability the trained model gives 'O' on the words tagged O."""
    arrays = {name: start[name] + result.delta[name] for name in start}
    trainer.set_adapter_arrays(model, arrays)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, tags in zip(dataset.input_ids, dataset.labels):
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            probabilities = logits.softmax(-1)[:, TAGS.index("O")]
            mask = torch.tensor(tags) == TAGS.index("O")
            total += float(probabilities[mask].sum())
            count += int(mask.sum())
    return total / count


def test_a_smaller_o_weight_makes_the_model_less_sure_of_o(four_layer_model_dir):
    settings = config(four_layer_model_dir, task="ner", outside_tag_weight=1.0, local_epochs=1)
    tok = tokenizer(four_layer_model_dir)
    dataset = data(settings, tok)
    model, start, plain = train(settings, dataset, tok)
    weighted_settings = settings.updated(**{"outside_tag_weight": 0.05})
    _, _, weighted = train(weighted_settings, dataset, tok, model=model, start=start)

    assert relative_difference(weighted.delta, plain.delta) > 0.05
    plain_o = _o_probability(settings, dataset, tok, plain, start, model)
    weighted_o = _o_probability(settings, dataset, tok, weighted, start, model)
    assert weighted_o < plain_o - 0.01
    # the evaluation loss is the plain one whatever the training weight (`predict` takes no
    # training settings): the mean cross-entropy over the tagged word pieces, O's unscaled
    loss, _, _ = predict(model, dataset, start, tok.pad_token_id, "cpu")
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, tags in zip(dataset.input_ids, dataset.labels):
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            labels = torch.tensor(tags)
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            count += int((labels != -100).sum())
    assert loss == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize("use_cache", [False, True])
def test_under_dp_micro_batches_still_give_the_whole_batch_update(
    four_layer_model_dir, monkeypatch, use_cache
):
    # Same batches and noise in both runs; per-example clipping must see the weighted loss of
    # each whole sentence, whichever micro-batch it lands in.
    monkeypatch.setattr(secrets, "randbits", lambda bits: 12345)
    monkeypatch.setattr(trainer, "MICRO_BATCH_OVERHEAD_TOKENS", 0)
    settings = config(
        four_layer_model_dir,
        task="ner",
        dp=True,
        prefix_cache=use_cache,
        local_epochs=1,
        outside_tag_weight=0.3,
    )
    tok = tokenizer(four_layer_model_dir)
    dataset = data(settings, tok)
    model, start, whole = train(settings.updated(**{"length_bucketing": False}), dataset, tok)
    prefix_cache.drop_prefix_caches()
    _, _, bucketed = train(settings, dataset, tok, model=model, start=start)

    assert relative_difference(bucketed.delta, whole.delta) < 1e-4
    assert bucketed.epsilon_spent == whole.epsilon_spent


def test_training_without_the_o_tag_among_the_labels_is_refused(four_layer_model_dir):
    settings = config(four_layer_model_dir, task="ner", outside_tag_weight=0.3)
    tok = tokenizer(four_layer_model_dir)
    dataset = data(settings, tok)
    with pytest.raises(ConfigError, match="'O'"):
        train(settings.updated(**{"labels": None}), dataset, tok)


def test_the_weight_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match="outside_tag_weight.*NER only"):
        RunConfig.build({"task": "classification", "outside_tag_weight": 0.5})
    with pytest.raises(ConfigError, match="'O'"):
        RunConfig.build({"task": "ner", "labels": ["B-X", "I-X"], "outside_tag_weight": 0.5})
    with pytest.raises(ConfigError, match="outside_tag_weight"):
        RunConfig.build({"task": "ner", "outside_tag_weight": 0})
    spec = RunConfig.build({"task": "ner", "outside_tag_weight": 0.5}).spec
    assert spec.training.outside_tag_weight == 0.5
    assert spec.digest() != RunConfig.build({"task": "ner"}).spec.digest()
