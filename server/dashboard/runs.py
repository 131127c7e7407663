"""Finding run folders and reading one into what the pages show.

A run folder is what `fedward run` (the ServerApp) and `fedward simulate` write: `history.json`
(rewritten atomically after every round), `audit.jsonl` (hash-chained, one record a round),
`checkpoint.npz`, `adapter/`. The dashboard reads them while a run writes them, so every read
expects the worst: a file that is not there yet, a history cut short or damaged, an audit log
whose last line is being written, a folder that is not a run at all. Each becomes a line in
`RunView.problems`, and the page shows what could be read. Nothing here writes.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedward.common.errors import ConfigError, DataError
from fedward.common.files import audit_log
from fedward.common.tasks import Task, recorded_task

log = logging.getLogger(__name__)

HISTORY = "history.json"
AUDIT_LOG = "audit.jsonl"
CHECKPOINT = "checkpoint.npz"
#: Files that make a folder a run folder (any one of them).
RUN_FILES = (HISTORY, AUDIT_LOG, CHECKPOINT)

#: A rendered reason ends with its code in brackets (common/protocol/reasons.py, `Reason.render`).
_REASON_CODE = re.compile(r"^(?P<text>.*?)\s*\[(?P<code>[a-z][a-z0-9_]*\.[a-z0-9_.]+)\]$", re.S)


@dataclass(frozen=True)
class RunFolder:
    """A run folder found under one of the dashboard's roots; `key` names it in URLs."""

    key: str
    path: Path


@dataclass(frozen=True)
class Refusal:
    """One hospital's refusal (or the coordinator's rejection) of a round, as the coordinator
    rendered it: the text of its reason template and the reason code."""

    hospital: str
    text: str
    code: str


@dataclass
class AuditView:
    """The audit chain's verification, or why there is none."""

    present: bool
    ok: bool = False
    summary: str = ""
    records: int = 0
    last_hash: str = ""


@dataclass
class RunView:
    """Everything a page shows about one run folder."""

    key: str
    path: Path
    is_run: bool = True
    state: str = "unknown"  # finished | failed | in progress | not a run | unreadable
    run_id: str = ""
    task: str = ""
    definition: Task | None = None  # the task `task` names; None for a name fedward lacks
    config: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    planned_rounds: int | None = None
    rounds_from: str = HISTORY  # where the rows came from: history.json or audit.jsonl
    problems: list[str] = field(default_factory=list)
    audit: AuditView = field(default_factory=lambda: AuditView(present=False))
    last_update: float | None = None  # newest modification time of the run's files

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)

    @property
    def completed_rounds(self) -> int:
        return len(self.rounds)

    @property
    def in_progress(self) -> bool:
        return self.state == "in progress"

    @property
    def run_epsilon(self) -> float | None:
        """The run's target epsilon when it ran under DP (None otherwise): `target_epsilon` in
        history.json's flat config, `epsilon` in the audit log's run.start record."""
        if not self.config.get("dp", True):
            return None
        value = self.config.get("target_epsilon", self.config.get("epsilon"))
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def is_run_folder(path: Path) -> bool:
    """True when `path` holds any file a fedward run writes."""
    return any((path / name).is_file() for name in RUN_FILES)


def find_runs(roots: list[Path]) -> tuple[list[RunFolder], list[str]]:
    """Run folders under `roots`: a root that is a run folder, else its subfolders (two levels)
    that are. Also returns one line for each root that holds no run (shown on the index)."""
    found: list[RunFolder] = []
    notes: list[str] = []
    for index, root in enumerate(roots):
        if not root.exists():
            notes.append(f"{root}: no such folder")
            continue
        if not root.is_dir():
            notes.append(f"{root}: not a folder")
            continue
        if is_run_folder(root):
            found.append(RunFolder(f"{index}", root))
            continue
        inside = [folder for folder in _subfolders(root, depth=2) if is_run_folder(folder)]
        if not inside:
            notes.append(
                f"{root}: not a fedward run folder (no {', '.join(RUN_FILES)}) and no run "
                "folders inside it"
            )
        for folder in inside:
            found.append(RunFolder(f"{index}/{folder.relative_to(root).as_posix()}", folder))
    return found, notes


def _subfolders(root: Path, depth: int) -> list[Path]:
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    folders = []
    for child in children:
        folders.append(child)
        if depth > 1 and not is_run_folder(child):
            folders.extend(_subfolders(child, depth - 1))
    return folders


def read_run(folder: RunFolder) -> RunView:
    """Read one run folder; never raises for what a run in progress or a crash leaves behind."""
    view = RunView(key=folder.key, path=folder.path)
    path = folder.path
    if not path.is_dir() or not is_run_folder(path):
        view.is_run, view.state = False, "not a run"
        view.problems.append(
            f"{path} is not a fedward run folder: none of {', '.join(RUN_FILES)} is there"
        )
        return view
    view.last_update = _newest_mtime(path)
    records = _read_audit(path, view)
    history = _read_history(path, view)
    if history is not None:
        view.run_id = str(history.get("run_id", ""))
        view.config = history.get("config") if isinstance(history.get("config"), dict) else {}
        view.rounds = [row for row in history.get("rounds", []) if _is_row(row)]
    elif records:
        view.rounds = rows_from_audit(records)
        view.rounds_from = AUDIT_LOG
        if view.rounds:
            view.problems.append(
                f"the rounds shown come from {AUDIT_LOG} (what the coordinator recorded), "
                f"since {HISTORY} cannot be read"
            )
    start = _last_of(records, ("run.start", "run.resume"))
    if start is not None:
        view.run_id = view.run_id or str(start["fields"].get("run_id", ""))
    first = _last_of(records, ("run.start",))
    if first is not None and not view.config:
        view.config = {
            key: first["fields"][key]
            for key in (
                "task",
                "model",
                "rounds",
                "dp",
                "epsilon",
                "dp_unit",
                "delta",
                "secure_aggregation",
            )
            if key in first["fields"]
        }
    view.task = str(view.config.get("task") or "")
    try:
        view.definition = recorded_task(view.config)
    except ConfigError:  # an unknown or missing task name: the pages show what the rows hold
        view.definition = None
    planned = view.config.get("rounds")
    view.planned_rounds = planned if isinstance(planned, int) else None
    view.state = _state(view, records)
    return view


def _read_history(path: Path, view: RunView) -> dict[str, Any] | None:
    file = path / HISTORY
    if not file.is_file():
        view.problems.append(
            f"no {HISTORY} yet: the run has not finished its first round (or did not start)"
        )
        return None
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        view.problems.append(f"{HISTORY} cannot be read ({exc})")
        return None
    try:
        history = json.loads(text)
    except json.JSONDecodeError as exc:
        view.problems.append(
            f"{HISTORY} is half-written or damaged (not valid JSON: {exc.msg} at line "
            f"{exc.lineno}); the page shows it again once the coordinator rewrites it"
        )
        return None
    if not isinstance(history, dict) or not isinstance(history.get("rounds"), list):
        view.problems.append(f"{HISTORY} is not a fedward history (no 'rounds' list)")
        return None
    bad = sum(1 for row in history["rounds"] if not _is_row(row))
    if bad:
        view.problems.append(f"{HISTORY}: {bad} round row(s) are not readable and are left out")
    return history


def _is_row(row: Any) -> bool:
    return (
        isinstance(row, dict)
        and isinstance(row.get("round"), int)
        and isinstance(row.get("hospitals", {}), dict)
    )


def _read_audit(path: Path, view: RunView) -> list[dict[str, Any]]:
    """Verify the chain and return the records that parse (the page's fallback for rounds)."""
    file = path / AUDIT_LOG
    if not file.is_file():
        view.audit = AuditView(
            present=False,
            summary=f"no audit log ({AUDIT_LOG} is missing): the chain cannot be verified",
        )
        view.problems.append(view.audit.summary)
        return []
    try:
        result = audit_log.verify(file)
        data = file.read_bytes()
    except (OSError, DataError) as exc:
        view.audit = AuditView(present=True, summary=f"{AUDIT_LOG} cannot be read ({exc})")
        view.problems.append(view.audit.summary)
        return []
    view.audit = AuditView(
        present=True,
        ok=result.ok,
        summary=result.summary(),
        records=result.valid_records,
        last_hash=result.last_hash,
    )
    records = []
    for line in data.split(b"\n")[: result.valid_records]:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        if isinstance(record, dict) and isinstance(record.get("fields"), dict):
            records.append(record)
    return records


def _last_of(records: list[dict[str, Any]], kinds: tuple[str, ...]) -> dict[str, Any] | None:
    for record in reversed(records):
        if record.get("kind") in kinds:
            return record
    return None


def _state(view: RunView, records: list[dict[str, Any]]) -> str:
    """finished: the audit log's last run.start/run.resume is followed by run.end (or, without
    an audit log, every planned round is in the history); failed: so, but no round trained
    (nothing to use); otherwise in progress."""
    done = ("ok", "evaluated")  # a trained round, or an evaluate-only run's one evaluation
    ended = "finished" if any(row.get("status") in done for row in view.rounds) else "failed"
    if records:
        last = _last_of(records, ("run.start", "run.resume", "run.end"))
        if last is not None and last["kind"] == "run.end":
            return ended
        return "in progress"
    if (
        not view.audit.present
        and view.planned_rounds is not None
        and view.completed_rounds >= view.planned_rounds
    ):
        return ended
    if not view.rounds and not (view.path / HISTORY).is_file():
        return "in progress" if (view.path / CHECKPOINT).is_file() else "unknown"
    return "in progress"


def _newest_mtime(path: Path) -> float | None:
    times = []
    for name in RUN_FILES:
        try:
            times.append((path / name).stat().st_mtime)
        except OSError:
            pass
    return max(times) if times else None


def rows_from_audit(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History-shaped rows from the audit log's `round` records (of the last run started).

    The audit record holds the round's status, participants, epsilon, refusals and global
    metrics (server/app.py, `round_audit_fields`): enough for the round table when
    history.json cannot be read.
    """
    rows: dict[int, dict[str, Any]] = {}
    for record in records:
        if record.get("kind") == "run.start":
            rows = {}
        if record.get("kind") != "round":
            continue
        fields = record["fields"]
        if not isinstance(fields.get("round"), int):
            continue
        hospitals: dict[str, dict[str, Any]] = {}
        for item in _objects(fields.get("epsilon")):
            hospitals.setdefault(str(item.get("hospital")), {}).update(
                {"trained": True, "epsilon": item.get("epsilon")}
            )
        for name in fields.get("participants") or []:
            hospitals.setdefault(str(name), {})["trained"] = True
        refused = {
            str(i.get("hospital")): str(i.get("reason")) for i in _objects(fields.get("refused"))
        }
        rejected = {
            str(i.get("hospital")): str(i.get("reason")) for i in _objects(fields.get("rejected"))
        }
        for name, reason in {**refused, **rejected}.items():
            hospitals.setdefault(name, {})["refused"] = reason
        rows[fields["round"]] = {
            "round": fields["round"],
            "status": str(fields.get("status", "")),
            "secure_aggregation": fields.get("secure_aggregation"),
            "train_loss": None,
            "global": fields.get("global") if isinstance(fields.get("global"), dict) else {},
            "hospitals": hospitals,
            "refused": refused,
            "rejected": rejected,
            "dropped": list(fields.get("dropped") or []),
            "evaluation_refused": {
                str(i.get("hospital")): str(i.get("reason"))
                for i in _objects(fields.get("evaluation_refused"))
            },
            "seconds": None,
        }
    return [rows[number] for number in sorted(rows)]


def _objects(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def split_reason(hospital: str, rendered: str) -> Refusal:
    """A rendered reason ('... [budget.exceeded]') as its text and its code ('' when the
    reason is the coordinator's own text, e.g. an update it rejected)."""
    match = _REASON_CODE.match(str(rendered))
    if match is None:
        return Refusal(hospital, str(rendered), "")
    return Refusal(hospital, match["text"], match["code"])


def refusals(row: dict[str, Any]) -> list[Refusal]:
    """Training refusals and rejected updates of one round, by hospital."""
    items = {**(row.get("refused") or {}), **(row.get("rejected") or {})}
    return [split_reason(name, reason) for name, reason in sorted(items.items())]


def evaluation_refusals(row: dict[str, Any]) -> list[Refusal]:
    items = row.get("evaluation_refused") or {}
    return [split_reason(name, reason) for name, reason in sorted(items.items())]


def participants(row: dict[str, Any]) -> list[str]:
    """The hospitals whose update went into the round (trained), in natural order."""
    names = [name for name, item in row.get("hospitals", {}).items() if item.get("trained")]
    return sorted(names, key=natural_key)


def worth_joining(rounds: list[dict]) -> dict[str, dict[str, float]]:
    """Each hospital's alone / global / own figures on its own validation notes, from the last
    round that has them (`personal_*`, simulation only); empty when no hospital built its own
    model (`--no-own-model`, or the last round's evaluation failed)."""
    for row in reversed(rounds):
        found = {
            name: {key: stats[f"personal_{key}"] for key in ("alone", "global", "own")}
            for name, stats in (row.get("hospitals") or {}).items()
            if all(f"personal_{key}" in stats for key in ("alone", "global", "own"))
        }
        if found:
            return found
    return {}


def hospital_names(rounds: list[dict[str, Any]]) -> list[str]:
    """Every hospital named in any round, in natural order (hospital-2 before hospital-10)."""
    names = {name for row in rounds for name in row.get("hospitals", {})}
    return sorted(names, key=natural_key)


def natural_key(name: str) -> tuple[int, str]:
    return (len(name), name)


def age(seconds_since_epoch: float | None, now: float | None = None) -> str:
    """'42 s ago', '3 min ago', '2 h ago' ('' when unknown)."""
    if seconds_since_epoch is None:
        return ""
    elapsed = max(0.0, (now or time.time()) - seconds_since_epoch)
    if elapsed < 120:
        return f"{elapsed:.0f} s ago"
    if elapsed < 7200:
        return f"{elapsed / 60:.0f} min ago"
    return f"{elapsed / 3600:.0f} h ago"
