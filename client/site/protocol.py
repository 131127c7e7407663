"""What the client app asks of a hospital's site: the gates around its training and
evaluation, in the order client/app.py calls them. A deployed hospital's `Site`
(client/site/gates.py) keeps a ledger, an audit log and its policy's pins; a simulated
hospital's (simulation/hospitals.py) accepts every run and reports exact figures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from flwr.app import Context

from fedward.client.own_model import OwnModel
from fedward.client.privacy.accounting import DPPlan, HistoryEntry
from fedward.client.privacy.release import Predictions
from fedward.client.secagg import SecAggIdentity
from fedward.client.trainer import TrainResult
from fedward.common.config import LocalRun, PrivacySpec, RunSpec, TrainingSpec
from fedward.common.data import EncodedDataset

__all__ = ["HospitalSite", "SiteOpener"]


class HospitalSite(Protocol):
    """The gates around a hospital's training: a real `Site` (client/site/gates.py) or a
    simulated one (simulation/hospitals.py)."""

    #: True only in simulation: training loss, example counts and exact metrics are reported,
    #: and an update is weighted by its training count.
    releases_exact_metrics: bool

    def check_policy(self, spec: RunSpec) -> LocalRun:
        """Accept the run spec (or raise); the config this hospital runs it with."""

    def admit(
        self, spec: RunSpec, run_id: str, server_round: int, global_arrays: dict
    ) -> tuple[LocalRun, TrainResult | None]:
        """Gate 1: the config to train with, and an update to resend (None: train)."""

    def run_history(self, run_id: str, server_round: int) -> list[HistoryEntry]:
        """The run's accountant history before `server_round`."""

    def check_budget(
        self, privacy: PrivacySpec, training: TrainingSpec, dataset: EncodedDataset
    ) -> DPPlan | None:
        """Gate 2: data loaded and encoded, no step taken, nothing checked that depends on the
        records; from here on a refusal is charged (deployed). Returns the round's DP plan
        (None without DP) for the run's rounds (`admit`), which training then uses: one plan
        per round."""

    def record(
        self,
        privacy: PrivacySpec,
        run_id: str,
        server_round: int,
        result: TrainResult,
        global_arrays,
    ) -> None:
        """Gate 3: trained, nothing sent yet."""

    def refused(self, run_id: str, server_round: int, stage: str, exc: Exception) -> None:
        """A refusal, for this hospital's own records."""

    def admit_evaluation(self, spec: RunSpec, run_id: str, server_round: int) -> LocalRun:
        """Before any record is read: may this evaluation be released? The config to use."""

    def release_evaluation(
        self, run_id: str, server_round: int, predictions: Predictions
    ) -> dict[str, float]:
        """The metrics that may leave, for predictions on the validation split."""

    def secagg_identity(self) -> SecAggIdentity:
        """This hospital's SecAgg+ signing key and the roster of keys it accepts."""

    def keep_own_model(self, run_id: str, own: OwnModel) -> None:
        """Keep this hospital's own adapter and its report where it keeps them (never sent)."""

    def update_weight(self) -> int:
        """Deployed: the weight this hospital declares for its update (never its count).
        Not asked of a site that `releases_exact_metrics` (simulation: the count)."""


#: Opens a hospital's site for one request.
SiteOpener = Callable[[Context], HospitalSite]
