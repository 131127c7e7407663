"""Frozen-prefix cache: the frozen bottom of the model runs once per hospital and run.

LoRA sits only in the top `lora_layers` layers by default (and nowhere that trains with
`lora_variant = "head"`), so the hidden states after the last frozen layer are a fixed function
of a hospital's token ids for the whole run. They are computed
once (in the process that serves the hospital, without dropout), stored per example without
padding, and every epoch of every round trains only the top of the network on them.

Privacy is untouched: Opacus wraps the top, whose trainable parameters are exactly the model's
(checked by `split_frozen_prefix`), and the loader still draws Poisson batches of example
indices; a batch gathers its examples' rows and pads them to its longest (or to `max_length`).
The states stay inside the hospital's process like its token ids: in memory up to the local
setting `prefix_cache_mb`, past it in a private temporary folder, removed when the run ends
(a new run arrives, `drop_prefix_caches()`, or the process exits; folders left by a killed
process are removed by the next one that spills).

Storage is 16-bit: float16 on CPU (the top trains in float32 there; float16 keeps 11 bits of
mantissa and these encoders' states stay far below its range, checked on every build), bfloat16
on CUDA (where training runs under bf16 autocast anyway). bench/results/train_throughput.md
records the effect on loss and gradients.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedward.common.config import LocalRun
from fedward.common.data import EncodedDataset, pad_batch
from fedward.common.model import FrozenPrefix, TrainableTop, split_frozen_prefix

log = logging.getLogger(__name__)

SPILL_PREFIX = "fedward-prefix-"
BUILD_BATCH = 64
#: How many caches this process built: tests count builds, not time.
build_count = 0

_lock = threading.Lock()
_run: str | None = None  # digest of the run the caches belong to
_caches: dict[str, PrefixStates] = {}  # hospital -> its cached states in this run
_spill_dir: Path | None = None


def storage_dtype(device: torch.device) -> torch.dtype:
    """16-bit storage: bfloat16 where training runs under bf16 autocast (CUDA), else float16."""
    return torch.bfloat16 if device.type == "cuda" else torch.float16


@dataclass(frozen=True)
class CacheOptions:
    """What the cache reads of a run: this machine's switch and memory limit (local settings
    `prefix_cache`, `prefix_cache_mb`), the run (its spec's digest: a new run drops every
    cache) and the width a batch is padded to (None: each batch's longest)."""

    enabled: bool
    memory_mb: float
    run: str
    pad_to: int | None

    @classmethod
    def of(cls, config: LocalRun) -> CacheOptions:
        """The options of `config` as this machine runs it."""
        spec, local = config.spec, config.local
        pad_to = spec.task.max_length if spec.training.padding == "max_length" else None
        return cls(local.prefix_cache, local.prefix_cache_mb, config.digest(), pad_to)


@dataclass
class PrefixStates:
    """One hospital's states after the frozen prefix: rows of all examples, back to back."""

    states: torch.Tensor  # (tokens of all examples, hidden size), on CPU, in memory or a file
    offsets: np.ndarray  # example i is rows offsets[i]:offsets[i + 1]
    fingerprint: str  # of the token ids they were computed from
    model: weakref.ref  # the model whose prefix computed them
    path: Path | None  # the file backing `states` when spilled to disk
    min_top_layers: int = 0  # the split they were cut at (`split_frozen_prefix`)

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()


class CachedTraining:
    """What the trainer needs to train on a cache: the top module, and `batch`, which gathers
    examples' cached states (with attention mask and labels, as `pad_batch` makes them)."""

    def __init__(
        self, top: TrainableTop, cache: PrefixStates, dataset: EncodedDataset, pad_to: int | None
    ):
        self.top = top
        self.cache = cache
        self.labels = dataset.labels
        self.pad_to = pad_to

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        offsets = self.cache.offsets
        lengths = [int(offsets[i + 1] - offsets[i]) for i in indices]
        width = max(self.pad_to or 0, max(lengths, default=1))
        hidden = torch.zeros((len(indices), width, self.cache.states.shape[1]), dtype=torch.float32)
        for row, (index, length) in enumerate(zip(indices, lengths)):
            hidden[row, :length] = self.cache.states[offsets[index] : offsets[index] + length]
        # Labels and mask exactly as pad_batch makes them (pad id is irrelevant: no ids here).
        _, attention_mask, labels = pad_batch(
            [([0] * length, self.labels[i]) for i, length in zip(indices, lengths)], 0, width
        )
        return hidden, attention_mask, labels


def cached_training(
    model: torch.nn.Module,
    dataset: EncodedDataset,
    options: CacheOptions,
    pad_id: int,
    who: str,
    device: torch.device,
    on_progress: Callable[[str], None] | None = None,
) -> CachedTraining | None:
    """The top of `model` and `who`'s cached prefix states, built on first use in this run
    (`on_progress` is told "caching the frozen prefix" then: a pass over every example); None
    when the cache is off (`options.enabled`), LoRA reaches down to the bottom layer, or the
    model does not split exactly."""
    if not options.enabled or len(dataset) == 0:
        return None
    pad_to = options.pad_to
    fingerprint = _fingerprint(dataset)
    with _lock:
        _start_run(options.run)
        cache = _caches.get(who)
        if cache is None or cache.fingerprint != fingerprint or cache.model() is not model:
            _drop(who)
            found = _exact_split(model, dataset, pad_id, device)
            if found is None:
                return None
            min_top_layers, prefix = found
            if on_progress is not None:
                on_progress("caching the frozen prefix")
            cache = _build(prefix, dataset, options, pad_id, device, fingerprint, model)
            if cache is None:
                return None
            cache.min_top_layers = min_top_layers
            _caches[who] = cache
            log.info(
                "%s: frozen prefix cached (%d examples, %.1f MiB %s)",
                who,
                len(dataset),
                cache.nbytes / 2**20,
                "on disk" if cache.path else "in memory",
            )
    _, top = split_frozen_prefix(model, cache.min_top_layers)
    return CachedTraining(top, cache, dataset, pad_to)


def cache_usage() -> dict[str, int]:
    """Bytes this process's caches hold in memory and on disk, and how many there are."""
    with _lock:
        memory = sum(c.nbytes for c in _caches.values() if c.path is None)
        disk = sum(c.nbytes for c in _caches.values() if c.path is not None)
        return {"caches": len(_caches), "memory_bytes": memory, "disk_bytes": disk}


def spill_folder() -> Path | None:
    """This process's temporary folder for caches past the memory limit (None: none yet)."""
    return _spill_dir


def drop_prefix_caches() -> None:
    """Forget every cache of this process and delete its spill folder (end of a run)."""
    global _run, _spill_dir
    with _lock:
        for who in list(_caches):
            _drop(who)
        _run = None
        if _spill_dir is not None:
            shutil.rmtree(_spill_dir, ignore_errors=True)
            _spill_dir = None


atexit.register(drop_prefix_caches)


def _start_run(digest: str) -> None:
    """A different run spec means a new run: the previous run's caches go (lock held)."""
    global _run, _spill_dir
    if _run == digest:
        return
    for who in list(_caches):
        _drop(who)
    if _spill_dir is not None:
        shutil.rmtree(_spill_dir, ignore_errors=True)
        _spill_dir = None
    _run = digest


def _drop(who: str) -> None:
    cache = _caches.pop(who, None)
    if cache is not None and cache.path is not None:
        cache.states = torch.empty(0)  # unmap before the file goes
        cache.path.unlink(missing_ok=True)


def _fingerprint(dataset: EncodedDataset) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.array([len(ids) for ids in dataset.input_ids], dtype=np.int64).tobytes())
    for ids in dataset.input_ids:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _exact_split(model, dataset, pad_id, device) -> tuple[int, FrozenPrefix] | None:
    """Where to cut, as (`min_top_layers`, the prefix): below the lowest layer that trains, or,
    for an encoder that cannot run its top without a layer of its own (DeBERTa-v2 when only the
    head trains), one layer lower; None when neither reproduces the model."""
    for min_top_layers in (0, 1):
        halves = split_frozen_prefix(model, min_top_layers)
        if halves is None:
            break
        problem = _split_problem(model, *halves, dataset, pad_id, device)
        if problem is None:
            return min_top_layers, halves[0]
    else:
        log.warning("frozen-prefix cache off: %s", problem)
    return None


@torch.no_grad()
def _split_problem(model, prefix, top, dataset, pad_id, device) -> str | None:
    """Why the split does not reproduce the whole model on a few real examples (in float32,
    without dropout), or None when it does; an architecture where it does not (e.g. a
    normalisation after the last layer that the split misplaces) trains uncached instead."""
    batch = [(dataset.input_ids[i], dataset.labels[i]) for i in range(min(4, len(dataset)))]
    input_ids, attention_mask, labels = (t.to(device) for t in pad_batch(batch, pad_id))
    was_training = model.training
    model.eval()
    try:
        whole = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        split = top(
            hidden_states=prefix(input_ids, attention_mask),
            attention_mask=attention_mask,
            labels=labels,
        ).logits
    except Exception as exc:  # a family the split does not fit, whatever it raises
        return f"the split model does not run ({type(exc).__name__}: {exc})"
    finally:
        model.train(was_training)
    error = float((whole.float() - split.float()).abs().max())
    if error > 1e-4 * (1.0 + float(whole.float().abs().max())):
        return f"the split model is {error:.2e} off the whole"
    return None


@torch.no_grad()
def _build(prefix, dataset, options, pad_id, device, fingerprint, model) -> PrefixStates | None:
    """Run the frozen prefix over every example once (eval mode: no dropout) and keep the rows
    of its real tokens, in memory or, past the process's limit, in a file."""
    global build_count
    lengths = np.array([len(ids) for ids in dataset.input_ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    hidden_size = model.base_model.model.config.hidden_size
    dtype = storage_dtype(device)
    nbytes = int(offsets[-1]) * hidden_size * torch.empty(0, dtype=dtype).element_size()
    in_memory = sum(c.nbytes for c in _caches.values() if c.path is None)
    path = None
    if in_memory + nbytes > options.memory_mb * 2**20:
        path = _new_spill_file()
        states = torch.from_file(
            str(path), shared=True, size=int(offsets[-1]) * hidden_size, dtype=dtype
        ).view(int(offsets[-1]), hidden_size)
    else:
        states = torch.empty((int(offsets[-1]), hidden_size), dtype=dtype)

    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else nullcontext()
    )
    limit = torch.finfo(dtype).max / 8
    was_training = model.training
    model.eval()
    try:
        order = np.argsort(lengths, kind="stable")  # similar lengths together: little padding
        for start in range(0, len(order), BUILD_BATCH):
            chunk = order[start : start + BUILD_BATCH]
            input_ids, attention_mask, _ = pad_batch(
                [(dataset.input_ids[i], 0) for i in chunk], pad_id
            )
            with autocast:
                out = prefix(input_ids.to(device), attention_mask.to(device)).float()
            if float(out.abs().max()) > limit:
                log.warning("frozen-prefix cache off: states too large for %s storage", dtype)
                if path is not None:
                    del states
                    path.unlink(missing_ok=True)
                return None
            out = out.to("cpu", dtype)
            for row, index in enumerate(chunk):
                states[offsets[index] : offsets[index + 1]] = out[row, : lengths[index]]
    finally:
        model.train(was_training)
    build_count += 1
    return PrefixStates(states, offsets, fingerprint, weakref.ref(model), path)


def _new_spill_file() -> Path:
    """A new file in this process's private spill folder (created, and stale ones of processes
    that died without cleaning up removed, on first use)."""
    global _spill_dir
    if _spill_dir is None:
        _remove_stale_spill_folders()
        _spill_dir = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-"))
    handle, name = tempfile.mkstemp(dir=_spill_dir, suffix=".bin")
    os.close(handle)
    return Path(name)


def _remove_stale_spill_folders() -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{SPILL_PREFIX}*"):
        pid = folder.name[len(SPILL_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass  # alive under another user, or not ours to judge
