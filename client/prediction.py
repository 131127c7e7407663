"""Scoring an adapter on a hospital's examples: mean loss, true and predicted label ids, and
the task's metrics. The frozen prefix is cached for validation notes as it is for training
(client/prefix_cache.py), since a run scores the same notes every round."""

from __future__ import annotations

import numpy as np
import torch

from fedward.client.device import pick_device
from fedward.client.prefix_cache import CacheOptions, cached_training
from fedward.common.data import EncodedDataset, pad_batch
from fedward.common.model import set_adapter_arrays
from fedward.common.tasks import Task

#: Examples per forward pass when predicting.
PREDICT_BATCH = 64


def evaluate(
    model: torch.nn.Module,
    dataset: EncodedDataset,
    task: Task,
    arrays: dict[str, np.ndarray],
    pad_id: int,
    labels: list[str],
    device: str = "auto",
) -> dict[str, float]:
    """Loss and task metrics of the adapter `arrays` on `dataset` (no prefix cache).

    Args:
        model: The PEFT model; its adapter is overwritten with `arrays`.
        dataset: The encoded examples to score.
        task: The run's task (`spec.task.definition`): its metrics.
        arrays: The adapter to score (name -> array).
        pad_id: The tokenizer's padding id.
        labels: The run's label set, in order (an id is a position in it).
        device: The local setting `device` ("auto", "cuda" or "cpu").

    Returns:
        "loss" (as `predict` gives it), "num_examples" (the encoded examples, as a float)
        and the task's exact metrics.
    """
    loss, true_ids, pred_ids = predict(model, dataset, arrays, pad_id, device)
    metrics = {"loss": loss, "num_examples": float(len(true_ids))}
    metrics.update(task.metrics(true_ids, pred_ids, labels))
    return metrics


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    dataset: EncodedDataset,
    arrays: dict[str, np.ndarray],
    pad_id: int,
    device: str = "auto",
    cache: CacheOptions | None = None,
    who: str | None = None,
) -> tuple[float, list, list]:
    """Mean loss, true label ids and predicted label ids of the adapter `arrays` on `dataset`.

    Nothing of the training settings enters: the loss is the task's plain loss whatever
    weights training used. With `cache` and `who` (the hospital's name) the frozen prefix runs
    once per run on these examples too (`client/prefix_cache.py`, kept as "<who>:validation"):
    a run evaluates the same validation notes every round, and the encoder's forward pass was
    most of a round's evaluation.

    Args:
        model: The PEFT model; its adapter is overwritten with `arrays`, and it is left on
            the local device in eval mode.
        dataset: The encoded examples to score, in batches of `PREDICT_BATCH`.
        arrays: The adapter to score (name -> array).
        pad_id: The tokenizer's padding id.
        device: The local setting `device` ("auto", "cuda" or "cpu").
        cache: The run's prefix-cache options (`CacheOptions.of`); None runs the whole model.
        who: The hospital's name, keying the prefix cache; None runs the whole model.

    Returns:
        `(loss, true_ids, pred_ids)`: the mean loss per labelled position (per note for
        classification, per tagged word piece for NER), 0.0 for none; and, per example in
        order, the label id (classification) or the list of per-token ids (NER, padded to
        its batch's width; -100 in `true_ids` marks a position without a label).
    """
    torch_device = pick_device(device)
    set_adapter_arrays(model, arrays)
    model.to(torch_device).eval()
    cached = None
    if cache is not None and who is not None:
        cached = cached_training(model, dataset, cache, pad_id, f"{who}:validation", torch_device)
    total_loss, total = 0.0, 0
    true_ids: list = []
    pred_ids: list = []
    for start in range(0, len(dataset), PREDICT_BATCH):
        indices = list(range(start, min(start + PREDICT_BATCH, len(dataset))))
        if cached is not None:
            hidden, attention_mask, label_ids = cached.batch(indices)
            module, inputs = cached.top, {"hidden_states": hidden.to(torch_device)}
        else:
            input_ids, attention_mask, label_ids = pad_batch([dataset[i] for i in indices], pad_id)
            module, inputs = model, {"input_ids": input_ids.to(torch_device)}
        output = module(
            **inputs,
            attention_mask=attention_mask.to(torch_device),
            labels=label_ids.to(torch_device),
        )
        # The batch's loss is a mean over its labelled positions: the notes (classification),
        # or the tagged word pieces (NER); weighted by their count, the total is the mean over
        # every labelled position of the data set, whatever the batches.
        labelled = int((label_ids != -100).sum())
        if labelled:
            total_loss += float(output.loss) * labelled
            total += labelled
        predictions = output.logits.float().argmax(dim=-1).cpu()
        true_ids.extend(label_ids.tolist())
        pred_ids.extend(predictions.tolist())
    return total_loss / max(total, 1), true_ids, pred_ids
