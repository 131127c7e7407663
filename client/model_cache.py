"""One model and tokenizer per simulation worker process, reused for every hospital and round.

Only the adapter tensors differ between hospitals and rounds, and `train_locally` loads them
before every use, so a worker serving many virtual hospitals holds one base model, not one each.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import torch

from fedward.common.config import LocalRun
from fedward.common.model import build_model, load_tokenizer

log = logging.getLogger(__name__)

_MAX_MODELS = 2  # distinct (model, task, LoRA) setups kept per process
_models: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
_tokenizers: dict[str, object] = {}
_lock = threading.Lock()
#: How many times this process built a model: tests count loads, not time.
load_count = 0


def model_key(config: LocalRun, num_labels: int) -> tuple:
    """Everything that changes the model's architecture or its initial (frozen) weights: every
    `ModelSpec` field, the task and its number of labels (the head), and the seed (the initial
    adapter)."""
    model = config.spec.model.model_dump_json()
    return (config.spec.task.name, num_labels, config.spec.training.seed, model)


def cached_model(config: LocalRun, num_labels: int) -> torch.nn.Module:
    """The process's model for this setup, built on first use."""
    global load_count
    key = model_key(config, num_labels)
    with _lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        model = build_model(config.spec, num_labels)
        load_count += 1
        log.info(
            "built model %s for task %s (load %d in this process)",
            config.spec.model.name,
            config.spec.task.name,
            load_count,
        )
        _models[key] = model
        while len(_models) > _MAX_MODELS:
            _models.popitem(last=False)
        return model


def cached_tokenizer(model_name: str):
    """The process's tokenizer for `model_name`."""
    with _lock:
        if model_name not in _tokenizers:
            _tokenizers[model_name] = load_tokenizer(model_name)
        return _tokenizers[model_name]
