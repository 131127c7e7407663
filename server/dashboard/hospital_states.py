"""Each hospital's state as the coordinator holds it: from the rounds of the runs it can read.

The coordinator knows what hospitals sent back: whether a hospital trained a round, the epsilon
it reported for its update (cumulative over the run, in the task's DP unit), its refusals (reason
codes the coordinator rendered), and when its update was dropped or rejected. It does not know a
hospital's lifetime budget or its ledger: those stay at the hospital. The page says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedward.server.dashboard.runs import Refusal, RunView, natural_key, split_reason


@dataclass
class HospitalState:
    """One hospital in one run (or, on the index page, its latest run)."""

    name: str
    run: str = ""  # the run folder's key
    run_name: str = ""
    trained_rounds: list[int] = field(default_factory=list)
    refused_rounds: list[int] = field(default_factory=list)
    dropped_rounds: list[int] = field(default_factory=list)
    epsilon: float | None = None  # the latest epsilon it reported in this run
    run_epsilon: float | None = None  # the run's target epsilon (what it agreed to spend)
    last_round: int | None = None
    last_event: str = ""  # 'trained round 3', 'refused round 2', 'dropped in round 1'
    last_refusal: Refusal | None = None

    @property
    def epsilon_share(self) -> float | None:
        """Share of the run's epsilon spent (None when either is unknown)."""
        if self.epsilon is None or not self.run_epsilon:
            return None
        return self.epsilon / self.run_epsilon


def hospital_states(view: RunView) -> list[HospitalState]:
    """Each hospital named in the run's rounds, with what it did, in natural order."""
    states: dict[str, HospitalState] = {}
    run_epsilon = view.run_epsilon

    def state(name: str) -> HospitalState:
        if name not in states:
            states[name] = HospitalState(
                name=name, run=view.key, run_name=view.name, run_epsilon=run_epsilon
            )
        return states[name]

    for row in view.rounds:
        number = row["round"]
        for name, item in row.get("hospitals", {}).items():
            entry = state(name)
            if item.get("trained"):
                entry.trained_rounds.append(number)
                if _number(item.get("epsilon")) is not None:
                    entry.epsilon = _number(item.get("epsilon"))
                _event(entry, number, f"trained round {number}")
        refused: dict[str, Any] = {**(row.get("refused") or {}), **(row.get("rejected") or {})}
        for name, reason in refused.items():
            entry = state(name)
            entry.refused_rounds.append(number)
            entry.last_refusal = split_reason(name, reason)
            _event(entry, number, f"refused round {number}")
        for name in row.get("dropped") or []:
            entry = state(str(name))
            entry.dropped_rounds.append(number)
            _event(entry, number, f"dropped in round {number}")
    return [states[name] for name in sorted(states, key=natural_key)]


def latest_states(views: list[RunView]) -> list[HospitalState]:
    """Every hospital across runs, each with its state in the most recently updated run."""
    latest: dict[str, HospitalState] = {}
    ordered = sorted(views, key=lambda view: view.last_update or 0.0)
    for view in ordered:
        for entry in hospital_states(view):
            latest[entry.name] = entry
    return [latest[name] for name in sorted(latest, key=natural_key)]


def _event(entry: HospitalState, number: int, text: str) -> None:
    if entry.last_round is None or number >= entry.last_round:
        entry.last_round, entry.last_event = number, text


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
