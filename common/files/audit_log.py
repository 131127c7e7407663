"""Append-only, hash-chained audit log (JSON lines).

Each line is one record:

    {"fields": {...}, "hash": "...", "kind": "round", "prev": "...", "seq": 7,
     "time": "2025-01-01T12:00:00+00:00"}

`hash` is the SHA-256 of the record's canonical JSON without `hash` (sorted keys, no spaces), and
`prev` is the previous record's `hash` (the first record chains to `GENESIS`). Editing, removing,
reordering or truncating a record therefore breaks the chain at that line, and `verify` reports
the first broken line. Whoever rewrites the whole chain after an edit is only caught by comparing
the last hash with a copy kept elsewhere (the run report prints it; `verify(...,
expected_last_hash=...)` checks it).

Secrets never enter the log: a field whose name contains `secret`, `private`, `seed`, `share`,
`password`, `token` or `key` (at any depth) is written as `"<redacted>"` and a warning is logged.
We redact rather than refuse so that an audit write can never abort a training round; the cost is
that harmless names (the run's training `seed`, a `public_key`) are redacted too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedward.common.errors import DataError
from fedward.common.files.locking import exclusive_lock

logger = logging.getLogger(__name__)

#: `prev` of the first record.
GENESIS = hashlib.sha256(b"fedward audit log v1").hexdigest()

#: Substrings (case-insensitive) of field names whose values are never written.
SECRET_MARKERS = ("secret", "private", "seed", "share", "password", "token", "key")
REDACTED = "<redacted>"

_RECORD_KEYS = {"seq", "time", "kind", "fields", "prev", "hash"}
_KIND = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


def canonical_json(obj: Any) -> str:
    """The one serialisation that hashes are taken over: sorted keys, no spaces, UTF-8."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 (hex) of a record's canonical JSON, leaving out its own `hash` field."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def redact(value: Any) -> Any:
    """Copy `value` with every secret-looking key's value replaced by `REDACTED`.

    Also turns tuples and sets into lists, paths and non-finite floats into strings, so the
    result is plain JSON.
    """
    if isinstance(value, dict):
        cleaned = {}
        for key, item in value.items():
            name = str(key)
            if any(marker in name.lower() for marker in SECRET_MARKERS):
                cleaned[name] = REDACTED
            else:
                cleaned[name] = redact(item)
        return cleaned
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted(redact(item) for item in value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; e.g. the epsilon of a run without DP
    if isinstance(value, (bytes, bytearray)):
        raise TypeError("bytes cannot go into the audit log (key material?); log a digest")
    return value


class AuditLog:
    """Appends hash-chained records to one JSON-lines file.

    Safe across processes on POSIX: each append takes an exclusive lock, reads the last record
    to chain to it, writes one line, and fsyncs before releasing the lock.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Write one record of `kind` with `fields`; returns the record as written.

        Raises `DataError` if the last record on disk is damaged (run `verify` to see where);
        the log is never modified to repair it.
        """
        if not _KIND.match(kind):
            raise ValueError(f"audit record kind {kind!r}: use lower-case letters, digits, '_.-'")
        cleaned = redact(fields)
        if cleaned != fields:
            hidden = sorted(_redacted_names(cleaned))
            logger.warning("audit log %s: redacted secret-looking fields %s", self.path, hidden)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.path) as handle:
            seq, prev = self._tail(handle)
            record: dict[str, Any] = {
                "seq": seq + 1,
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "kind": kind,
                "fields": cleaned,
                "prev": prev,
            }
            record["hash"] = record_hash(record)
            handle.write(canonical_json(record).encode("utf-8") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        return record

    def _tail(self, handle: Any) -> tuple[int, str]:
        """(seq, hash) of the last record, or (0, GENESIS) for an empty log."""
        last_line = _last_line(handle)
        if last_line is None:
            return 0, GENESIS
        try:
            if not last_line.endswith(b"\n"):
                raise ValueError("no newline at its end")
            record = json.loads(last_line)
            if record_hash(record) != record.get("hash"):
                raise ValueError("its hash does not match its content")
            return int(record["seq"]), str(record["hash"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{self.path}: line {_count_lines(handle)}: last audit record is damaged ({exc}); "
                "nothing was appended. Run `fedward audit verify` and move the log aside"
            ) from None


@dataclass(frozen=True)
class VerificationResult:
    """What `verify` found.

    Attributes:
        ok: True when every line verifies (and the last hash matches, if one was given).
        valid_records: Records that verify, counting from the first line.
        problem_line: 1-based line number of the first problem, or None.
        problem: What is wrong there, or None.
        last_hash: `hash` of the last valid record (GENESIS for an empty log).
    """

    ok: bool
    valid_records: int
    problem_line: int | None
    problem: str | None
    last_hash: str

    def summary(self) -> str:
        """One line for the CLI."""
        if self.ok:
            return f"audit log intact: {self.valid_records} records, last hash {self.last_hash}"
        return (
            f"audit log broken at line {self.problem_line}: {self.problem} "
            f"(lines 1-{self.valid_records} verify)"
        )


def verify(path: str | Path, expected_last_hash: str | None = None) -> VerificationResult:
    """Check every record of the log at `path` and report the first edited, missing, reordered
    or truncated one. Raises `DataError` only when the file cannot be read at all."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read audit log ({exc})") from None

    prev, valid = GENESIS, 0

    def broken(line_number: int, reason: str) -> VerificationResult:
        return VerificationResult(False, valid, line_number, reason, prev)

    lines = data.split(b"\n")
    trailing = lines.pop()  # b"" when the file ends with a newline, else a truncated last line
    if trailing:
        lines.append(trailing)
    for index, raw in enumerate(lines):
        line_number = index + 1
        if index == len(lines) - 1 and trailing:
            return broken(line_number, "truncated record (no newline at the end of the file)")
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return broken(line_number, "not valid JSON (truncated or edited)")
        if not isinstance(record, dict) or set(record) != _RECORD_KEYS:
            return broken(line_number, "not an audit record (fields missing or added)")
        if record_hash(record) != record["hash"]:
            return broken(line_number, "record edited: its hash does not match its content")
        expected_seq = valid + 1
        if record["seq"] != expected_seq:
            if isinstance(record["seq"], int) and record["seq"] > expected_seq:
                missing = record["seq"] - expected_seq
                reason = (
                    f"{missing} record(s) missing before it "
                    f"(expected seq {expected_seq}, found {record['seq']})"
                )
            else:
                reason = (
                    "records reordered or repeated "
                    f"(expected seq {expected_seq}, found {record['seq']})"
                )
            return broken(line_number, reason)
        if record["prev"] != prev:
            return broken(
                line_number,
                "chain broken: 'prev' is not the hash of the record before it "
                "(a record was removed, reordered or rewritten)",
            )
        prev, valid = record["hash"], valid + 1

    if expected_last_hash is not None and expected_last_hash != prev:
        return VerificationResult(
            False,
            valid,
            len(lines),
            f"last hash {prev[:12]}... differs from the expected {expected_last_hash[:12]}... "
            "(records were cut off the end or the whole chain was rewritten)",
            prev,
        )
    return VerificationResult(True, valid, None, None, prev)


def _redacted_names(value: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{prefix}{key}"
            if item == REDACTED:
                yield name
            else:
                yield from _redacted_names(item, name + ".")
    elif isinstance(value, list):
        for item in value:
            yield from _redacted_names(item, prefix)


def _last_line(handle: Any) -> bytes | None:
    """The last line of an open binary file, with its newline if it has one; None if empty."""
    end = handle.seek(0, os.SEEK_END)
    tail = b""
    while end > 0:  # read backwards in blocks until the newline before the last line
        start = max(0, end - (1 << 16))
        handle.seek(start)
        tail = handle.read(end - start) + tail
        end = start
        cut = tail.rfind(b"\n", 0, len(tail) - 1)
        if cut != -1:
            tail = tail[cut + 1 :]
            break
    handle.seek(0, os.SEEK_END)
    return tail or None


def _count_lines(handle: Any) -> int:
    """Number of lines in an open binary file, a last line without newline included."""
    handle.seek(0)
    count, last = 0, b"\n"
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        count += chunk.count(b"\n")
        last = chunk[-1:]
    handle.seek(0, os.SEEK_END)
    return count if last == b"\n" else count + 1
