"""Starting a run from an adapter (`init_adapter`): its content hash, the label mapping, loading.

Under DP at a few hundred to a few thousand records per hospital, the model is bounded by
examples x epsilon; the strongest lever is public data (Li et al. 2022, "Large language models
can be strong differentially private learners"; Ganesh et al. 2023, "Why is public pretraining
necessary for private model training?"): start the private training from an adapter already
trained on the task, without DP, on public records (`fedward pretrain`), or from last year's
federation.

What a hospital trusts here, and why each check exists:

- **Content, not name.** A hospital pins the adapter by `adapter_content_hash` (every file of the
  folder), as it pins the base model; a folder with other weights, another label list or other
  LoRA settings under the same path has another hash and is refused before any record is read.
  The coordinator sends the starting arrays in round 1 too; a hospital compares them with those
  it built from its own pinned copy (client/site/), so a coordinator cannot start the run from
  other weights than the ones the hospitals approved.
- **Only safetensors.** The weights are read from `adapter_model.safetensors`, never from a
  pickle (`.bin`), which could run code when loaded.
- **Labels by name, nothing hidden.** A label of the run that the adapter knows takes the
  adapter's head row; a new one keeps the fresh row every hospital builds from the seed; an
  adapter label the run does not list is dropped. The head has exactly one row per run label, so
  an adapter cannot carry rows the run does not see; an adapter whose head rows and label list
  disagree is refused. The mapping depends only on the two label lists (both public to the run).

Whatever the starting weights, DP-SGD's guarantee for the hospital's records holds: it bounds
each record's influence on the update, not what the model knew before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fedward.common.config import ModelSpec, TaskSpec
from fedward.common.errors import ModelError
from fedward.common.files.digest import content_sha256

#: File of a fedward adapter that holds its task, labels and LoRA settings.
ADAPTER_META = "fedward.json"
#: The one weight file a starting adapter is read from (PEFT's default; never a pickle).
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Suffix of the head's output layer, whose rows are the labels (BERT-family classifiers, our
#: mean-pooling head and Hugging Face's token-classification heads all call it `classifier`).
LABEL_ROWS = (".classifier.weight", ".classifier.bias")


@dataclass(frozen=True)
class LabelMapping:
    """How the run's labels meet a starting adapter's: `kept` take the adapter's head row,
    `new` start fresh, `dropped` (the adapter's, not the run's) are left out."""

    kept: tuple[str, ...]
    new: tuple[str, ...]
    dropped: tuple[str, ...]

    def as_dict(self) -> dict[str, list[str]]:
        return {"kept": list(self.kept), "new": list(self.new), "dropped": list(self.dropped)}

    def describe(self) -> str:
        """One line for a report: `kept 5 labels, 1 new (x), 0 dropped`."""

        def part(name: str, labels: tuple[str, ...]) -> str:
            shown = f" ({', '.join(labels[:6])}{', ...' if len(labels) > 6 else ''})"
            return f"{len(labels)} {name}" + (shown if labels else "")

        return (
            f"{part('kept', self.kept)}, {part('new (fresh head rows)', self.new)}, "
            f"{part('dropped', self.dropped)}"
        )


def label_mapping(adapter_labels: list[str], run_labels: list[str]) -> LabelMapping:
    """Match labels by name (exact, case-sensitive: `B-Disease` is not `B-disease`).

    Example:
        >>> label_mapping(["a", "b", "c"], ["c", "a", "z"]).as_dict()
        {'kept': ['c', 'a'], 'new': ['z'], 'dropped': ['b']}
    """
    known = set(adapter_labels)
    wanted = set(run_labels)
    return LabelMapping(
        kept=tuple(label for label in run_labels if label in known),
        new=tuple(label for label in run_labels if label not in known),
        dropped=tuple(label for label in adapter_labels if label not in wanted),
    )


def adapter_content_hash(path: str | Path) -> str:
    """SHA-256 (hex) over every file of an adapter folder: weights, PEFT's adapter_config.json
    and fedward.json (labels, task, base model), so that changing any of them changes the hash.
    Raises `ModelError` when the path is not a folder holding a fedward adapter.

    Example:
        >>> adapter_content_hash("pretrain-out/adapter")  # doctest: +SKIP
        '5d41402abc4b2a76b9719d911017c592...'
    """
    folder = Path(path)
    if not (folder / ADAPTER_META).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise ModelError(
            f"{path}: not a fedward adapter folder (needs {ADAPTER_META} and {ADAPTER_WEIGHTS}); "
            "pass the 'adapter' folder of a `fedward pretrain` or `fedward simulate` output"
        )
    return content_sha256(folder)


def read_adapter_meta(path: str | Path) -> dict:
    """An adapter folder's `fedward.json`, checked for what warm starting relies on."""
    meta_path = Path(path) / ADAPTER_META
    if not meta_path.is_file() or not (Path(path) / ADAPTER_WEIGHTS).is_file():
        raise ModelError(
            f"field 'init_adapter': {path}: not a fedward adapter folder (needs {ADAPTER_META} "
            f"and {ADAPTER_WEIGHTS}); pass the 'adapter' folder of a `fedward pretrain` output"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"field 'init_adapter': cannot read {meta_path} ({exc})") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if (
        not isinstance(labels, list)
        or not all(isinstance(label, str) for label in labels)
        or len(set(labels)) != len(labels)
    ):
        raise ModelError(
            f"field 'init_adapter': {meta_path} must list distinct label names under 'labels'"
        )
    return meta


def start_from_adapter(
    model: torch.nn.Module, model_spec: ModelSpec, task: TaskSpec, same_base: bool
) -> LabelMapping:
    """Load the starting adapter `model_spec.init_adapter` into `model` (built fresh from the
    seed by `build_model`), its head rows matched to the run's labels by name.

    Args:
        model: The fresh PEFT model of the run.
        model_spec: The run's model group: the adapter's path, the base model, LoRA's alpha.
        task: The run's task group: its name and labels.
        same_base: Whether the adapter's base model (its `fedward.json`) is the run's.

    Returns:
        The label mapping.

    Raises:
        ModelError: not a fedward adapter, another task or base model, LoRA settings that do
            not match the run's (rank, layers, modules), or head rows that disagree with its
            label list.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(str(model_spec.init_adapter))
    adapter_content_hash(folder)  # the same check: a fedward adapter folder
    meta = read_adapter_meta(folder)
    _check_adapter_fits_run(folder, meta, model_spec, task, same_base)
    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    fresh = get_peft_model_state_dict(model)
    missing = sorted(set(fresh) - set(saved))
    extra = sorted(set(saved) - set(fresh))
    if missing or extra:
        raise ModelError(
            f"field 'init_adapter': {folder} does not fit the run's LoRA settings (missing "
            f"{missing[:2]}, unexpected {extra[:2]}); use the lora_layers and "
            f"lora_target_modules it was trained with ({meta.get('lora_layers')}, "
            f"{meta.get('lora_target_modules')})"
        )
    adapter_labels: list[str] = meta["labels"]
    run_labels = list(task.labels or [])
    mapping = label_mapping(adapter_labels, run_labels)
    state = {
        name: _starting_tensor(
            folder, name, saved[name], tensor, adapter_labels, run_labels, mapping
        )
        for name, tensor in fresh.items()
    }
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"field 'init_adapter': {folder}: tensors not loaded: {unexpected[:3]}")
    return mapping


def _check_adapter_fits_run(
    folder: Path, meta: dict, model_spec: ModelSpec, task: TaskSpec, same_base: bool
) -> None:
    """Refuse a starting adapter of another task, another base model or another LoRA alpha."""
    if meta.get("task") != task.name:
        raise ModelError(
            f"field 'init_adapter': {folder} was trained for {meta.get('task')!r}, the run is "
            f"{task.name!r}"
        )
    if not same_base:
        raise ModelError(
            f"field 'init_adapter': {folder} was trained on base model {meta.get('model')!r}, "
            f"the run's is {model_spec.name!r}; start from an adapter of the same base model"
        )
    try:
        alpha = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))[
            "lora_alpha"
        ]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(
            f"field 'init_adapter': {folder}: adapter_config.json is missing or has no lora_alpha"
        ) from None
    if float(alpha) != model_spec.lora_alpha:
        # the same factors under another alpha are another model (scale = alpha / r)
        raise ModelError(
            f"field 'init_adapter': {folder} was trained with lora_alpha {alpha}, the run's is "
            f"{model_spec.lora_alpha:g}; set lora_alpha = {alpha}"
        )


def _starting_tensor(
    folder: Path,
    name: str,
    loaded: torch.Tensor,
    tensor: torch.Tensor,
    adapter_labels: list[str],
    run_labels: list[str],
    mapping: LabelMapping,
) -> torch.Tensor:
    """The starting value of the fresh tensor `name`: the adapter's `loaded` one, a head's rows
    matched to the run's labels by name (a label the adapter lacks keeps its fresh row)."""
    if name.endswith(LABEL_ROWS):
        if loaded.shape[0] != len(adapter_labels) or loaded.shape[1:] != tensor.shape[1:]:
            raise ModelError(
                f"field 'init_adapter': {folder}: head tensor {name} has "
                f"{loaded.shape[0]} rows for {len(adapter_labels)} labels; refused"
            )
        rows = tensor.detach().clone()
        for index, label in enumerate(run_labels):
            if label in mapping.kept:
                rows[index] = loaded[adapter_labels.index(label)]
        loaded = rows
    elif loaded.shape != tensor.shape:
        raise ModelError(
            f"field 'init_adapter': {folder}: tensor {name} has shape {tuple(loaded.shape)}, "
            f"the run's is {tuple(tensor.shape)} (lora_rank or the base model differ)"
        )
    return loaded.to(tensor.dtype)
