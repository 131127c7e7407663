"""The hospital's privacy ledger: every DP release made from one local data set, over all runs.

DP guarantees compose: each round a hospital trains with DP-SGD releases a little more about its
records, and the total is what matters. The ledger keeps, per local data set, the history of the
Opacus RDP accountant (noise multiplier, sample rate, steps) for every round of every run, so
that a new run, a resumed run and a new process all continue the same composition. The
arithmetic is `client.privacy`'s, the same the trainer calibrates its noise with.

One JSON file per data set, `<ledger folder>/<fingerprint>.json`, where the fingerprint is the
SHA-256 of the data file bytes (`dataset_fingerprint`). Writes are atomic (`common.atomic`) and
serialised with a lock file (`common.locking`), so a crash or a second process never loses a
recorded round.

A note on keys: if the records of a data set change (records added or removed), its fingerprint
changes and a fresh ledger starts. The records it shares with the old version have then been
used under two budgets. A hospital that grows its data set should keep the same ledger key by
passing its own stable name as the fingerprint (`PrivacyLedger.open(folder, "icu-notes")`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedward.client.privacy import DPPlan, HistoryEntry, compose_epsilon, projected_epsilon
from fedward.common.atomic import write_json_atomic
from fedward.common.digest import content_sha256
from fedward.common.errors import DataError, PrivacyBudgetExceeded
from fedward.common.locking import exclusive_lock

logger = logging.getLogger(__name__)

LEDGER_FORMAT = "fedward-privacy-ledger"
LEDGER_VERSION = 1

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LedgerEntry(BaseModel):
    """One round of DP training on the data set, as recorded after the round was trained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str = Field(..., min_length=1)
    round: int = Field(..., ge=0)
    noise_multiplier: float = Field(..., gt=0)
    sample_rate: float = Field(..., gt=0, le=1)
    steps: int = Field(..., ge=1)
    delta: float = Field(..., gt=0, lt=1)
    epsilon_round: float = Field(..., ge=0, description="This round alone, at `delta`.")
    epsilon_total: float = Field(..., ge=0, description="All rounds so far, at `delta`.")
    recorded_at: str


class _LedgerFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str
    version: int
    dataset: str
    description: str | None = None
    accountant: str = "rdp"
    entries: list[LedgerEntry]


@dataclass(frozen=True)
class LedgerRow:
    """One printable row of `fedward client ledger`: a recorded round and the running total."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_round: float
    epsilon_total: float
    recorded_at: str


def dataset_fingerprint(path: str | Path) -> str:
    """SHA-256 (hex) of a data set's bytes: the file, or every file of a folder in sorted order.

    For a folder each file contributes its relative path, its size and its bytes, so renaming,
    moving or editing any file changes the fingerprint (`common.digest.content_sha256`). Raises
    `DataError` when the path is missing or the folder holds no file.
    """
    try:
        return content_sha256(path)
    except FileNotFoundError:
        raise DataError(f"{path}: data set not found; check the data path") from None
    except ValueError:
        raise DataError(f"{path}: data folder is empty; nothing to fingerprint") from None


class PrivacyLedger:
    """The DP history of one local data set, persisted as one JSON file.

    Use `PrivacyLedger.open(folder, fingerprint)`; nothing is written until the first `record`.
    Before a round: `check_budget(...)`. After the round trained: `record(...)`.
    """

    def __init__(
        self,
        path: Path,
        dataset: str,
        entries: list[LedgerEntry] | None = None,
        description: str | None = None,
    ) -> None:
        self.path = path
        self.dataset = dataset
        self.entries: list[LedgerEntry] = list(entries or [])
        self.description = description

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, folder: str | Path, fingerprint: str, description: str | None = None
    ) -> PrivacyLedger:
        """The ledger of data set `fingerprint` in `folder` (empty if none was recorded yet).

        `description` (e.g. the data path) is shown by `describe`; it stays on this machine.
        """
        if not _KEY.match(fingerprint):
            raise DataError(
                f"ledger key {fingerprint!r}: use letters, digits, '.', '_' or '-' "
                "(at most 128), e.g. the output of dataset_fingerprint"
            )
        folder = Path(folder)
        path = folder / f"{fingerprint}.json"
        if path.exists():
            ledger = cls.load(path)
            if description and ledger.description is None:
                ledger.description = description
            return ledger
        return cls(path, fingerprint, description=description)

    @classmethod
    def for_dataset(cls, folder: str | Path, data_path: str | Path) -> PrivacyLedger:
        """Open the ledger of the data set at `data_path`, keyed by its content fingerprint."""
        return cls.open(folder, dataset_fingerprint(data_path), description=str(data_path))

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        """Read a ledger file; an unreadable or malformed one raises `DataError` naming it."""
        path = Path(path)
        advice = (
            "restore it from a backup; do not delete it, that would reset this data set's "
            "privacy budget"
        )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: privacy ledger not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read privacy ledger ({exc}); {advice}") from None
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: privacy ledger is corrupt at line {exc.lineno} ({exc.msg}); {advice}"
            ) from None
        try:
            parsed = _LedgerFile.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(item) for item in first["loc"]) or "file"
            raise DataError(
                f"{path}: privacy ledger is malformed at '{where}' ({first['msg']}); {advice}"
            ) from None
        if parsed.format != LEDGER_FORMAT or parsed.version != LEDGER_VERSION:
            raise DataError(
                f"{path}: not a fedward privacy ledger version {LEDGER_VERSION} "
                f"(format {parsed.format!r}, version {parsed.version}); {advice}"
            )
        return cls(path, parsed.dataset, parsed.entries, parsed.description)

    @classmethod
    def all_in(cls, folder: str | Path) -> list[PrivacyLedger]:
        """Every ledger in `folder`, sorted by file name (for `fedward client ledger`)."""
        return [cls.load(path) for path in sorted(Path(folder).glob("*.json"))]

    # --- arithmetic ----------------------------------------------------------------------------

    @property
    def history(self) -> list[HistoryEntry]:
        """The accountant history of every recorded round, oldest first."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon_spent(self, delta: float) -> float:
        """Epsilon this data set has spent over every recorded round, at `delta`."""
        return compose_epsilon(self.history, delta)

    def projected_epsilon(
        self, delta: float, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Epsilon spent after training `steps` more steps with these settings, at `delta`."""
        return projected_epsilon(self.history, DPPlan(noise_multiplier, sample_rate, steps), delta)

    def check_budget(
        self,
        max_epsilon: float,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> float:
        """Refuse (raise `PrivacyBudgetExceeded`) a round that would go past `max_epsilon`.

        Call before any training step. Returns the projected epsilon when the round fits.
        """
        projected = self.projected_epsilon(delta, noise_multiplier, sample_rate, steps)
        if projected > max_epsilon:
            spent = self.epsilon_spent(delta)
            raise PrivacyBudgetExceeded(
                f"data set {self._name()}: privacy budget would be exceeded: spent epsilon "
                f"{spent:.3f}, after this round {projected:.3f}, site limit {max_epsilon:g} "
                f"(delta {delta:g}); no step was taken. Training on this data set must stop, "
                "or the data owner must raise max_epsilon in the site policy"
            )
        return projected

    # --- recording -----------------------------------------------------------------------------

    def record(
        self,
        run_id: str,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
    ) -> LedgerEntry:
        """Add one trained round and write the file atomically; returns the entry.

        Idempotent per `(run_id, round)`: recording a round that is already in the ledger
        changes nothing and returns the stored entry, so a resumed run never counts a round
        twice. (This assumes a round's update is released at most once; a round whose
        aggregate was released and is then trained again must be recorded under a new key.)
        The file is re-read under a lock first, so rounds recorded by another process survive.
        """
        run_id = str(run_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.path.with_name(self.path.name + ".lock")):
            if self.path.exists():
                on_disk = PrivacyLedger.load(self.path)
                self.entries = on_disk.entries
                self.description = self.description or on_disk.description
            for entry in self.entries:
                if entry.run_id == run_id and entry.round == round:
                    logger.info(
                        "ledger %s: run %s round %d already recorded; not counted again",
                        self._name(),
                        run_id,
                        round,
                    )
                    return entry
            step: HistoryEntry = (noise_multiplier, sample_rate, steps)
            entry = LedgerEntry(
                run_id=run_id,
                round=round,
                noise_multiplier=noise_multiplier,
                sample_rate=sample_rate,
                steps=steps,
                delta=delta,
                epsilon_round=_finite(compose_epsilon([step], delta)),
                epsilon_total=_finite(compose_epsilon([*self.history, step], delta)),
                recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            self._write([*self.entries, entry])
            self.entries.append(entry)
        logger.info(
            "ledger %s: recorded run %s round %d, epsilon spent %.3f (delta %g)",
            self._name(),
            run_id,
            round,
            entry.epsilon_total,
            delta,
        )
        return entry

    def rounds_recorded(self, run_id: str) -> list[int]:
        """The rounds of `run_id` already in the ledger, ascending."""
        return sorted(e.round for e in self.entries if e.run_id == str(run_id))

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
                )
            )
        return rows

    # --- internals -----------------------------------------------------------------------------

    def _name(self) -> str:
        short = self.dataset[:12]
        return f"{short} ({self.description})" if self.description else short

    def _write(self, entries: list[LedgerEntry]) -> None:
        document = {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "dataset": self.dataset,
            "description": self.description,
            "accountant": "rdp",
            "entries": [entry.model_dump() for entry in entries],
        }
        write_json_atomic(self.path, document)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"epsilon {value} is not finite; check noise_multiplier and steps")
    return value
