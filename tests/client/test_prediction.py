"""The validation loss means what the field means: the mean over every labelled position (each
note; each tagged word piece in NER), whatever the batches. Before, each batch's mean was
weighted by its number of sentences, so an NER figure depended on how sentences of different
lengths fell into batches.
"""

from __future__ import annotations

import pytest
from tiny_training import config, data, num_labels, tokenizer

from fedward.client import prediction
from fedward.common.model import build_model, get_adapter_arrays


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_the_loss_is_the_same_whatever_the_batch_size(tiny_model_dir, monkeypatch, task):
    settings = config(tiny_model_dir, task=task, prefix_cache=False)
    tok = tokenizer(tiny_model_dir)
    dataset = data(settings, tok, count=24)
    model = build_model(settings.spec, num_labels(settings))
    arrays = get_adapter_arrays(model)
    whole, true_ids, _ = prediction.predict(model, dataset, arrays, tok.pad_token_id, "cpu")
    monkeypatch.setattr(prediction, "PREDICT_BATCH", 1)
    one_by_one, _, _ = prediction.predict(model, dataset, arrays, tok.pad_token_id, "cpu")
    assert one_by_one == pytest.approx(whole, rel=1e-5)
    if task == "ner":  # sentences of different lengths: the test can tell the two means apart
        assert len({sum(t != -100 for t in row) for row in true_ids}) > 1
