"""The hospital's privacy ledger: every DP release made from one local data set, over all runs.

DP guarantees compose: each round a hospital trains with DP-SGD releases a little more about its
records, and the total is what matters. The ledger keeps, per local data set, the history of the
Opacus RDP accountant (noise multiplier, sample rate, steps) for every round of every run, so
that a new run, a resumed run and a new process all continue the same composition. The
arithmetic is `client.privacy`'s, the same the trainer calibrates its noise with.

One JSON file per data set, `<ledger folder>/<dataset id>.json`. The data-set id is a name the
hospital chooses (`fedward client start --dataset-id`, default the hospital's name), not the
hash of the data file: a coordinator cannot make a data set look new, and a hospital that adds or
corrects records keeps spending the same budget. The data file's SHA-256 at the time of each
round is kept in that round's entry, for the audit.

Threats this module guards against (a dishonest coordinator, or two runs sharing a data set):
- *Reset*: the key does not follow the file's bytes, so appending a record starts nothing new.
  A ledger written by an older fedward (`<sha256 of the data>.json`) is carried over into the
  named ledger the first time that data set is opened by name (`migrate_hash_ledger`).
- *Race*: checking the budget and recording a round happen under one exclusive lock across
  processes (`common.locking`). `reserve` checks and writes the planned round as a reservation
  before the first DP step, so a concurrent request already sees it; `confirm` turns it into a
  spent round after training, `release` drops it when training failed and nothing left. A
  process that dies in between leaves the reservation, and a reservation counts as spent: the
  ledger fails safe, never under-counts (`fedward client ledger` shows such rows as reserved).
- *Replays and crafted rounds*: a (run, round) is reserved at most once; a round outside
  1..rounds, or below a round this run already reserved, is refused (`PolicyError`).
- *Mixed units*: every entry names its DP unit (`record` or `patient`); epsilons of different
  units do not compose into one number (a record-level epsilon says nothing per patient but by
  group privacy), so a data set spends in one unit for its whole life: a request in another
  unit is refused before any step (`ledger.unit_mixed`). Older ledgers' entries are records.
- *Paths*: run ids and data-set ids are checked against a strict pattern (`check_identifier`)
  before they are used in any file name.

Writes are atomic (`common.atomic`), so a crash never leaves half a ledger.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from fedward.client.privacy.accounting import (
    DPPlan,
    HistoryEntry,
    compose_epsilon,
    projected_epsilon,
)
from fedward.client.privacy.ledger_file import (
    IDENTIFIER,
    LEDGER_FORMAT,
    LEDGER_VERSION,
    OLD_KEY,
    RESERVED,
    SPENT,
    LedgerEntry,
    LedgerRow,
    check_identifier,
    dataset_fingerprint,
    new_entry,
    read_ledger_file,
    with_totals,
)
from fedward.common.errors import DataError, PolicyError, PrivacyBudgetExceeded
from fedward.common.files.atomic import write_json_atomic
from fedward.common.files.locking import exclusive_lock
from fedward.common.protocol.reasons import Reason

logger = logging.getLogger(__name__)

#: The ledger's file format (client/privacy/ledger_file.py) lived here; its old import paths
#: still work.
__all__ = [
    "IDENTIFIER",
    "RESERVED",
    "SPENT",
    "LedgerEntry",
    "LedgerRow",
    "PrivacyLedger",
    "check_identifier",
    "dataset_fingerprint",
]


class PrivacyLedger:
    """The DP history of one local data set, persisted as one JSON file.

    Use `PrivacyLedger.open(folder, dataset_id)`; nothing is written until the first change.
    A training request: `reserve(...)` before the first step (checks the round and the budget
    and writes a reservation, atomically under the lock), then `confirm(...)` once trained or
    `release(...)` if it failed before anything left.
    """

    def __init__(
        self,
        path: Path,
        dataset: str,
        entries: list[LedgerEntry] | None = None,
        description: str | None = None,
        migrated_from: list[str] | None = None,
    ) -> None:
        self.path = path
        self.dataset = dataset
        self.entries: list[LedgerEntry] = list(entries or [])
        self.description = description
        self.migrated_from: list[str] = list(migrated_from or [])

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, folder: str | Path, dataset_id: str, description: str | None = None
    ) -> PrivacyLedger:
        """The ledger of data set `dataset_id` in `folder` (empty if none was recorded yet).

        `description` (e.g. the data path) is shown by `describe`; it stays on this machine.
        """
        try:
            check_identifier(dataset_id, "ledger key (data-set id)")
        except PolicyError as exc:
            raise DataError(str(exc)) from None
        path = Path(folder) / f"{dataset_id}.json"
        if path.exists():
            ledger = cls.load(path)
            if description and ledger.description is None:
                ledger.description = description
            return ledger
        return cls(path, dataset_id, description=description)

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        """Read a ledger file; an unreadable or malformed one raises `DataError` naming it."""
        path = Path(path)
        parsed, entries = read_ledger_file(path)
        return cls(path, parsed.dataset, entries, parsed.description, parsed.migrated_from)

    @classmethod
    def all_in(cls, folder: str | Path) -> list[PrivacyLedger]:
        """Every ledger in `folder`, sorted by file name (for `fedward client ledger`)."""
        return [cls.load(path) for path in sorted(Path(folder).glob("*.json"))]

    def migrate_hash_ledger(self, data_sha256: str) -> int:
        """Carry over the entries of a version-1 ledger of this data (`<data_sha256>.json`).

        Older fedward keyed ledgers by the data file's hash. If such a file exists for the
        current data, its rounds are spent budget of this data set: they are added here (a
        (run, round) already present is not added twice), and the old file is renamed to
        `<hash>.json.migrated` so it is neither listed nor carried over again. Returns the
        number of entries carried over.
        """
        if not OLD_KEY.fullmatch(data_sha256):
            raise ValueError(f"not a SHA-256 hex digest: {data_sha256!r}")
        old_path = self.path.with_name(f"{data_sha256}.json")
        if old_path == self.path or not old_path.exists():
            return 0
        with self._locked():
            if not old_path.exists():  # another process migrated it meanwhile
                return 0
            old = PrivacyLedger.load(old_path)
            present = {(e.run_id, e.round) for e in self.entries}
            carried = [e for e in old.entries if (e.run_id, e.round) not in present]
            self.migrated_from.append(data_sha256)
            self._write_entries(with_totals([*carried, *self.entries]))
            old_path.replace(old_path.with_name(old_path.name + ".migrated"))
        logger.warning(
            "ledger %s: carried over %d rounds from the hash-keyed ledger %s",
            self.dataset,
            len(carried),
            old_path.name,
        )
        return len(carried)

    # --- arithmetic ----------------------------------------------------------------------------

    @property
    def history(self) -> list[HistoryEntry]:
        """The accountant history of every recorded round (reserved ones too), oldest first."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon_spent(self, delta: float) -> float:
        """Epsilon this data set has spent over every recorded round, at `delta`.

        Reservations count as spent (a round in progress, or one a crash left unconfirmed).
        """
        return compose_epsilon(self.history, delta)

    def projected_epsilon(
        self, delta: float, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Epsilon spent after training `steps` more steps with these settings, at `delta`."""
        return projected_epsilon(self.history, DPPlan(noise_multiplier, sample_rate, steps), delta)

    def check_budget(
        self,
        lifetime_epsilon: float,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        unit: str = "record",
    ) -> float:
        """Refuse (raise `PrivacyBudgetExceeded`) a round that would go past `lifetime_epsilon`
        (per `unit`, as every entry of this data set).

        Looks at this object's entries only; `reserve` runs the same check under the lock on
        what is on disk. Returns the projected epsilon when the round fits.
        """
        projected = self.projected_epsilon(delta, noise_multiplier, sample_rate, steps)
        if projected > lifetime_epsilon:
            spent = self.epsilon_spent(delta)
            reserved = len(self.reservations())
            pending = f" (including {reserved} reserved rounds)" if reserved else ""
            raise PrivacyBudgetExceeded(
                f"data set {self.dataset}: privacy budget would be exceeded: spent epsilon "
                f"{spent:.3f} per {unit}{pending}, after this round {projected:.3f}, site limit "
                f"{lifetime_epsilon:g} (delta {delta:g}); no step was taken. Training on this data "
                "set must stop, or the data owner must raise lifetime_epsilon in the site policy"
            )
        return projected

    def epsilon_charged(self, delta: float) -> float:
        """What the budget gate has charged this data set: the sum of its entries' bounds
        (`epsilon_bound`), plus the accountant's epsilon of entries written without one.

        The sum is basic composition: the data set's releases together are (sum of bounds,
        sum of their deltas)-DP. It never depends on the records, unlike the accountant's
        figure (`epsilon_spent`), which through the sample rate depends on the unit count.
        """
        unbound = [
            (e.noise_multiplier, e.sample_rate, e.steps)
            for e in self.entries
            if e.epsilon_bound is None
        ]
        bound = sum(e.epsilon_bound for e in self.entries if e.epsilon_bound is not None)
        return bound + compose_epsilon(unbound, delta)

    def bound_of(self, run_id: str, epsilon_bound: float, per: str) -> float:
        """The charge of one more entry of `run_id`: `epsilon_bound` for each entry (`per`
        "entry": a release), or once for the run's first entry (`per` "run": the run's target
        bounds all of its rounds together; a run whose entries predate the bounds is charged
        again, in full)."""
        charged = any(e.run_id == run_id and e.epsilon_bound is not None for e in self.entries)
        if per == "run" and charged:
            return 0.0
        return epsilon_bound

    def check_bound(self, lifetime_epsilon: float, delta: float, charge: float, unit: str) -> None:
        """Refuse (raise `PrivacyBudgetExceeded`) an entry whose data-independent charge would
        take `epsilon_charged` past `lifetime_epsilon`: the same answer for every data set with
        the same ledger of requests (issue 40: the accountant's projection told a data set's
        unit count, one bit per free refusal)."""
        charged = self.epsilon_charged(delta)
        if charge > 0 and charged + charge > lifetime_epsilon * (1 + 1e-9):
            reserved = len(self.reservations())
            pending = f" (including {reserved} reserved rounds)" if reserved else ""
            raise PrivacyBudgetExceeded(
                f"data set {self.dataset}: privacy budget would be exceeded: charged epsilon "
                f"{charged:.3f} per {unit}{pending}, with this request {charged + charge:.3f}, "
                f"site limit {lifetime_epsilon:g}; no step was taken. Training on this data set "
                "must stop, or the data owner must raise lifetime_epsilon in the site policy"
            )

    def check_round(self, run_id: str, round: int, rounds: int) -> None:
        """Refuse (`PolicyError`) a round outside 1..`rounds` or below one this run reserved.

        A round equal to one already recorded is the caller's to handle (a replay, or a
        refusal in `reserve`).
        """
        if not 1 <= round <= rounds:
            raise PolicyError(
                f"round {round} is outside the run's rounds 1..{rounds}; refused, nothing spent",
                reason=Reason("round.out_of_range", {"round": round, "rounds": rounds}),
            )
        later = [e.round for e in self.entries if e.run_id == run_id and e.round > round]
        if later:
            raise PolicyError(
                f"round {round} of run {run_id} comes after round {max(later)} of the same run "
                "on this data set: rounds never go backwards; refused, nothing spent",
                reason=Reason("round.backwards", {"round": round}),
            )

    # --- recording -----------------------------------------------------------------------------

    def reserve(
        self,
        run_id: str,
        round: int,
        rounds: int,
        plan: DPPlan,
        delta: float,
        lifetime_epsilon: float,
        data_sha256: str | None = None,
        budget_delta: float | None = None,
        unit: str = "record",
        epsilon_bound: float | None = None,
        bound_per: Literal["run", "entry"] = "run",
    ) -> LedgerEntry:
        """Check the round and the budget and write this round as reserved, in one locked step.

        Call before the first DP step. The ledger is re-read under the lock, so a concurrent
        request's reservation is counted. The entry is recorded at `delta` (the run's); the
        budget is checked at `budget_delta` (the site's max_delta; default `delta`). Raises
        `PolicyError` (a crafted or repeated round, or a `unit` other than the data set's) or
        `PrivacyBudgetExceeded` and then writes nothing.

        With `epsilon_bound` (what a deployed hospital passes) the budget is checked on
        data-independent charges (`check_bound`): the bound once per run (`bound_per` "run":
        a run's target epsilon covers all its rounds) or for every entry ("entry": a release).
        Without it, on the accountant's projection (`check_budget`), which depends on the plan.
        """
        run_id = check_identifier(run_id, "run id")
        with self._locked():
            self._reload()
            self.check_unit(unit)
            self.check_round(run_id, round, rounds)
            if any(e.run_id == run_id and e.round == round for e in self.entries):
                raise PolicyError(
                    f"round {round} of run {run_id} is already recorded on this data set "
                    "(trained, in progress, or interrupted); a round is trained at most once",
                    reason=Reason("round.repeated", {"round": round}),
                )
            at_delta = delta if budget_delta is None else budget_delta
            charge = None
            if epsilon_bound is None:
                self.check_budget(
                    lifetime_epsilon,
                    at_delta,
                    plan.noise_multiplier,
                    plan.sample_rate,
                    plan.steps,
                    unit,
                )
            else:
                charge = self.bound_of(run_id, epsilon_bound, bound_per)
                self.check_bound(lifetime_epsilon, at_delta, charge, unit)
            entry = new_entry(
                run_id, round, plan, delta, RESERVED, data_sha256, self.history, unit
            ).model_copy(update={"epsilon_bound": charge})
            self._write_entries([*self.entries, entry])
        logger.info(
            "ledger %s: reserved run %s round %d, epsilon %.3f per %s with it",
            self.dataset,
            run_id,
            round,
            entry.epsilon_total,
            unit,
        )
        return entry

    def confirm(
        self,
        run_id: str,
        round: int,
        plan: DPPlan,
        delta: float,
        data_sha256: str | None = None,
        unit: str = "record",
    ) -> LedgerEntry:
        """Turn the reservation of (run, round) into a spent round, with the plan trained.

        Without a reservation (it was released by another process, say) the round is added as
        spent: a trained round is always counted.
        """
        with self._locked():
            self._reload()
            index = next(
                (i for i, e in enumerate(self.entries) if (e.run_id, e.round) == (run_id, round)),
                None,
            )
            if index is not None and self.entries[index].status == SPENT:
                return self.entries[index]
            others = [e for i, e in enumerate(self.entries) if i != index]
            if index is None:
                self.check_unit(unit)
            entry = new_entry(run_id, round, plan, delta, SPENT, data_sha256, [], unit)
            if index is not None:  # what the gate charged for it stays charged
                entry = entry.model_copy(
                    update={"epsilon_bound": self.entries[index].epsilon_bound}
                )
            if index is None:
                logger.warning(
                    "ledger %s: run %s round %d had no reservation; recorded as spent",
                    self.dataset,
                    run_id,
                    round,
                )
                entries = [*others, entry]
            else:
                entries = [*self.entries[:index], entry, *self.entries[index + 1 :]]
            entries = with_totals(entries)
            self._write_entries(entries)
        confirmed = next(e for e in self.entries if (e.run_id, e.round) == (run_id, round))
        logger.info(
            "ledger %s: recorded run %s round %d, epsilon spent %.3f (delta %g)",
            self.dataset,
            run_id,
            round,
            confirmed.epsilon_total,
            delta,
        )
        return confirmed

    def release(self, run_id: str, round: int) -> bool:
        """Drop the reservation of (run, round): its training failed and nothing left.

        A spent round is never dropped. Returns whether a reservation was removed.
        """
        with self._locked():
            self._reload()
            kept = [
                e
                for e in self.entries
                if not ((e.run_id, e.round) == (run_id, round) and e.status == RESERVED)
            ]
            if len(kept) == len(self.entries):
                return False
            self._write_entries(with_totals(kept))
        logger.info(
            "ledger %s: released the reservation of run %s round %d", self.dataset, run_id, round
        )
        return True

    def record(
        self,
        run_id: str,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        data_sha256: str | None = None,
        unit: str = "record",
    ) -> LedgerEntry:
        """Add one spent round directly (no reservation) and write the file atomically.

        Idempotent per `(run_id, round)`: a round already in the ledger changes nothing and
        the stored entry is returned. The file is re-read under the lock first, so rounds
        recorded by another process survive. A training request uses `reserve`/`confirm`.
        """
        run_id = str(run_id)
        with self._locked():
            self._reload()
            for entry in self.entries:
                if entry.run_id == run_id and entry.round == round:
                    logger.info(
                        "ledger %s: run %s round %d already recorded; not counted again",
                        self.dataset,
                        run_id,
                        round,
                    )
                    return entry
            self.check_unit(unit)
            plan = DPPlan(noise_multiplier, sample_rate, steps)
            entry = new_entry(run_id, round, plan, delta, SPENT, data_sha256, self.history, unit)
            self._write_entries([*self.entries, entry])
        logger.info(
            "ledger %s: recorded run %s round %d, epsilon spent %.3f (delta %g)",
            self.dataset,
            run_id,
            round,
            entry.epsilon_total,
            delta,
        )
        return entry

    @property
    def unit(self) -> str | None:
        """The DP unit this data set spends in (that of its entries); None before any."""
        return self.entries[0].unit if self.entries else None

    def check_unit(self, unit: str) -> None:
        """Refuse (`PolicyError`, nothing written) an entry in a unit other than the data
        set's: the ledger never composes epsilons of different units into one budget."""
        if self.unit is not None and unit != self.unit:
            raise PolicyError(
                f"data set {self.dataset} has spent its budget per {self.unit}; a request per "
                f"{unit} is refused (units are never mixed in one budget), nothing spent",
                reason=Reason("ledger.unit_mixed"),
            )

    def rounds_recorded(self, run_id: str) -> list[int]:
        """The rounds of `run_id` trained and confirmed (spent), ascending; see `reservations`
        for rounds reserved and not (yet) confirmed."""
        return sorted(
            e.round for e in self.entries if e.run_id == str(run_id) and e.status == SPENT
        )

    def reservations(self) -> list[LedgerEntry]:
        """Rounds reserved and never confirmed or released: in progress, or left by a crash."""
        return [e for e in self.entries if e.status == RESERVED]

    def describe(self, delta: float | None = None) -> list[LedgerRow]:
        """One row per recorded round with the running epsilon total.

        With `delta` the totals are recomputed at that delta (e.g. the policy's max_delta);
        without it each row shows the total at the delta it was recorded with.
        """
        rows = []
        for index, entry in enumerate(self.entries):
            row_delta = entry.delta if delta is None else delta
            epsilon_round, epsilon_total = entry.epsilon_round, entry.epsilon_total
            if delta is not None:
                epsilon_round = compose_epsilon([self.history[index]], delta)
                epsilon_total = compose_epsilon(self.history[: index + 1], delta)
            rows.append(
                LedgerRow(
                    run_id=entry.run_id,
                    round=entry.round,
                    noise_multiplier=entry.noise_multiplier,
                    sample_rate=entry.sample_rate,
                    steps=entry.steps,
                    delta=row_delta,
                    epsilon_round=epsilon_round,
                    epsilon_total=epsilon_total,
                    recorded_at=entry.recorded_at,
                    status=entry.status,
                    data_sha256=entry.data_sha256,
                    unit=entry.unit,
                )
            )
        return rows

    # --- internals -----------------------------------------------------------------------------

    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return exclusive_lock(self.path.with_name(self.path.name + ".lock"))

    def _reload(self) -> None:
        """Re-read the file (call under the lock): other processes may have written it."""
        if self.path.exists():
            on_disk = PrivacyLedger.load(self.path)
            self.entries = on_disk.entries
            self.description = self.description or on_disk.description
            self.migrated_from = on_disk.migrated_from or self.migrated_from

    def _write_entries(self, entries: list[LedgerEntry]) -> None:
        """Write `entries` atomically (under the lock), then adopt them."""
        document = {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "dataset": self.dataset,
            "description": self.description,
            "accountant": "rdp",
            "migrated_from": self.migrated_from,
            "entries": [entry.model_dump() for entry in entries],
        }
        write_json_atomic(self.path, document)
        self.entries = list(entries)
