"""A real hospital's safeguards around every training request: site policy, privacy ledger, audit.

The deployed ClientApp (`client.app:app`) opens a `Site` from its node config, which
`fedward client start` writes:

    data-path      the hospital's data file (CSV/JSONL, or CoNLL for NER)
    policy         the site policy TOML (read again for every request, so an edit applies at once)
    ledger         folder of the privacy ledgers (one file per data set) and released updates
    dataset-id     the name of this data set's privacy ledger (required: a file name an operator
                   may change must not start a fresh lifetime budget)
    audit-log      the hospital's own hash-chained audit log (default: <ledger>/audit.jsonl)
    hospital-name  the name this hospital reports
    device         where this hospital trains (auto, cpu, cuda); overrides the run's choice

A train request goes through three gates (`client.app.handle_train`):

1. `admit`, before any record is read: the run id from the coordinator must be a plain
   identifier (it is used in file names), the round must lie in 1..rounds, the site policy
   judges the run spec alone (its models, tasks, budget, rounds and the hospital's declared
   labels), and the run's spec is fixed: the first spec this data set accepts for a run id is
   kept with the hospital's run state (`<ledger>/runs/`), and a later message for that run with
   another spec is refused (`run.spec_changed`), so a coordinator cannot ask the same run with
   fewer rounds. If this data set already released an update for this (run, round) -- a
   resumed run repeating the round it was interrupted in -- the very same update is sent again
   ("replay"): nothing is trained, so nothing more is spent, and the ledger keeps one entry for
   the round. Any other repeat, and a round below one this run already trained, is refused.
2. `check_budget`, once the data is read and before any check that depends on it: the ledger
   reserves this round's planned DP steps if the run's target epsilon fits what the lifetime
   budget has left (one locked step, so two concurrent requests cannot both pass). Only then
   are the data-dependent checks made -- the policy's minimum example count here, the
   vocabulary and the labels in client/app.py -- and a refusal from any of them keeps the
   reservation: it is charged as a trained round.
3. `record`, after training and before anything leaves: the reservation is confirmed as spent
   (written atomically), the released update kept for a replay, and an audit record written.

Why this order (issue 28). A refusal is a reply the coordinator reads without noise. If it
depended on the records and came before the budget gate, a coordinator could ask as often as it
liked, for free: "does any record carry the label HIV-positive?" (labels [cardiac, HIV-positive]
against [cardiac, zzz-decoy]), "are there more than N training records?" (a crafted
secagg_max_weight, sixteen requests for the exact count). So: a refusal carries no number
derived from the data; what the hospital can judge from its own policy (including its declared
`labels`) is judged in gate 1, before any data is read; and whatever depends on the data comes
after the budget gate and is paid for. A secure-aggregation weight above the run's
`secagg_max_weight` is not refused at all: the weight is capped at it (client/app.py).

A refusal at any gate becomes a refusal reply (never a crash) and an audit record. A process
that dies after gate 2 leaves the reservation in the ledger, where it counts as spent. What goes
to the coordinator is the error's reason code with numbers (common/protocol/reasons.py), never its
text: a path, a column or a record's value is described in this hospital's log and audit log only.

An evaluate request is a release too (`admit_evaluation`, `release_evaluation`): refused unless
the policy allows it, for a round this data set trained in (or the final one), once a round, and
within the budget, all before any record is read; the release is charged to the ledger before
the data is read (a refusal after that keeps the charge), and its metrics are noised counts
(client/privacy/release.py).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedward.client.deploy.node_config import (
    AUDIT_KEY,
    CACHE_KEYS,
    DATA_KEY,
    DATASET_KEY,
    DEVICE_KEY,
    LEDGER_KEY,
    POLICY_KEY,
)
from fedward.client.model_cache import initial_arrays
from fedward.client.personalize import OWN_FOLDER, PersonalReport, keep_at_home
from fedward.client.policy import SitePolicy, model_content_hash, packaged_model_hash
from fedward.client.privacy.accounting import (
    calibrate_noise,
    group_epsilon,
    plan_dp,
    privacy_units,
)
from fedward.client.privacy.ledger import PrivacyLedger, check_identifier, dataset_fingerprint
from fedward.client.privacy.release import (
    Predictions,
    counts,
    exact_metrics,
    metrics_from_counts,
    noised,
    sensitivity,
)
from fedward.client.secagg import SecAggIdentity
from fedward.client.trainer import DPPlan, HistoryEntry, TrainResult
from fedward.common.config import DataSchema, LocalRun, LocalSettings, RunSpec
from fedward.common.data import EncodedDataset
from fedward.common.errors import (
    ConfigError,
    DataError,
    FedwardError,
    ModelError,
    PolicyError,
    PrivacyBudgetExceeded,
)
from fedward.common.files.arrays_file import read_arrays_file, write_arrays_file
from fedward.common.files.atomic import fsync_dir, write_json_atomic
from fedward.common.files.audit_log import AuditLog
from fedward.common.model import resolve_model_path
from fedward.common.protocol import wire
from fedward.common.protocol.reasons import Reason
from fedward.common.warm_start import adapter_content_hash

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Node-config keys of the hospital's data schema (`fedward client start --text-column ...`).
SCHEMA_KEYS = tuple(name.replace("_", "-") for name in DataSchema.model_fields)

#: Sub-folder of the ledger folder holding the last released update of each (data set, run).
RELEASES = "releases"
RELEASE_MODE = 0o600  # an update is DP-protected, but it stays the hospital's own

_RELEASE_PREFIX = "delta:"  # the update's tensors inside the .npz (common.arrays_file)

#: Sub-folder of the ledger folder holding each (data set, run)'s spec, fixed on first contact.
RUNS = "runs"

#: Ledger key suffix of a run's released evaluations (their rounds, apart from trained rounds).
EVALUATION_KEY = "-evaluation"  # ledger rows of released evaluations: <run id>-evaluation


@dataclass(frozen=True)
class Release:
    """The update a data set released for one (run, round), kept so a repeat can resend it."""

    run_id: str
    round: int
    global_sha256: str  # the global adapter it was trained from
    delta: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    epsilon_run: float | None
    plan: DPPlan | None


class Site:
    """One hospital's policy, ledger and audit log, opened for one request."""

    #: Metrics leave a deployed hospital only noised and charged (simulation: exact).
    releases_exact_metrics = False

    def __init__(
        self,
        name: str,
        data_path: Path,
        policy: SitePolicy,
        ledger_dir: Path,
        audit_path: Path,
        device: str | None = None,
        schema: DataSchema | None = None,
        dataset_id: str | None = None,
        cache: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.data_path = data_path
        self.policy = policy
        self.ledger_dir = ledger_dir
        self.audit = AuditLog(audit_path)
        self.device = device
        self.schema = schema or DataSchema()  # how to read the data file: the hospital's own
        self.dataset_id = dataset_id or name  # the ledger's key (deployed: the node config's)
        self.cache = cache or {}  # the hospital's prefix-cache settings (LocalSettings fields)
        self._ledger: PrivacyLedger | None = None
        self._data_sha256: str | None = None
        self._round: tuple[str, int, int] | None = None  # (run id, round, rounds) once admitted
        self._reserved: tuple[str, int] | None = None  # this request's reservation (charged)
        self._adapter_sha256: str | None = None  # the run's starting adapter, once judged

    @classmethod
    def open(cls, node_config: Mapping[str, Any], name: str) -> Site:
        """The site named by a SuperNode's node config; the policy is read now.

        A missing key or a broken policy file raises `PolicyError` with a reason fit for the
        coordinator; the details (paths) go to this hospital's log.
        """
        required = (DATA_KEY, POLICY_KEY, LEDGER_KEY, DATASET_KEY)
        missing = [key for key in required if not node_config.get(key)]
        if missing:
            raise PolicyError(
                f"hospital {name} is not set up for deployment (node config lacks "
                f"{', '.join(missing)}); it must be started with `fedward client start`",
                reason=Reason("policy.not_configured"),
            )
        device = node_config.get(DEVICE_KEY) or None
        if device not in (None, "auto", "cpu", "cuda"):
            raise PolicyError(
                f"hospital {name}: node config 'device' must be auto, cpu or cuda",
                reason=Reason("policy.not_configured"),
            )
        ledger_dir = Path(str(node_config[LEDGER_KEY]))
        audit_path = Path(str(node_config.get(AUDIT_KEY) or ledger_dir / "audit.jsonl"))
        policy = _node_setting(
            name,
            "its site policy file cannot be used",
            "policy.file_invalid",
            lambda: SitePolicy.load(str(node_config[POLICY_KEY])),
        )
        schema = _node_setting(
            name,
            "its data schema in the node config is invalid",
            "policy.schema_invalid",
            lambda: DataSchema.build(
                {key: node_config[key] for key in SCHEMA_KEYS if key in node_config},
                source="node config",
            ),
        )
        dataset_id = str(node_config[DATASET_KEY])
        try:
            check_identifier(dataset_id, "data-set id")
        except PolicyError:
            log.error("%s: node config 'dataset-id' %r is not a plain identifier", name, dataset_id)
            raise PolicyError(
                f"hospital {name}: its data-set id in the node config is invalid (details in "
                "the hospital's log); every request is refused until it is fixed"
            ) from None
        cache = {
            key.replace("-", "_"): node_config[key] for key in CACHE_KEYS if key in node_config
        }
        _node_setting(
            name,
            "its local settings (prefix cache, own model) in the node config are invalid",
            "policy.not_configured",
            lambda: LocalSettings.build(cache, source="node config"),
        )
        data_path = Path(str(node_config[DATA_KEY]))
        return cls(
            name, data_path, policy, ledger_dir, audit_path, device, schema, dataset_id, cache
        )

    # --- gate 1: before any data is read -----------------------------------------------------

    def check_policy(self, spec: RunSpec) -> LocalRun:
        """Raise `PolicyError` unless the policy accepts the run spec; returns the config to use
        here: the spec with this hospital's own device, data schema and vocabulary limit (the
        policy's `max_unknown_rate`: a limit the coordinator chose would make the vocabulary
        refusal a question about the text it could ask again and again)."""
        self._adapter_sha256 = self._adapter_hash(spec)  # what the audit record names
        self.pinned_policy().check(spec, self._model_hash(spec), adapter_hash=self._adapter_sha256)
        if spec.privacy.dp and spec.privacy.dp_unit == "patient" and not self.schema.patient_column:
            # the hospital's own schema, not its records: judged before any data is read
            raise PolicyError(
                f"hospital {self.name}: the run asks patient-level DP but this hospital's data "
                "schema names no patient column (fedward client start --patient-column); refused",
                reason=Reason("policy.no_patient_column"),
            )
        local = LocalSettings.build({"device": self.device or "auto", **self.cache})
        task = spec.task.model_copy(update={"max_unknown_rate": self.policy.max_unknown_rate})
        own_limit = spec.model_copy(update={"task": task})
        return LocalRun(spec=own_limit, local=local, data_schema=self.schema)

    def admit(
        self,
        spec: RunSpec,
        run_id: str,
        server_round: int,
        global_arrays: dict[str, np.ndarray],
    ) -> tuple[LocalRun, TrainResult | None]:
        """Gate 1. Returns the config to train with, and the update to resend if this (run,
        round) was already released by this data set (None: train).

        The run id and round come from the coordinator: both are checked before anything else
        (the run id names files), and a crafted round is refused with nothing spent.
        """
        run_id = check_identifier(run_id, "run id")
        if not 1 <= server_round <= spec.federation.rounds:
            raise PolicyError(
                f"round {server_round} is outside the run's rounds 1..{spec.federation.rounds}; "
                "refused, "
                "nothing spent",
                reason=Reason(
                    "round.out_of_range", {"round": server_round, "rounds": spec.federation.rounds}
                ),
            )
        config = self.check_policy(spec)
        self.fix_run_spec(run_id, spec)
        self._round = (run_id, server_round, spec.federation.rounds)
        if not config.spec.privacy.dp:
            return config, None
        ledger = self.ledger()
        recorded = next(
            (e for e in ledger.entries if e.run_id == run_id and e.round == server_round), None
        )
        if recorded is None:
            ledger.check_round(run_id, server_round, spec.federation.rounds)  # never backwards
            if spec.model.init_adapter and server_round > 1:
                self._check_first_start(config, run_id, global_arrays)
            return config, None
        if recorded.status != "spent":
            raise PolicyError(
                f"round {server_round} of run {run_id} is reserved on this data set: it is being "
                "trained by another request, or its process died (the reservation counts as "
                "spent; `fedward client ledger` shows it). A round is trained at most once",
                reason=Reason("round.repeated", {"round": server_round}),
            )
        release = self._load_release(run_id)
        global_sha256 = wire.arrays_to_record(global_arrays).object_id
        if release is None or release.round != server_round:
            problem = "its released update was not kept"
        elif release.global_sha256 != global_sha256:
            problem = "it was trained from a different global adapter"
        else:
            log.info(
                "%s: run %s round %d already released; resending it",
                self.name,
                run_id,
                server_round,
            )
            result = TrainResult(
                delta=release.delta,
                num_examples=release.num_examples,
                train_loss=release.train_loss,
                epsilon_spent=release.epsilon_run,
                plan=release.plan,
                history=self.run_history(run_id, server_round + 1),
            )
            self._audit_release(
                "replay", run_id, server_round, result, global_sha256, recorded.epsilon_total
            )
            return config, result
        raise PrivacyBudgetExceeded(
            f"hospital {self.name}: round {server_round} of run {run_id} was already trained on "
            f"this data set and its privacy cost recorded, but {problem}; training it again "
            "would release a second update the ledger does not count. Refused"
        )

    def _check_first_start(
        self, config: LocalRun, run_id: str, global_arrays: dict[str, np.ndarray]
    ) -> None:
        """The starting-adapter pin at this data set's first round of the run, whatever its
        number (issue 40: a coordinator that first asked a hospital at round 2 skipped the
        check of round 1, client/app.py). Once the data set has a round of the run in its
        ledger, the global adapters that follow are the coordinator's averages."""
        if any(entry.run_id == run_id for entry in self.ledger().entries):
            return
        initial = initial_arrays(config, len(config.spec.task.labels or []))
        check_starting_arrays(initial, global_arrays, self.name)

    def update_weight(self) -> int:
        """The weight this hospital's update carries in the federation's average: the one its
        policy declares (`aggregation_weight`), never its training count (issue 40: from the
        sums of rotating cohorts the coordinator solved for every hospital's exact count)."""
        return self.policy.aggregation_weight

    # --- gate 2: data loaded, no step taken ------------------------------------------------

    def ledger(self) -> PrivacyLedger:
        """The privacy ledger of this hospital's data set, keyed by its data-set id.

        The data file's SHA-256 is taken now (it goes into each entry, for the audit); a
        ledger an older fedward kept under that hash is carried over (`migrate_hash_ledger`).
        """
        if self._ledger is None:
            try:
                ledger = PrivacyLedger.open(
                    self.ledger_dir, self.dataset_id, description=str(self.data_path)
                )
                self._data_sha256 = dataset_fingerprint(self.data_path)
                ledger.migrate_hash_ledger(self._data_sha256)
                if not ledger.entries:
                    self._check_not_recorded_elsewhere(self._data_sha256)
                self._ledger = ledger
            except DataError as exc:
                log.error("%s: %s", self.name, exc)
                raise DataError(
                    f"hospital {self.name}: its privacy ledger or data set cannot be read "
                    "(details in the hospital's log); training refused so that no privacy "
                    "spending goes unrecorded"
                ) from None
        return self._ledger

    def _check_not_recorded_elsewhere(self, data_sha256: str) -> None:
        """Refuse a data set that is new under this id but whose very bytes another ledger in
        the folder has recorded: the same data under a new data-set id (a renamed node key, a
        changed --dataset-id) would otherwise start a fresh lifetime budget. The operator must
        start the hospital with the id that ledger has."""
        others = sorted(
            other.dataset
            for other in PrivacyLedger.all_in(self.ledger_dir)
            if other.dataset != self.dataset_id
            and any(entry.data_sha256 == data_sha256 for entry in other.entries)
        )
        if others:
            raise PolicyError(
                f"hospital {self.name}: data set id {self.dataset_id} has no ledger yet, but "
                f"this data file's exact contents are recorded under data-set id "
                f"{', '.join(others)}; start the hospital with --dataset-id {others[0]} (the "
                "same data keeps its lifetime budget). Every request is refused until then",
                reason=Reason("dataset.recorded_elsewhere"),
            )

    def run_history(self, run_id: str, server_round: int) -> list[HistoryEntry]:
        """Accountant history of this run's rounds before `server_round` (the run's own budget).

        The ledger holds every run; the trainer checks the run's target epsilon against this
        run's rounds only, while `check_budget` checks the lifetime budget against all of them.
        """
        return [
            (entry.noise_multiplier, entry.sample_rate, entry.steps)
            for entry in self.ledger().entries
            if entry.run_id == str(run_id) and entry.round < server_round
        ]

    def check_budget(self, config: LocalRun, dataset: EncodedDataset) -> DPPlan | None:
        """Gate 2, the first thing done with the data: reserve this round within the lifetime
        budget, which is charged the run's target epsilon once, never the accountant's
        projection (that depends on the unit count, so its refusal told the count for free:
        issue 40); then the policy's minimum example count, charged. Returns the
        round's DP plan (None without DP), planned on the units training samples (patients
        under patient-level DP, else the encoded examples), for `train_locally` to use: the
        plan reserved is the plan trained.

        From the reservation on, a refusal keeps it (`refused`): every check that depends on
        the records comes after this gate and is paid for, so that a coordinator cannot ask
        questions about the data for free. A training count above the run's
        `secagg_max_weight` is no refusal at all: the weight is capped (client/app.py).
        """
        plan = None
        if config.spec.privacy.dp:
            if self._round is None:
                raise RuntimeError("Site.check_budget called before Site.admit")
            run_id, server_round, rounds = self._round
            # its noise search is cached (client/privacy/accounting.py); an empty split is
            # planned as one unit and then refused, charged, below
            plan = plan_dp(config.spec, max(privacy_units(config.spec, dataset), 1))
            ledger = self.ledger()
            ledger.reserve(
                run_id,
                server_round,
                rounds,
                plan,
                config.spec.privacy.delta,
                self.policy.lifetime_epsilon,
                data_sha256=self._data_sha256,
                budget_delta=self.policy.max_delta,
                unit=config.spec.privacy.dp_unit,
                epsilon_bound=config.spec.privacy.target_epsilon,  # the run's, whatever n is
            )
            self._reserved = (run_id, server_round)
        self.policy.check_examples(len(dataset))
        return plan

    # --- gate 3: trained, nothing sent yet -------------------------------------------------

    def record(
        self,
        config: LocalRun,
        run_id: str,
        server_round: int,
        result: TrainResult,
        global_arrays: dict[str, np.ndarray],
    ) -> None:
        """Gate 3: ledger entry, kept update, audit record -- before the update leaves."""
        global_sha256 = wire.arrays_to_record(global_arrays).object_id
        lifetime = None
        if result.plan is not None:
            entry = self.ledger().confirm(
                str(run_id),
                server_round,
                result.plan,
                config.spec.privacy.delta,
                self._data_sha256,
                unit=config.spec.privacy.dp_unit,
            )
            self._reserved = None
            lifetime = entry.epsilon_total
            self._save_release(run_id, server_round, result, global_sha256)
        self._audit_release("train", run_id, server_round, result, global_sha256, lifetime, config)

    def refused(self, run_id: str, server_round: int, stage: str, exc: Exception) -> None:
        """Audit a refusal: the full text for the hospital's staff (only the code goes back).

        A reservation this request made stays in the ledger, counted as spent: past the budget
        gate the request had read the data, and its answer -- a refusal rather than an update --
        may depend on it. Giving the reservation back would make such questions free.
        """
        charged = self._reserved
        if charged is not None:
            log.warning(
                "%s: run %s round %d refused after the budget gate; its reservation stays "
                "charged to data set %s",
                self.name,
                charged[0],
                charged[1],
                self.dataset_id,
            )
            self._reserved = None
        code = exc.reason.code if isinstance(exc, FedwardError) else "error.internal"
        try:
            self.audit.append(
                "refusal",
                run_id=str(run_id),
                round=server_round,
                stage=stage,
                hospital=self.name,
                error=type(exc).__name__,
                code=code,
                charged=charged is not None,
                reason=str(exc),
            )
        except (OSError, DataError) as audit_error:
            log.error("%s: cannot write the audit log: %s", self.name, audit_error)

    # --- the run's spec, fixed on first contact ---------------------------------------------

    def fix_run_spec(self, run_id: str, spec: RunSpec) -> None:
        """Fix the run's spec at this hospital on first contact; refuse any other spec later.

        The first spec this data set accepts for a run id is written (atomically, never
        overwritten) to `<ledger>/runs/<data-set id>.<run id>.json`; a later train or evaluate
        message for that run whose spec digest differs is refused with `run.spec_changed` and
        logged. So a run's rounds, labels, model and budget are the ones this hospital agreed
        to, whatever a later message claims (issue 28: "evaluation only after the final round"
        asked again with rounds = 1). The file survives a restart.
        """
        digest = spec.digest()
        path = self.ledger_dir / RUNS / f"{self.dataset_id}.{run_id}.json"
        try:
            fixed = _fix_once(
                path,
                {"run_id": str(run_id), "spec_sha256": digest, "rounds": spec.federation.rounds},
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("%s: cannot read or write the run state %s: %s", self.name, path, exc)
            raise DataError(
                f"hospital {self.name}: the state of run {run_id} cannot be read or written "
                "(details in the hospital's log); refused"
            ) from None
        if fixed["spec_sha256"] != digest:
            log.warning(
                "%s: run %s: a message with run spec %s... refused; the run was fixed at %s... "
                "on first contact",
                self.name,
                run_id,
                digest[:12],
                str(fixed["spec_sha256"])[:12],
            )
            raise PolicyError(
                f"hospital {self.name}: run {run_id} was fixed on first contact with run spec "
                f"{str(fixed['spec_sha256'])[:12]}... ({fixed['rounds']} rounds); this message "
                f"carries {digest[:12]}... ({spec.federation.rounds} rounds). Refused, nothing "
                "spent",
                reason=Reason("run.spec_changed"),
            )

    # --- evaluation: an accounted release ---------------------------------------------------

    def admit_evaluation(self, spec: RunSpec, run_id: str, server_round: int) -> LocalRun:
        """Before any record is read: refuse an evaluation the policy does not allow, one of a
        round this data set did not train (or not the final one), a second one of a round, or
        one the budget cannot pay for. Returns the config to evaluate with."""
        config = self.check_policy(spec)
        policy = self.policy
        self.fix_run_spec(run_id, spec)

        def refuse(code: str, why: str, **params) -> PolicyError:
            return PolicyError(
                f"hospital {self.name}: evaluation of run {run_id} round {server_round} "
                f"refused: {why}",
                reason=Reason(code, params),
            )

        if not policy.allow_evaluation:
            raise refuse("evaluation.not_allowed", "the site policy has allow_evaluation false")
        if spec.privacy.dp_unit == "patient" or self.pinned_policy().dp_unit == "patient":
            # The released counts are noised for one record; a patient moves them by up to its
            # number of records, and the ledger never mixes units.
            raise refuse(
                "evaluation.patient_unit", "released metrics are protected per record only"
            )
        if not 1 <= server_round <= spec.federation.rounds:
            raise refuse(
                "evaluation.round_out_of_range",
                f"the run has rounds 1..{spec.federation.rounds}",
                round=server_round,
                rounds=spec.federation.rounds,
            )
        trained = self.ledger().rounds_recorded(run_id)
        if policy.evaluate_rounds == "final" and server_round != spec.federation.rounds:
            raise refuse(
                "evaluation.not_final",
                "only the final round is evaluated",
                rounds=spec.federation.rounds,
            )
        took_part = bool(trained) if policy.evaluate_rounds == "final" else server_round in trained
        if not took_part:
            raise refuse(
                "evaluation.round_not_trained",
                "this data set did not train in it",
                round=server_round,
            )
        if server_round in self.ledger().rounds_recorded(run_id + EVALUATION_KEY):
            raise refuse("evaluation.repeated", "already evaluated", round=server_round)
        # Charged now, before any record is read: a refusal from here on (the vocabulary, the
        # labels) keeps the charge, so its answer is not free either.
        plan = DPPlan(self._evaluation_noise(), 1.0, 1)
        key = run_id + EVALUATION_KEY
        try:  # check and charge in one locked step: two racing requests cannot both pass
            self.ledger().reserve(
                key,
                server_round,
                spec.federation.rounds,
                plan,
                self.policy.max_delta,
                self.policy.lifetime_epsilon,
                self._data_sha256,
                epsilon_bound=self.policy.evaluation_epsilon,
                bound_per="entry",
            )
        except PrivacyBudgetExceeded as exc:
            raise PrivacyBudgetExceeded(
                f"hospital {self.name}: evaluation refused: {exc}",
                reason=Reason("evaluation.budget"),
            ) from None
        except PolicyError as exc:
            if exc.reason.code == "ledger.unit_mixed":
                raise
            raise PolicyError(
                f"hospital {self.name}: evaluation refused: {exc}",
                reason=Reason("evaluation.repeated", {"round": server_round}),
            ) from None
        self._reserved = (key, server_round)
        return config

    def release_evaluation(
        self, config: LocalRun, run_id: str, server_round: int, predictions: Predictions
    ) -> dict[str, float]:
        """Confirm the charge made at admission, then noise the counts: the metrics that may
        leave (Gaussian mechanism at the policy's evaluation_epsilon and max_delta,
        client/privacy/release.py)."""
        plan = DPPlan(self._evaluation_noise(), 1.0, 1)
        key = run_id + EVALUATION_KEY
        entry = self.ledger().confirm(
            key, server_round, plan, self.policy.max_delta, self._data_sha256
        )
        self._reserved = None
        noise_multiplier = plan.noise_multiplier
        std = noise_multiplier * sensitivity(predictions.task)
        released = metrics_from_counts(
            predictions.task,
            noised(counts(predictions), std, np.random.default_rng()),
            len(predictions.labels),
        )
        self.audit.append(
            "evaluation",
            run_id=str(run_id),
            round=server_round,
            hospital=self.name,
            epsilon_evaluation=self.policy.evaluation_epsilon,
            epsilon_lifetime=entry.epsilon_total,
            exact=_finite_values(exact_metrics(predictions)),
            released=_finite_values(released),
        )
        return released

    def keep_own_model(
        self, config: LocalRun, run_id: str, arrays: dict, report: PersonalReport
    ) -> None:
        """Write this hospital's own adapter and its alone / global / own report to
        `<ledger>/own/<data set>/<run id>/` (private to the hospital's account: the adapter is
        not DP and must not be shared), and note it in the audit log. Nothing is sent."""
        folder = self.ledger_dir / OWN_FOLDER / self.dataset_id / str(run_id)
        folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        keep_at_home(config, arrays, report, folder, self.name)
        self.audit.append(
            "own_model",
            run_id=str(run_id),
            hospital=self.name,
            folder=str(folder),
            **{key: value for key, value in report.as_dict().items() if key != "selection"},
        )

    def _evaluation_noise(self) -> float:
        return calibrate_noise(self.policy.evaluation_epsilon, self.policy.max_delta, 1.0, 1)

    def secagg_identity(self) -> SecAggIdentity:
        """The signing key and roster pinned in this hospital's site policy."""
        return SecAggIdentity.from_policy(self.policy, self.name, self.ledger_dir / "secagg")

    # --- internals -------------------------------------------------------------------------

    def pinned_policy(self) -> SitePolicy:
        """The policy with its models pinned: a policy that pins no model content trains only
        the packaged default (issue 28: with `allowed_model_hashes` unset, the coordinator
        named the model, and a hospital went to fetch a hub model it named), and one that pins
        no starting adapter trains no run that has one (issue 30). A policy that names no
        `dp_unit` requires the patient where the hospital's schema names a patient column
        (issue 40: one record-level run locked its patients into record-level protection for
        the data set's life, `ledger.unit_mixed`), else accepts the record."""
        policy = self.policy
        if policy.dp_unit is None:  # issue 40: patient data trains per patient unless it says
            unit = "patient" if self.schema.patient_column else "record"
            policy = policy.model_copy(update={"dp_unit": unit})
        if policy.allowed_adapter_hashes is None:  # issue 30: no unpinned starting adapter
            policy = policy.model_copy(update={"allowed_adapter_hashes": []})
        if policy.allowed_model_hashes is not None:
            return policy
        default = packaged_model_hash()
        return policy.model_copy(update={"allowed_model_hashes": [default] if default else []})

    def _adapter_hash(self, spec: RunSpec) -> str | None:
        """The content hash of the run's starting adapter (a folder on this machine), or None
        when the run has none or it cannot be hashed (then a policy that pins refuses)."""
        if not spec.model.init_adapter:
            return None
        try:
            return adapter_content_hash(spec.model.init_adapter)
        except (ModelError, OSError) as exc:
            log.warning("%s: starting adapter: %s", self.name, exc)
            return None

    def _model_hash(self, spec: RunSpec) -> str | None:
        """The content hash of the run's model if it is a local folder or file; None
        otherwise (a hub id: never fetched, the pinned policy refuses it)."""
        path = resolve_model_path(spec.model.name)
        if not Path(path).exists():
            log.warning("%s: model %r is not a local folder; refused", self.name, spec.model.name)
            return None
        try:
            return model_content_hash(path)
        except ModelError as exc:
            log.warning("%s: %s", self.name, exc)
            return None  # the policy then refuses: the hash cannot be checked

    def _audit_release(
        self,
        action: str,
        run_id: str,
        server_round: int,
        result: TrainResult,
        global_sha256: str,
        epsilon_lifetime: float | None,
        config: LocalRun | None = None,
    ) -> None:
        """One audit record per released update; epsilon_lifetime is the data set's total
        after this round (at the run's delta), as the ledger recorded it, in `dp_unit`.

        A record-level run on data with a patient column also states what that epsilon means
        per patient: group privacy over the largest patient's records (`group_epsilon`)."""
        per_patient = {}
        if config is not None and config.spec.privacy.dp_unit == "record" and result.plan:
            records = result.largest_patient
            if records is not None and epsilon_lifetime is not None:
                epsilon, delta = group_epsilon(epsilon_lifetime, config.spec.privacy.delta, records)
                per_patient = {
                    "largest_patient_records": records,
                    "epsilon_per_patient": epsilon,
                    "delta_per_patient": delta,
                }
        self.audit.append(
            action,
            run_id=str(run_id),
            round=server_round,
            hospital=self.name,
            dataset=self.dataset_id,
            dataset_sha256=self._data_sha256,
            global_sha256=global_sha256,
            update_sha256=wire.arrays_to_record(result.delta).object_id,
            num_examples=result.num_examples,
            epsilon_run=result.epsilon_spent,
            epsilon_lifetime=epsilon_lifetime,
            lifetime_epsilon=self.policy.lifetime_epsilon,
            dp_unit=None if config is None else config.spec.privacy.dp_unit,
            **per_patient,
            **({"init_adapter_sha256": self._adapter_sha256} if self._adapter_sha256 else {}),
        )

    def _release_path(self, run_id: str) -> Path:
        # both names are plain identifiers (checked in `open` and `admit`): no path tricks
        return self.ledger_dir / RELEASES / f"{self.dataset_id}.{run_id}.npz"

    def _save_release(
        self, run_id: str, server_round: int, result: TrainResult, global_sha256: str
    ) -> None:
        header = {
            "run_id": str(run_id),
            "round": server_round,
            "global_sha256": global_sha256,
            "num_examples": result.num_examples,
            "train_loss": result.train_loss if np.isfinite(result.train_loss) else None,
            "epsilon_run": result.epsilon_spent,
            "plan": None
            if result.plan is None
            else [result.plan.noise_multiplier, result.plan.sample_rate, result.plan.steps],
        }
        write_arrays_file(
            self._release_path(run_id),
            header,
            result.delta,
            prefix=_RELEASE_PREFIX,
            mode=RELEASE_MODE,
        )

    def _load_release(self, run_id: str) -> Release | None:
        path = self._release_path(run_id)
        if not path.is_file():
            return None
        try:
            stored = read_arrays_file(path, prefix=_RELEASE_PREFIX, what="released update")
        except (FileNotFoundError, DataError) as exc:
            log.warning("%s: %s", self.name, exc)
            return None
        header, delta = stored.header, stored.arrays
        plan = header["plan"]
        return Release(
            run_id=header["run_id"],
            round=int(header["round"]),
            global_sha256=header["global_sha256"],
            delta=delta,
            num_examples=int(header["num_examples"]),
            train_loss=float("nan") if header["train_loss"] is None else header["train_loss"],
            epsilon_run=header["epsilon_run"],
            plan=None if plan is None else DPPlan(float(plan[0]), float(plan[1]), int(plan[2])),
        )


def check_starting_arrays(
    pinned: dict[str, np.ndarray], received: dict[str, np.ndarray], who: str
) -> None:
    """Refuse a first round whose global adapter is not the one this hospital built from its
    own, pinned copy of the starting adapter (`init_adapter`): otherwise the policy's pin would
    hold for the files on disk while the coordinator started the run from other weights. Runs
    before any record is read; nothing is spent. Later rounds' global adapters are the
    coordinator's average and cannot be checked this way (DP holds whatever the weights)."""
    same = pinned.keys() == received.keys() and all(
        np.array_equal(pinned[name], received[name]) for name in pinned
    )
    if not same:
        log.warning("%s: the first round's global adapter differs from the pinned start", who)
        raise PolicyError(
            f"hospital {who}: the first round's global adapter is not the pinned starting "
            "adapter (init_adapter) as built here; refused before any record was read",
            reason=Reason("model.start_mismatch"),
        )


def _fix_once(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The record kept at `path`: `record` if no other was written first, else that one.

    Written to a temporary file (fsynced) and linked into place, which fails if the file exists:
    of two racing first contacts, one wins and the other reads what it wrote. Never overwritten.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        temp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        write_json_atomic(temp, record, mode=RELEASE_MODE)
        try:
            os.link(temp, path)
            fsync_dir(path.parent)
        except FileExistsError:
            pass
        finally:
            temp.unlink(missing_ok=True)
    kept = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(kept, dict) or not isinstance(kept.get("spec_sha256"), str):
        raise ValueError(f"{path}: not a run state record")
    return kept


def _finite_values(metrics: dict[str, float]) -> dict[str, float | None]:
    return {key: float(value) if np.isfinite(value) else None for key, value in metrics.items()}


def _node_setting(name: str, problem: str, reason: str, read: Callable[[], T]) -> T:
    """`read()`, or a `PolicyError` that says only `problem`: the details (paths, values) go to
    this hospital's log, never to the coordinator."""
    try:
        return read()
    except ConfigError as exc:
        log.error("%s: %s", name, exc)
        raise PolicyError(
            f"hospital {name}: {problem} (details in the hospital's log); every request is "
            "refused until it is fixed",
            reason=Reason(reason),
        ) from None
