"""What stays on the machine that runs a fedward run, beside the run spec and never inside it:
how a data file is read (`DataSchema`, a hospital's own business), where and how this machine
runs its part (`LocalSettings`) and, in a simulation only, the simulated hospitals, their data
and the workers that run them (`SimulationSettings`). common/config.py bundles them with the
spec (`LocalRun`, `RunConfig`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from fedward.common.config_keys import ConfigGroup


class DataSchema(ConfigGroup):
    """How to read a data file: a hospital's own business in deployment, never the run's."""

    text_column: str = Field("text", description="Column holding the note text (CSV/JSONL).")
    label_column: str = Field("label", description="Column holding the label (CSV/JSONL).")
    patient_column: str | None = Field(
        None,
        description="Column (CSV/JSONL; a field of each entity-JSON record for NER) naming the "
        "patient a record belongs to; needed for dp_unit = patient. Unset: no patient column.",
    )
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of each hospital's records kept for validation."
    )


class SimulatedData(ConfigGroup):
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
    notes_per_hospital: str = Field(
        "700",
        description="Synthetic notes generated per hospital (before the split): one number for "
        "every hospital, or one per hospital, comma-separated (2000,200,200,200: a large centre "
        "and three community hospitals).",
    )

    @field_validator("notes_per_hospital", mode="before")
    @classmethod
    def _check_sizes(cls, value: Any) -> str:
        parts = [value] if isinstance(value, int) else str(value).replace(" ", "").split(",")
        try:
            sizes = [int(part) for part in parts]
        except ValueError:
            raise ValueError("must be a number, or one per hospital: 2000,200,200") from None
        if any(size < 10 for size in sizes):
            raise ValueError("every hospital needs at least 10 notes")
        return ",".join(str(size) for size in sizes)

    def notes_of(self, hospital: int) -> int:
        """How many synthetic notes hospital `hospital` (0-based) writes."""
        sizes = [int(size) for size in self.notes_per_hospital.split(",")]
        return sizes[0] if len(sizes) == 1 else sizes[hospital]

    @field_validator("partition")
    @classmethod
    def _check_partition(cls, value: str) -> str:
        if value in {"auto", "iid", "dirichlet", "blocks"}:
            return value
        if value.startswith("column:") and len(value) > len("column:"):
            return value
        raise ValueError("must be iid, dirichlet, blocks, auto or column:NAME")


class SimulationResources(ConfigGroup):
    """Simulation only: simulated failures and the worker processes that run the hospitals."""

    dropout_rate: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Simulation only: chance that a sampled hospital fails at a random stage of "
        "a round (training or a secure-aggregation stage), to exercise dropout recovery.",
    )
    seeded_dp_noise: bool = Field(
        False,
        description="Simulation only, and not private: draw each hospital's DP noise and Poisson "
        "sampling from the run's seed (and the hospital and round), so that two runs with the "
        "same settings give the same figures. Anyone who knows the seed can recompute the "
        "noise, so `fedward run` refuses it; a deployed hospital always draws from the OS.",
    )
    colluding_hospitals: int = Field(
        0,
        ge=0,
        description="Simulation only, for privacy audits of distributed noise: the last this "
        "many simulated hospitals collude with the coordinator and add no share of the noise "
        "(`fedward audit privacy` then compares with the epsilon docs/privacy.md gives for the "
        "honest hospitals left).",
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
    """Simulation only: the simulated hospitals, their data and the workers that run them; a
    coordinator in deployment ignores them and a hospital never holds them."""


class LocalSettings(ConfigGroup):
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
    own_model: bool = Field(
        True,
        description="At the run's last round each hospital fits its own model from the global "
        "one and its own notes (not DP, kept at home, never sent) and scores alone / global / "
        "own on its validation notes.",
    )
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
    evaluate_only: bool = Field(
        False,
        description="Train nothing: score the starting adapter (init_adapter, else a fresh one) "
        "once on every hospital's validation split, recorded as round 0 in history.json. "
        "Free in a simulation (exact, uncharged); in a deployment each hospital answers only "
        "where its policy allows (evaluate_starting_adapter), with noised metrics charged to its "
        "ledger.",
    )
    keep_adapter: Literal["best", "last"] = Field(
        "best",
        description="Which round's global adapter <out>/adapter holds: best, the trained round "
        "with the best validation score (macro-F1; NER: entity F1), the later on a tie, the last "
        "round's where no round has a score; last, the last round's. The checkpoint always "
        "holds the last (a resume continues from it).",
    )
