"""What must hold after any soak of a deployment, checked by code: the invariants of issue 42.

A soak (`bench/soak.py`) kills, freezes and starves the processes of a federation on purpose;
afterwards these pure checks read the coordinator's output folder and each hospital's folder and
say what is wrong, if anything. Each returns a list of `Finding`s (empty: the invariant holds):

- `ledger_findings`: a hospital's ledger charges each round it released exactly once (none twice
  after a restart, none missing), and its total is the composition of the rounds' planned DP
  steps (no arithmetic drift). Rounds reserved and never released (a process killed mid-round,
  or a refusal after the budget gate) stay charged by design (fail safe); they are counted, not
  reported as discrepancies.
- `audit_findings`: every audit chain verifies.
- `torn_file_findings`: no ledger, checkpoint, kept update, adapter or history is half-written.
- `adapter_findings`: the final global adapter loads and predicts a distribution over the labels.
- `round_findings`: every round of the run is in the history, either ok or failed with a reason,
  and the coordinator's audit log says the same.
- `sentinel_findings`: a string planted in the hospitals' notes appears in no log, output or
  stored message (the SuperLink's database included).

The checks never change a file. `tests/bench/test_soak_checks.py` breaks each invariant by hand
and shows the check catches it.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedward.client.privacy.accounting import compose_epsilon
from fedward.client.privacy.ledger import SPENT, PrivacyLedger
from fedward.common.errors import DataError
from fedward.common.files.arrays_file import read_arrays_file
from fedward.common.files.audit_log import verify

#: Suffix of the ledger keys of released evaluations (`client/site/evaluation.py`, EVALUATION_KEY).
EVALUATION_SUFFIX = "-evaluation"
#: Audit kinds that mean "an update of this round left the hospital".
RELEASED_KINDS = ("train", "replay")


@dataclass(frozen=True)
class Finding:
    """One broken invariant: which one, where, and what is wrong."""

    invariant: str  # ledger | audit | torn | adapter | rounds | sentinel
    where: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.where}: {self.detail}"


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (an unreadable line is skipped: `audit_findings` and
    `torn_file_findings` report it)."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# --- the privacy ledger ------------------------------------------------------------------------


def ledger_findings(
    ledger_path: Path,
    audit_path: Path,
    hospital: str,
    history: dict | None = None,
    tolerance: float = 1e-6,
) -> list[Finding]:
    """A hospital's ledger against what it released (its audit log) and what the coordinator
    saw it train (`history`, the run's history.json, optional).

    Breaks when: a (run, round) is in the ledger twice; a round the hospital released (audit
    `train`/`replay`, or named as trained by the coordinator) is not charged as spent; a spent
    round has no release; an entry's epsilon or the running total is not the composition of the
    planned steps; a round was released twice as `train` (trained twice).
    """
    where = f"hospital {hospital} ledger {ledger_path.name}"
    try:
        ledger = PrivacyLedger.load(ledger_path)
    except DataError as exc:
        return [Finding("ledger", where, f"cannot be read: {exc}")]
    findings = []
    keys = Counter((e.run_id, e.round) for e in ledger.entries)
    findings += _more_than_once(keys, "charged", where)
    spent = {(e.run_id, e.round) for e in ledger.entries if e.status == SPENT}
    trained, released = _releases(read_jsonl(audit_path))
    findings += _more_than_once(trained, "trained", where)
    for run_id, round_ in sorted(released | _coordinator_saw_train(history, hospital)):
        if (run_id, round_) not in spent:
            findings.append(
                Finding(
                    "ledger",
                    where,
                    f"run {run_id} round {round_} was released but is not charged as spent",
                )
            )
    for run_id, round_ in sorted(spent - released):
        findings.append(
            Finding(
                "ledger", where, f"run {run_id} round {round_} is charged but was never released"
            )
        )
    return findings + _composition_findings(ledger, where, tolerance)


def _more_than_once(counts: Counter, what: str, where: str) -> list[Finding]:
    return [
        Finding("ledger", where, f"run {run_id} round {round_} {what} {count} times")
        for (run_id, round_), count in sorted(counts.items())
        if count > 1
    ]


def _releases(audit: list[dict]) -> tuple[Counter, set[tuple[str, int]]]:
    """From a hospital's audit log: how often each (run, round) was released as `train`, and
    every (run, round) it released anything for (evaluations under their ledger key)."""
    trained = Counter(
        (r["fields"]["run_id"], r["fields"]["round"]) for r in audit if r.get("kind") == "train"
    )
    released = {
        (r["fields"]["run_id"], r["fields"]["round"])
        for r in audit
        if r.get("kind") in RELEASED_KINDS
    }
    released |= {
        (r["fields"]["run_id"] + EVALUATION_SUFFIX, r["fields"]["round"])
        for r in audit
        if r.get("kind") == "evaluation"
    }
    return trained, released


def _coordinator_saw_train(history: dict | None, hospital: str) -> set[tuple[str, int]]:
    if history is None:
        return set()
    run_id = history.get("run_id")
    return {
        (run_id, row["round"])
        for row in history.get("rounds", [])
        if row.get("hospitals", {}).get(hospital, {}).get("trained")
    }


def _composition_findings(ledger: PrivacyLedger, where: str, tolerance: float) -> list[Finding]:
    """Each entry's epsilon, and the running total, are the composition of the planned steps."""
    findings = []
    history_so_far = []
    for entry in ledger.entries:
        step = (entry.noise_multiplier, entry.sample_rate, entry.steps)
        history_so_far.append(step)
        alone = compose_epsilon([step], entry.delta)
        total = compose_epsilon(history_so_far, entry.delta)
        if not math.isclose(entry.epsilon_round, alone, rel_tol=tolerance, abs_tol=tolerance):
            findings.append(
                Finding(
                    "ledger",
                    where,
                    f"run {entry.run_id} round {entry.round}: epsilon {entry.epsilon_round:.6f} "
                    f"recorded, its planned steps give {alone:.6f}",
                )
            )
        if not math.isclose(entry.epsilon_total, total, rel_tol=tolerance, abs_tol=tolerance):
            findings.append(
                Finding(
                    "ledger",
                    where,
                    f"run {entry.run_id} round {entry.round}: running total "
                    f"{entry.epsilon_total:.6f} recorded, the planned steps compose to "
                    f"{total:.6f}",
                )
            )
    return findings


def ledger_summary(ledger_path: Path) -> dict:
    """Spent and reserved rounds and the total epsilon of one ledger (for the report)."""
    ledger = PrivacyLedger.load(ledger_path)
    delta = ledger.entries[-1].delta if ledger.entries else 1e-5
    return {
        "spent": sum(e.status == SPENT for e in ledger.entries),
        "reserved": len(ledger.reservations()),
        "epsilon": ledger.epsilon_spent(delta) if ledger.entries else 0.0,
        "unit": ledger.unit,
    }


# --- audit chains ------------------------------------------------------------------------------


def audit_findings(paths: Iterable[Path]) -> tuple[list[Finding], int]:
    """Verify every audit log in `paths`; returns the findings and how many verified."""
    findings, verified = [], 0
    for path in paths:
        try:
            result = verify(path)
        except DataError as exc:
            findings.append(Finding("audit", str(path), str(exc)))
            continue
        if result.ok:
            verified += 1
        else:
            findings.append(Finding("audit", str(path), result.summary()))
    return findings, verified


# --- torn files --------------------------------------------------------------------------------


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"not whole JSON ({exc})"
    return None


def _npz_problem(path: Path) -> str | None:
    prefix = "adapter:" if path.name == "checkpoint.npz" else "delta:"
    try:
        read_arrays_file(path, prefix=prefix, what=path.name)
    except (DataError, OSError) as exc:
        return str(exc)
    return None


def _adapter_problem(folder: Path) -> str | None:
    if not folder.is_dir():
        previous = folder.with_name(folder.name + ".previous")
        if previous.is_dir():
            return "missing, with a .previous copy left by an interrupted swap"
        return None
    for name in ("adapter_config.json", "fedward.json"):
        if not (folder / name).is_file():
            return f"{name} missing"
        problem = _json_problem(folder / name)
        if problem:
            return f"{name} {problem}"
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return "adapter_model.safetensors missing"
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="np") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                handle.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types
        return f"adapter_model.safetensors is damaged ({exc})"
    return None


def torn_file_findings(folders: Iterable[Path]) -> tuple[list[Finding], int]:
    """Every ledger, history, run-state JSON, checkpoint, kept update and adapter folder under
    `folders` reads whole. Returns the findings and the number of files checked.

    Left-over temporary files of an atomic write (`.<name>.*.tmp`, from a process killed before
    its rename) are not torn files: the target kept its old content. They are not reported.
    """
    findings, checked = [], 0
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                continue
            if any(part.startswith(".") and part.endswith(".tmp") for part in path.parts):
                continue
            problem = None
            if path.is_file() and path.parent.name == "adapter":
                continue  # checked as a whole with its folder
            if path.is_file() and path.suffix == ".json":
                problem = _json_problem(path)
            elif path.is_file() and path.suffix == ".npz":
                problem = _npz_problem(path)
            elif path.is_dir() and (path.name == "adapter" or path.name.endswith(".previous")):
                target = path.with_name(path.name.removesuffix(".previous"))
                problem = _adapter_problem(target) if path.name == "adapter" else None
                if path.name.endswith(".previous") and not target.exists():
                    problem = _adapter_problem(target)
            else:
                continue
            checked += 1
            if problem:
                findings.append(Finding("torn", str(path), problem))
    return findings, checked


# --- the final adapter -------------------------------------------------------------------------


def adapter_findings(adapter_dir: Path, labels: list[str], texts: list[str]) -> list[Finding]:
    """The run's final adapter loads on its base model and gives each text a probability
    distribution over the run's `labels`."""
    import torch

    from fedward.common.model import load_adapter_for_inference

    where = str(adapter_dir)
    try:
        model, tokenizer, meta = load_adapter_for_inference(adapter_dir)
    except Exception as exc:  # any failure to load is the finding
        return [Finding("adapter", where, f"does not load: {type(exc).__name__}: {exc}")]
    if list(meta.get("labels", [])) != list(labels):
        return [Finding("adapter", where, f"labels {meta.get('labels')} are not {labels}")]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        probabilities = model(**batch).logits.softmax(-1)
    if probabilities.shape != (len(texts), len(labels)):
        return [Finding("adapter", where, f"predicts shape {tuple(probabilities.shape)}")]
    if not torch.isfinite(probabilities).all():
        return [Finding("adapter", where, "predicts non-finite probabilities")]
    return []


# --- rounds ------------------------------------------------------------------------------------


def round_findings(history: dict, rounds: int, coordinator_audit: list[dict]) -> list[Finding]:
    """Rounds 1..`rounds` each appear once in the history, ok or "failed: <reason>", and the
    coordinator's audit log holds one `round` record per round with the same status."""
    findings = []
    rows = history.get("rounds", [])
    numbers = [row.get("round") for row in rows]
    for number, count in Counter(numbers).items():
        if count > 1:
            findings.append(Finding("rounds", f"round {number}", f"in the history {count} times"))
    for number in range(1, rounds + 1):
        if number not in numbers:
            findings.append(Finding("rounds", f"round {number}", "neither completed nor reported"))
    audited = {}
    for record in coordinator_audit:
        if record.get("kind") == "round":
            fields = record["fields"]
            if fields["round"] in audited:
                where = f"round {fields['round']}"
                findings.append(Finding("rounds", where, "audited twice by the coordinator"))
            audited[fields["round"]] = fields["status"]
    for row in rows:
        status = str(row.get("status", ""))
        where = f"round {row.get('round')}"
        if status != "ok" and not (status.startswith("failed: ") and status[8:].strip()):
            findings.append(Finding("rounds", where, f"status {status!r} is neither ok nor failed"))
        if audited.get(row.get("round")) != status:
            findings.append(
                Finding("rounds", where, f"audit says {audited.get(row.get('round'))!r}")
            )
    return findings


def round_counts(history: dict) -> dict:
    """Completed and failed rounds, and the failures' reasons (for the report)."""
    rows = history.get("rounds", [])
    failed = [row for row in rows if row["status"] != "ok"]
    return {
        "attempted": len(rows),
        "completed": len(rows) - len(failed),
        "failed": len(failed),
        "reasons": Counter(_reason_kind(row["status"]) for row in failed),
    }


def _reason_kind(status: str) -> str:
    """A failure's reason without its numbers and node ids (to count them by kind)."""
    text = re.sub(r"\d+", "#", status.removeprefix("failed: "))
    return text.split(";")[0].split(" (")[0][:100]


# --- record text -------------------------------------------------------------------------------


def sentinel_findings(sentinel: str, paths: Iterable[Path], skip: Iterable[Path] = ()) -> list:
    """No file under `paths` (logs, outputs, the SuperLink's database and its journal) holds
    `sentinel`, in UTF-8 or UTF-16; the hospitals' own data files (`skip`) are not looked at."""
    skip = {Path(p).resolve() for p in skip}
    needles = [sentinel.encode("utf-8"), sentinel.encode("utf-16-le")]
    findings = []
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if path.resolve() in skip:
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if any(needle in data for needle in needles):
                findings.append(Finding("sentinel", str(path), "holds record text"))
    return findings


def check_deployment(
    out: Path, sites: dict[str, Path], rounds: int, sentinel: str, root: Path
) -> dict:
    """Every check above on a deployment's folders: the coordinator's output folder `out`,
    each hospital's folder (`sites`, by name: its notes.csv, ledger/), the `rounds` the run
    reached, and the `sentinel` planted in the notes, searched for under `root`."""
    history = _read_history(out / "history.json")
    findings: list[Finding] = []
    findings += round_findings(history, rounds, read_jsonl(out / "audit.jsonl"))
    ledgers = {}
    for name, site in sites.items():
        ledger_path = site / "ledger" / f"{name}-notes.json"
        if ledger_path.exists():
            findings += ledger_findings(ledger_path, site / "ledger" / "audit.jsonl", name, history)
            ledgers[name] = ledger_summary(ledger_path)
    audits = [out / "audit.jsonl", *(site / "ledger" / "audit.jsonl" for site in sites.values())]
    audits = [path for path in audits if path.exists()]  # a hospital may never have written
    audit_problems, verified = audit_findings(audits)
    findings += audit_problems
    torn, checked = torn_file_findings([out, *sites.values()])
    findings += torn
    if (out / "adapter").exists():
        from fedward.simulation.synthetic.notes import DIAGNOSES

        texts = ["productive cough, fever and crackles", "crushing chest pain, troponin rising"]
        findings += adapter_findings(out / "adapter", list(DIAGNOSES), texts)
    else:
        findings.append(Finding("adapter", str(out / "adapter"), "missing"))
    notes = [site / "notes.csv" for site in sites.values()]
    findings += sentinel_findings(sentinel, [root], skip=notes)
    return {
        "history": history,
        "findings": findings,
        "ledgers": ledgers,
        "audits_verified": verified,
        "audits": len(audits),
        "files_checked": checked,
    }


def _read_history(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {"rounds": []}
