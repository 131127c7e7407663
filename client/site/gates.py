"""`Site`: a real hospital's gates around every request, in the order that keeps it private.

This class is the one place that says in which order a request is judged; each gate's checks
live beside it, one job per module (client/site/__init__.py explains why this order):

    train     admit          run id, round; policy on the spec alone; pins (model, starting
                             adapter, spec fixed on first contact); replay of a paid round
              check_budget   reserve within the lifetime budget -- then, charged, whatever
                             depends on the records
              record         confirm the spending, keep the update, audit -- then it leaves
    evaluate  admit_evaluation   policy, pins, round, once a round; charged before any record
                                 (round 0: an evaluate-only run's starting adapter, once a run)
              release_evaluation confirm, noise the counts, audit
    any       refused        audit; a reservation made stays charged
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedward.client.model_cache import initial_arrays
from fedward.client.own_model import OwnModel, keep_at_home
from fedward.client.personalize import OWN_FOLDER
from fedward.client.policy import SitePolicy
from fedward.client.privacy.accounting import plan_dp, privacy_units
from fedward.client.privacy.ledger import PrivacyLedger, check_identifier
from fedward.client.privacy.release import Predictions, exact_metrics
from fedward.client.secagg import SecAggIdentity
from fedward.client.site import budget, evaluation, pins, releases
from fedward.client.site.audit import audit_refusal, audit_release, finite_values
from fedward.client.site.node import site_settings
from fedward.client.trainer import DPPlan, HistoryEntry, TrainResult
from fedward.common.config import (
    DataSchema,
    LocalRun,
    LocalSettings,
    PrivacySpec,
    RunSpec,
    TrainingSpec,
)
from fedward.common.data import EncodedDataset
from fedward.common.errors import PolicyError
from fedward.common.files.audit_log import AuditLog
from fedward.common.protocol import wire
from fedward.common.protocol.reasons import Reason

log = logging.getLogger(__name__)


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
        coordinator; the details (paths) go to this hospital's log (client/site/node.py).
        """
        return cls(**site_settings(node_config, name))

    # --- gate 1: before any data is read -----------------------------------------------------

    def check_policy(self, spec: RunSpec) -> LocalRun:
        """Raise `PolicyError` unless the policy accepts the run spec; returns the config to use
        here: the spec with this hospital's own device, data schema and vocabulary limit (the
        policy's `max_unknown_rate`: a limit the coordinator chose would make the vocabulary
        refusal a question about the text it could ask again and again)."""
        self._adapter_sha256 = pins.adapter_hash(spec.model, self.name)  # the audit names it
        self.pinned_policy().check(
            spec, pins.model_hash(spec.model, self.name), adapter_hash=self._adapter_sha256
        )
        if spec.privacy.per_patient and not self.schema.patient_column:
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
        rounds = spec.federation.rounds
        if not 1 <= server_round <= rounds:
            raise PolicyError(
                f"round {server_round} is outside the run's rounds 1..{rounds}; refused, "
                "nothing spent",
                reason=Reason("round.out_of_range", {"round": server_round, "rounds": rounds}),
            )
        config = self.check_policy(spec)
        # the run's spec, fixed on first contact; another spec later is `run.spec_changed`
        pins.fix_run_spec(self.ledger_dir, self.dataset_id, run_id, spec, self.name)
        if evaluation.evaluated_start(self.ledger(), run_id):
            raise PolicyError(
                f"hospital {self.name}: run {run_id} evaluated its starting adapter alone here "
                "(an evaluate-only run), so it trains nothing here; refused, nothing spent",
                reason=Reason("run.evaluate_only"),
            )
        self._round = (run_id, server_round, rounds)
        if not config.spec.privacy.dp:
            return config, None
        ledger = self.ledger()
        recorded = next(
            (e for e in ledger.entries if e.run_id == run_id and e.round == server_round), None
        )
        if recorded is None:
            ledger.check_round(run_id, server_round, rounds)  # never backwards
            if spec.model.init_adapter and server_round > 1 and self._first_round_here(run_id):
                initial = initial_arrays(spec.model, spec.task, spec.training.seed)
                pins.check_starting_arrays(initial, global_arrays, self.name)
            return config, None
        if recorded.status != "spent":
            raise PolicyError(
                f"round {server_round} of run {run_id} is reserved on this data set: it is being "
                "trained by another request, or its process died (the reservation counts as "
                "spent; `fedward client ledger` shows it). A round is trained at most once",
                reason=Reason("round.repeated", {"round": server_round}),
            )
        return config, self._replay(run_id, server_round, global_arrays, recorded.epsilon_total)

    def _replay(
        self,
        run_id: str,
        server_round: int,
        global_arrays: dict[str, np.ndarray],
        epsilon_lifetime: float | None,
    ) -> TrainResult:
        """The update this data set already released for (run, round), sent again unchanged
        (nothing trained, nothing spent), or a refusal (client/site/releases.py)."""
        global_sha256 = wire.arrays_to_record(global_arrays).object_id
        kept = releases.load_release(self._release_path(run_id), self.name)
        release = releases.release_to_resend(kept, run_id, server_round, global_sha256, self.name)
        log.info(
            "%s: run %s round %d already released; resending it", self.name, run_id, server_round
        )
        result = TrainResult(
            delta=release.delta,
            num_examples=release.num_examples,
            train_loss=release.train_loss,
            epsilon_spent=release.epsilon_run,
            plan=release.plan,
            history=self.run_history(run_id, server_round + 1),
        )
        self._audit_release("replay", run_id, server_round, result, global_sha256, epsilon_lifetime)
        return result

    def _first_round_here(self, run_id: str) -> bool:
        """Whether this data set trains its first round of the run, whatever its number: there
        the starting adapter is checked against its pin (issue 40: a coordinator that first
        asked a hospital at round 2 skipped the check of round 1, client/app.py). Once the
        data set has a round of the run in its ledger, the global adapters that follow are
        the coordinator's averages."""
        return not any(entry.run_id == run_id for entry in self.ledger().entries)

    def pinned_policy(self) -> SitePolicy:
        """The policy with its models, starting adapter and unit pinned (client/site/pins.py)."""
        return pins.pinned_policy(self.policy, self.schema)

    def update_weight(self) -> int:
        """The weight this hospital's update carries in the federation's average: the one its
        policy declares (`aggregation_weight`), never its training count (issue 40: from the
        sums of rotating cohorts the coordinator solved for every hospital's exact count)."""
        return self.policy.aggregation_weight

    # --- gate 2: data loaded, no step taken ------------------------------------------------

    def ledger(self) -> PrivacyLedger:
        """The privacy ledger of this hospital's data set, keyed by its data-set id; the data
        file's SHA-256 is taken now (client/site/budget.py)."""
        if self._ledger is None:
            self._ledger, self._data_sha256 = budget.open_ledger(
                self.ledger_dir, self.dataset_id, self.data_path, self.name
            )
        return self._ledger

    def run_history(self, run_id: str, server_round: int) -> list[HistoryEntry]:
        """Accountant history of this run's rounds before `server_round` (the run's own budget;
        `check_budget` checks the lifetime budget against every run's)."""
        return budget.run_history(self.ledger(), run_id, server_round)

    def check_budget(
        self, privacy: PrivacySpec, training: TrainingSpec, dataset: EncodedDataset
    ) -> DPPlan | None:
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
        if privacy.dp:
            if self._round is None:
                raise RuntimeError("Site.check_budget called before Site.admit")
            run_id, server_round, rounds = self._round
            # its noise search is cached (client/privacy/accounting.py); an empty split is
            # planned as one unit and then refused, charged, below
            plan = plan_dp(privacy, training, rounds, max(privacy_units(privacy, dataset), 1))
            self.ledger().reserve(
                run_id,
                server_round,
                rounds,
                plan,
                privacy.delta,
                self.policy.lifetime_epsilon,
                data_sha256=self._data_sha256,
                budget_delta=self.policy.max_delta,
                unit=privacy.dp_unit,
                epsilon_bound=privacy.target_epsilon,  # the run's, whatever n is
            )
            self._reserved = (run_id, server_round)
        self.policy.check_examples(len(dataset))
        return plan

    # --- gate 3: trained, nothing sent yet -------------------------------------------------

    def record(
        self,
        privacy: PrivacySpec,
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
                privacy.delta,
                self._data_sha256,
                unit=privacy.dp_unit,
            )
            self._reserved = None
            lifetime = entry.epsilon_total
            path = self._release_path(run_id)
            releases.save_release(path, run_id, server_round, result, global_sha256)
        self._audit_release("train", run_id, server_round, result, global_sha256, lifetime, privacy)

    # --- any gate: a refusal --------------------------------------------------------------

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
        audit_refusal(
            self.audit, run_id, server_round, stage, exc, who=self.name, charged=bool(charged)
        )

    # --- evaluation: an accounted release ---------------------------------------------------

    def admit_evaluation(self, spec: RunSpec, run_id: str, server_round: int) -> LocalRun:
        """Before any record is read: refuse an evaluation the policy does not allow, one of a
        round this data set did not train (or not the final one), a second one of a round, or
        one the budget cannot pay for; then charge it (client/site/evaluation.py). Round 0 is an
        evaluate-only run's: the starting adapter (checked against the pin in client/app.py),
        once a run, where the policy allows it. Returns the config to evaluate with."""
        run_id = check_identifier(run_id, "run id")
        config = self.check_policy(spec)
        # the run's spec, fixed on first contact; another spec later is `run.spec_changed`
        pins.fix_run_spec(self.ledger_dir, self.dataset_id, run_id, spec, self.name)
        rounds = spec.federation.rounds
        evaluation.check_evaluation_allowed(
            self.policy, self.pinned_policy(), spec.privacy, rounds, run_id, server_round, self.name
        )
        if server_round != evaluation.START_ROUND:  # round 0: once a run, the ledger's check
            evaluation.check_evaluation_round(
                self.policy, self.ledger(), run_id, server_round, rounds, self.name
            )
        self._reserved = evaluation.charge_evaluation(
            self.ledger(),
            self.policy,
            run_id,
            server_round,
            rounds,
            self._data_sha256,
            self.name,
        )
        return config

    def release_evaluation(
        self, run_id: str, server_round: int, predictions: Predictions
    ) -> dict[str, float]:
        """Confirm the charge made at admission, then noise the counts: the metrics that may
        leave (Gaussian mechanism at the policy's evaluation_epsilon and max_delta,
        client/privacy/release.py)."""
        entry, released = evaluation.confirm_and_noise(
            self.ledger(), self.policy, run_id, server_round, predictions, self._data_sha256
        )
        self._reserved = None
        self.audit.append(
            "evaluation",
            run_id=str(run_id),
            round=server_round,
            hospital=self.name,
            epsilon_evaluation=self.policy.evaluation_epsilon,
            epsilon_lifetime=entry.epsilon_total,
            exact=finite_values(exact_metrics(predictions)),
            released=finite_values(released),
        )
        return released

    # --- after the run: kept at home --------------------------------------------------------

    def keep_own_model(self, run_id: str, own: OwnModel) -> None:
        """Write this hospital's own adapter and its alone / global / own report to
        `<ledger>/own/<data set>/<run id>/` (private to the hospital's account: the adapter is
        not DP and must not be shared), and note it in the audit log. Nothing is sent."""
        folder = self.ledger_dir / OWN_FOLDER / self.dataset_id / str(run_id)
        folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        keep_at_home(own, folder, self.name)
        self.audit.append(
            "own_model",
            run_id=str(run_id),
            hospital=self.name,
            folder=str(folder),
            **{key: value for key, value in own.report.as_dict().items() if key != "selection"},
        )

    def secagg_identity(self) -> SecAggIdentity:
        """The signing key and roster pinned in this hospital's site policy."""
        return SecAggIdentity.from_policy(self.policy, self.name, self.ledger_dir / "secagg")

    # --- internals -------------------------------------------------------------------------

    def _release_path(self, run_id: str) -> Path:
        return releases.release_path(self.ledger_dir, self.dataset_id, run_id)

    def _audit_release(
        self,
        action: str,
        run_id: str,
        server_round: int,
        result: TrainResult,
        global_sha256: str,
        epsilon_lifetime: float | None,
        privacy: PrivacySpec | None = None,
    ) -> None:
        audit_release(
            self.audit,
            action,
            run_id,
            server_round,
            result,
            who=self.name,
            dataset={
                "dataset": self.dataset_id,
                "dataset_sha256": self._data_sha256,
                "init_adapter_sha256": self._adapter_sha256,
            },
            global_sha256=global_sha256,
            epsilon_lifetime=epsilon_lifetime,
            lifetime_epsilon=self.policy.lifetime_epsilon,
            privacy=privacy,
        )
