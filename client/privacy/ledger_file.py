"""The privacy ledger's file: its format and version, one entry per recorded round with the
running total, the identifiers allowed in its file names, and the data set's fingerprint.
Reading and checking a file is here; what a ledger allows and records is client/privacy/ledger.py.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedward.client.privacy.accounting import DPPlan, HistoryEntry, compose_epsilon
from fedward.common.errors import DataError, PolicyError
from fedward.common.files.digest import content_sha256
from fedward.common.protocol.reasons import Reason

LEDGER_FORMAT = "fedward-privacy-ledger"
LEDGER_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: keyed by the data hash, no reservations

#: Identifiers used in file names: run ids from the coordinator, data-set ids from the hospital.
#: Letters, digits, '_' and '-', starting with a letter or digit, at most 64: no '.', no '/',
#: no NUL, nothing a file system reads as a path.
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
OLD_KEY = re.compile(r"[0-9a-f]{64}")  # the file name of a version-1 (hash-keyed) ledger

SPENT = "spent"
RESERVED = "reserved"


def check_identifier(value: object, what: str) -> str:
    """`value` if it is a safe identifier (`IDENTIFIER`); else `PolicyError` naming `what`.

    The message quotes at most a short, printable prefix of the value: it may come from the
    coordinator and goes back to it.

    Args:
        value: The identifier to check (a run id from the coordinator, a data-set id); any
            type, only a `str` can pass.
        what: What it is, for the message ("run id").

    Returns:
        `value`, unchanged.

    Raises:
        PolicyError: (`identifier.invalid`) `value` is not a string of 1 to 64 letters, digits,
            '_' or '-' starting with a letter or digit.
    """
    text = value if isinstance(value, str) else None
    if text is None or not IDENTIFIER.fullmatch(text):
        shown = repr(text[:24]) if text is not None and text[:24].isprintable() else "(hidden)"
        raise PolicyError(
            f"{what} {shown} is not a plain identifier: use 1 to 64 letters, digits, '_' or '-', "
            "starting with a letter or digit; refused before any file was touched",
            reason=Reason("identifier.invalid"),
        )
    return text


class LedgerEntry(BaseModel):
    """One round of DP training on the data set: reserved before its first step, spent after.

    A `reserved` entry counts exactly like a spent one: it is either a round in progress or one
    whose process died before it could confirm or release it (fail safe).
    """

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
    status: Literal["spent", "reserved"] = Field(
        SPENT, description="reserved: planned before the first step, not yet confirmed."
    )
    data_sha256: str | None = Field(
        None, description="SHA-256 of the data file when the round was reserved (audit only)."
    )
    unit: Literal["record", "patient"] = Field(
        "record", description="What this entry's epsilon protects: a record or a patient."
    )
    epsilon_bound: float | None = Field(
        None,
        ge=0,
        description="What the budget gate charged for this entry, a bound that does not depend "
        "on the data: a run's target epsilon at its first entry (0 after), a release's own "
        "epsilon. None: entries written before issue 40, counted at the accountant's epsilon.",
    )


class LedgerFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str
    version: int
    dataset: str
    description: str | None = None
    accountant: str = "rdp"
    migrated_from: list[str] = Field(default_factory=list)
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
    status: str = SPENT
    data_sha256: str | None = None
    unit: str = "record"


def dataset_fingerprint(path: str | Path) -> str:
    """SHA-256 (hex) of a data set's bytes: the file, or every file of a folder in sorted order.

    Each file contributes its relative path (a single file: its name), its size and its bytes,
    so renaming, moving or editing any file changes the fingerprint
    (`common/files/digest.py`, `content_sha256`); it is not the plain SHA-256 of a file. It is
    recorded with each ledger entry (and was the ledger key before version 2).

    Args:
        path: The data file, or a folder whose files (at any depth) make the data set.

    Returns:
        64 lowercase hex characters.

    Raises:
        DataError: the path is missing (or neither a file nor a folder), or the folder holds
            no file.
    """
    try:
        return content_sha256(path)
    except FileNotFoundError:
        raise DataError(f"{path}: data set not found; check the data path") from None
    except ValueError:
        raise DataError(f"{path}: data folder is empty; nothing to fingerprint") from None


def read_ledger_file(path: Path) -> tuple[LedgerFile, list[LedgerEntry]]:
    """A ledger file as written and its entries (a version-1 file's with their data hash); an
    unreadable or malformed one raises `DataError` naming it."""
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
        parsed = LedgerFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(item) for item in first["loc"]) or "file"
        raise DataError(
            f"{path}: privacy ledger is malformed at '{where}' ({first['msg']}); {advice}"
        ) from None
    if parsed.format != LEDGER_FORMAT or parsed.version not in READABLE_VERSIONS:
        raise DataError(
            f"{path}: not a fedward privacy ledger version {LEDGER_VERSION} "
            f"(format {parsed.format!r}, version {parsed.version}); {advice}"
        )
    entries = parsed.entries
    if parsed.version == 1:  # keyed by the data hash: that hash is each entry's data_sha256
        entries = [e.model_copy(update={"data_sha256": parsed.dataset}) for e in entries]
    return parsed, entries


def new_entry(
    run_id: str,
    round: int,
    plan: DPPlan,
    delta: float,
    status: str,
    data_sha256: str | None,
    before: list[HistoryEntry],
    unit: str = "record",
) -> LedgerEntry:
    step: HistoryEntry = (plan.noise_multiplier, plan.sample_rate, plan.steps)
    return LedgerEntry(
        run_id=run_id,
        round=round,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        delta=delta,
        epsilon_round=finite(compose_epsilon([step], delta)),
        epsilon_total=finite(compose_epsilon([*before, step], delta)),
        recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        status=status,
        data_sha256=data_sha256,
        unit=unit,
    )


def with_totals(entries: list[LedgerEntry]) -> list[LedgerEntry]:
    """`entries` with each running total recomputed (after one was added, changed or dropped)."""
    history: list[HistoryEntry] = []
    out = []
    for entry in entries:
        history.append((entry.noise_multiplier, entry.sample_rate, entry.steps))
        total = finite(compose_epsilon(history, entry.delta))
        out.append(entry.model_copy(update={"epsilon_total": total}))
    return out


def finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"epsilon {value} is not finite; check noise_multiplier and steps")
    return value
