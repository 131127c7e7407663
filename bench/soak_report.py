"""The soak's report (bench/soak.py): the figures issue 42 asks for, as appended to
bench/results/soak.md."""

from __future__ import annotations

import os
import platform
from collections import Counter
from datetime import UTC, datetime

import psutil

from bench.soak_checks import round_counts


def report(soak, result: dict, command: str) -> str:
    settings = soak.settings
    history = result["history"]
    counts = round_counts(history)
    findings = result["findings"]
    by_kind = Counter(f.invariant for f in findings)
    faulted = {f.round for f in soak.schedule if f.injected_at is not None}
    seconds = [(row["round"], row.get("seconds", 0.0)) for row in history.get("rounds", [])]
    clean = [s for r, s in seconds if r not in faulted]
    hit = [s for r, s in seconds if r in faulted]

    def mean(values):
        return f"{sum(values) / len(values):.1f}" if values else "-"

    spent = [row.get("aggregation_seconds") for row in history.get("rounds", [])]
    spent = [value for value in spent if value is not None]
    aggregation = f"mean {sum(spent) / len(spent):.3f}, max {max(spent):.3f}" if spent else "-"

    node_peaks, link_peak = _peaks(soak)
    load = os.getloadavg()
    lines = [
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {settings.hospitals} hospitals, "
        f"{settings.rounds} rounds, seed {settings.seed}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, load average at the end "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (shared with other engineers' work); model "
        f"{settings.model or 'tiny random BERT (2 layers, 32 wide)'}, fraction "
        f"{settings.fraction}, SecAgg+ on, dp_unit patient, stage timeout "
        f"{settings.stage_timeout:.0f} s.",
        "",
        "```",
        f"wall time               {soak.wall:.0f} s (run {soak.wall - soak.started_run:.0f} s, "
        f"set-up {soak.started_run:.0f} s)",
        f"rounds                  attempted {counts['attempted']} of {settings.rounds}, "
        f"completed {counts['completed']}, failed {counts['failed']}",
    ]
    if soak.stopped_at is not None:
        lines.append(
            f"  STOPPED by the {settings.deadline:.0f} s deadline after {soak.stopped_at} rounds "
            "(every process killed with SIGKILL there; the checks then ran on what was left)"
        )
    for reason, number in counts["reasons"].most_common():
        lines.append(f"  failed {number} x     {reason}")
    lines.append(
        f"faults                  injected {sum(f.injected_at is not None for f in soak.schedule)}"
        f" of {len(soak.schedule)}, resumes of the run {soak.resumes}"
    )
    lines += _by_kind(soak.schedule)
    ledger_problems = by_kind.get("ledger", 0)
    lines += [
        f"ledger discrepancies    {ledger_problems}",
        f"torn files              {by_kind.get('torn', 0)} ({result['files_checked']} checked)",
        f"audit chains verified   {result['audits_verified']} of {result['audits']}",
        f"rounds unaccounted      {by_kind.get('rounds', 0)}",
        f"final adapter           {'BROKEN' if by_kind.get('adapter') else 'loads and predicts'}",
        f"record text leaked      {by_kind.get('sentinel', 0)} files "
        f"(sentinel planted in {soak.planted} notes)",
        f"s/round                 without faults {mean(clean)} ({len(clean)} rounds), "
        f"with faults {mean(hit)} ({len(hit)} rounds)",
        f"server SecAgg+ s/round  {aggregation} (the coordinator's own work in each round, "
        f"without the wait: history.json's aggregation_seconds)",
        f"peak RSS SuperLink      {link_peak / 2**20:.0f} MiB (its tree: SuperExec, ServerApp)",
        "peak RSS per SuperNode  "
        + ", ".join(f"{n[-2:]}: {v / 2**20:.0f}" for n, v in node_peaks.items())
        + " MiB (each tree: SuperNode, its ClientApp processes)",
    ]
    for name, summary in result["ledgers"].items():
        lines.append(
            f"  ledger {name}: {summary['spent']} rounds spent, {summary['reserved']} reserved, "
            f"epsilon {summary['epsilon']:.3f} per {summary['unit']}"
        )
    lines.append("```")
    lines += _as_injected(soak.schedule)
    if findings:
        lines += ["", "Findings:", "", "```", *(str(f) for f in findings[:40]), "```"]
    return "\n".join(lines) + "\n"


def _peaks(soak) -> tuple[dict[str, int], int]:
    """Peak RSS (bytes) of each hospital's SuperNode trees, restarts included, and of the
    SuperLink's."""
    node_peaks: dict[str, int] = {}
    for name in soak.names:
        processes = [p for p in [*soak.retired, soak.nodes.get(name)] if p is not None]
        processes = [p for p in processes if p.log_path.parent == soak.site(name)]
        node_peaks[name] = max((p.peak_rss for p in processes), default=0)
    return node_peaks, max((p.peak_rss for p in soak.superlinks), default=0)


def _by_kind(schedule) -> list[str]:
    lines = []
    for kind in sorted({f.kind for f in schedule}):
        of_kind = [f for f in schedule if f.kind == kind]
        injected = [f for f in of_kind if f.injected_at is not None]
        survived = [f for f in injected if f.survived]
        lines.append(
            f"  {kind:28s} injected {len(injected)}/{len(of_kind)}, survived {len(survived)}"
        )
    return lines


def _as_injected(schedule) -> list[str]:
    lines = ["", "Faults, as injected:", "", "```"]
    for fault in schedule:
        when = f"{fault.injected_at:7.1f} s" if fault.injected_at is not None else "      -  "
        fate = {True: "survived", False: "NOT survived", None: "-"}[fault.survived]
        lines.append(
            f"round {fault.round:3d} {when} {fault.kind:28s} {fault.hospital or '':12s} "
            f"{fault.stage or '':14s} {fate}  {fault.detail}"
        )
    lines.append("```")
    return lines
