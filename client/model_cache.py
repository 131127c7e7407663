"""One model and tokenizer per simulation worker process, reused for every hospital and round.

Only the adapter tensors differ between hospitals and rounds, and `train_locally` loads them
before every use, so a worker serving many virtual hospitals holds one base model, not one each.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import numpy as np
import torch

from fedward.common.config import LocalRun
from fedward.common.model import build_model, get_adapter_arrays, load_tokenizer
from fedward.common.warm_start import adapter_content_hash

log = logging.getLogger(__name__)

_MAX_MODELS = 2  # distinct (model, task, LoRA) setups kept per process
_models: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
_initial: dict[tuple, dict[str, np.ndarray]] = {}  # each model's trainable tensors as built
_tokenizers: dict[str, object] = {}
_lock = threading.Lock()
#: How many times this process built a model: tests count loads, not time.
load_count = 0


def model_key(config: LocalRun, num_labels: int) -> tuple:
    """Everything that changes the model's architecture or its initial (frozen) weights: every
    `ModelSpec` field, the task and its labels (the head, and the rows a starting adapter
    fills), the seed (the initial adapter) and the starting adapter's content (other files
    under the same path are another model)."""
    model = config.spec.model.model_dump_json()
    start = config.spec.model.init_adapter
    content = adapter_content_hash(start) if start else None
    labels = tuple(config.spec.task.labels or ()) if start else ()
    return (config.spec.task.name, num_labels, config.spec.training.seed, model, content, labels)


def cached_model(config: LocalRun, num_labels: int) -> torch.nn.Module:
    """The process's model for this setup, built on first use."""
    global load_count
    key = model_key(config, num_labels)
    with _lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        model = build_model(config.spec, num_labels)
        _initial[key] = get_adapter_arrays(model)
        load_count += 1
        log.info(
            "built model %s for task %s (load %d in this process)",
            config.spec.model.name,
            config.spec.task.name,
            load_count,
        )
        _models[key] = model
        while len(_models) > _MAX_MODELS:
            _initial.pop(_models.popitem(last=False)[0], None)
        return model


def initial_arrays(config: LocalRun, num_labels: int) -> dict[str, np.ndarray]:
    """The trainable tensors of this setup's model as built, before any round trained it: what
    a run's first global adapter must be when it starts from an adapter (`init_adapter`)."""
    cached_model(config, num_labels)
    with _lock:
        return _initial[model_key(config, num_labels)]


def cached_tokenizer(model_name: str):
    """The process's tokenizer for `model_name`."""
    with _lock:
        if model_name not in _tokenizers:
            _tokenizers[model_name] = load_tokenizer(model_name)
        return _tokenizers[model_name]
