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

from fedward.common.config import ModelSpec, TaskSpec
from fedward.common.model import build_model_from, get_adapter_arrays, load_tokenizer
from fedward.common.warm_start import adapter_content_hash

log = logging.getLogger(__name__)

_MAX_MODELS = 2  # distinct (model, task, LoRA) setups kept per process
_models: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
_initial: dict[tuple, dict[str, np.ndarray]] = {}  # each model's trainable tensors as built
_tokenizers: dict[str, object] = {}
_lock = threading.Lock()
#: How many times this process built a model: tests count loads, not time.
load_count = 0


def model_key(model: ModelSpec, task: TaskSpec, seed: int, num_labels: int) -> tuple:
    """Everything that changes the model's architecture or its initial (frozen) weights: every
    `ModelSpec` field, the task and its labels (the head, and the rows a starting adapter
    fills), the seed (the initial adapter) and the starting adapter's content (other files
    under the same path are another model)."""
    start = model.init_adapter
    content = adapter_content_hash(start) if start else None
    labels = tuple(task.labels or ()) if start else ()
    return (task.name, num_labels, seed, model.model_dump_json(), content, labels)


def cached_model(
    model: ModelSpec, task: TaskSpec, seed: int, num_labels: int | None = None
) -> torch.nn.Module:
    """The process's model for this setup (`build_model_from`), built on first use.

    Args:
        model: The run's model group (base model, LoRA).
        task: The run's task group.
        seed: The run's seed (`training.seed`).
        num_labels: Outputs of the task head; None: one per label of `task`.

    Returns:
        The process's PEFT model for these groups: shared, so load the adapter before use.
    """
    global load_count
    if num_labels is None:
        num_labels = len(task.labels or [])
    key = model_key(model, task, seed, num_labels)
    with _lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        built = build_model_from(model, task, seed, num_labels)
        _initial[key] = get_adapter_arrays(built)
        load_count += 1
        log.info(
            "built model %s for task %s (load %d in this process)",
            model.name,
            task.name,
            load_count,
        )
        _models[key] = built
        while len(_models) > _MAX_MODELS:
            _initial.pop(_models.popitem(last=False)[0], None)
        return built


def initial_arrays(model: ModelSpec, task: TaskSpec, seed: int) -> dict[str, np.ndarray]:
    """The trainable tensors of this setup's model as built (one output per label of `task`),
    before any round trained it: what a run's first global adapter must be when it starts from
    an adapter (`init_adapter`)."""
    num_labels = len(task.labels or [])
    cached_model(model, task, seed, num_labels)
    with _lock:
        return _initial[model_key(model, task, seed, num_labels)]


def cached_tokenizer(model_name: str):
    """The process's tokenizer for `model_name`."""
    with _lock:
        if model_name not in _tokenizers:
            _tokenizers[model_name] = load_tokenizer(model_name)
        return _tokenizers[model_name]
