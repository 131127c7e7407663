"""The faults of a soak (bench/soak.py): their kinds, their seeded schedule, and the verdict on
each after the run.

- `supernode_kill@<stage>`: `kill -9` of a sampled hospital's SuperNode (its whole process tree)
  when it receives the message of a SecAgg+ stage (advertise_keys rides on the train message),
  restarted once the round is over;
- `superlink_kill`: `kill -9` of the SuperLink (with its SuperExec and ServerApp) and of
  `fedward run` mid-round; the SuperLink is restarted on the same database and the run resumed
  with `fedward run --resume`;
- `supernode_freeze`: SIGSTOP of a sampled hospital's SuperNode past the SecAgg+ stage timeout,
  then SIGCONT;
- `ledger_enospc`: the hospital's ledger write after training fails with ENOSPC (an injected
  `OSError` from `os.fsync` of the ledger's temporary file, via a `sitecustomize` on that
  hospital's PYTHONPATH: the library's own write path runs, only the disk is "full");
- `replayed_message`: a sampled hospital sends, as its reply to the SecAgg+ share-keys stage,
  its reply to that stage from an earlier round;
- `truncated_message`: a sampled hospital's masked update is cut to half its bytes.

The faults inside a hospital's processes (ENOSPC, the two messages) come from a `sitecustomize`
on that hospital's PYTHONPATH (bench/soak_hooks.py). A message fault is survived when it was
sent, the coordinator's history names the hospital as rejected in that round with the reason,
and that round completed ok with the other hospitals.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.soak_processes import SoakError

#: The message each SecAgg+ stage arrives in, as the SuperNode logs it ("Receiving: ...").
STAGE_MESSAGES = {
    "advertise_keys": "train",
    "share_keys": "train.share_keys",
    "masked_update": "train.masked_update",
    "consistency_check": "train.consistency_check",
    "unmask": "train.unmask",
}
FAULT_KINDS = (
    *(f"supernode_kill@{stage}" for stage in STAGE_MESSAGES),
    "superlink_kill",
    "supernode_freeze",
    "ledger_enospc",
    "replayed_message",
    "truncated_message",
)
#: What the coordinator's history must say of a message fault's hospital in its round.
REJECTED_FOR = {
    "replayed_message": "replayed or misrouted",
    "truncated_message": "stage masked_update",
}
#: The trigger file (in the hospital's folder) that arms each in-hospital fault.
TRIGGERS = {"replayed_message": "replay-armed", "truncated_message": "truncate-armed"}


@dataclass
class Fault:
    """One scheduled fault and what happened to it."""

    round: int
    kind: str
    hospital: str | None = None
    injected_at: float | None = None  # seconds since the soak started
    stage: str | None = None
    detail: str = ""
    survived: bool | None = None


def fault_schedule(kinds: tuple[str, ...], rounds: int, seed: int) -> list[Fault]:
    """Each fault kind once (more when rounds allow: rounds // (kinds + 2) times), each in its
    own round, drawn from the seed; the first and last rounds stay clean (a baseline, and room
    to show recovery)."""
    rng = random.Random(f"soak:{seed}")
    repeat = max(1, (rounds - 2) // (len(kinds) + 2)) if kinds else 0
    chosen = [kind for kind in kinds for _ in range(repeat)]
    slots = list(range(2, rounds))
    if len(chosen) > len(slots):
        raise SoakError(
            f"{len(chosen)} faults need at least {len(chosen) + 2} rounds; use --rounds "
            f"{len(chosen) + 2} or fewer --faults"
        )
    chosen_rounds = sorted(rng.sample(slots, len(chosen)))
    rng.shuffle(chosen)
    return [Fault(round=r, kind=kind) for r, kind in zip(chosen_rounds, chosen, strict=True)]


def judge_faults(schedule: list[Fault], history: dict, site: Callable[[str], Path]) -> None:
    """Set each injected fault's `survived`: a later round completed ok, with the hospital it hit
    among those who trained (for a hospital's fault); a message fault by `judge_message_fault`.
    `site(name)` is the hospital's folder (where the hooks leave their `.fired` files)."""
    rows = history.get("rounds", [])
    for fault in schedule:
        if fault.injected_at is None:
            fault.survived = None
            continue
        fault.survived = any(
            row["round"] > fault.round
            and row["status"] == "ok"
            and (
                fault.hospital is None
                or row.get("hospitals", {}).get(fault.hospital, {}).get("trained")
            )
            for row in rows
        )
        if fault.kind in REJECTED_FOR:
            judge_message_fault(fault, rows, site(fault.hospital))


def judge_message_fault(fault: Fault, rows: list[dict], site: Path) -> None:
    """A bad message is survived when it was sent, the coordinator rejected it in its round
    (the history names the hospital under `rejected`, with the reason), and that round
    completed with the others: one hospital's bad message did not cost the federation its
    round. (The hospital's processes were not touched, so whether a later round samples it
    says nothing here.)"""
    fired = (site / f"{TRIGGERS[fault.kind]}.fired").exists()
    row = next((row for row in rows if row["round"] == fault.round), {})
    reason = row.get("rejected", {}).get(fault.hospital, "")
    rejected = REJECTED_FOR[fault.kind] in reason
    fault.detail += (
        f"; {'sent' if fired else 'NOT sent'}, "
        f"{'rejected by the coordinator' if rejected else 'NOT rejected'}, "
        f"round {row.get('status', 'missing')[:6].strip(':')}"
    )
    fault.survived = fired and rejected and row.get("status") == "ok"
