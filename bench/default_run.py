"""The default `fedward simulate`, run several times: the one source of the figures the README and
docs/simulation.md quote (issue 41): wall time, the global model's macro-F1, each hospital's
alone / global / own, and the README's first prediction.

Each run is the README's own command in a fresh output folder, as a user runs it (a separate
process, the DP noise drawn from the operating system), then `fedward predict` on the README's
two notes. One JSON line per run is appended to `--log`; `--report` prints the table with the
spread (min-max) over the runs.

    python -m bench.default_run --runs 3
    python -m bench.default_run --report
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

#: The README's two notes (its "first prediction" block).
NOTES = (
    "68F with fever, productive cough, RLL crackles",
    "66M with fever, cough, confusion, BP 88/52",
)


def one_run(work: Path) -> dict:
    """The README's `fedward simulate`, then `fedward predict` on its notes; the figures."""
    out = work / "fedward-out"
    started = time.monotonic()
    subprocess.run(["fedward", "simulate", "--out", str(out)], check=True, capture_output=True)
    seconds = time.monotonic() - started
    history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    rounds = history["rounds"]
    last = rounds[-1]
    kept = max(rounds, key=lambda row: row["global"].get("macro_f1", float("-inf")))
    joining = {
        name: {
            key.removeprefix("personal_"): value
            for key, value in figures.items()
            if key.startswith("personal_")
        }
        for name, figures in last["hospitals"].items()
    }
    predicted = subprocess.run(
        ["fedward", "predict", "--adapter", str(out / "adapter"), *NOTES],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {
        "seconds": round(seconds, 1),
        "macro_f1_by_round": [row["global"].get("macro_f1") for row in rounds],
        "kept_round": kept["round"],
        "kept_macro_f1": kept["global"].get("macro_f1"),
        "worth_joining": joining,
        "prediction": predicted,
    }


def top_label(prediction: str, note: str) -> tuple[str, float]:
    """The first label and probability printed under `note`."""
    lines = prediction.splitlines()
    first = lines[lines.index(note) + 1]
    label, probability = re.match(r"\s*(.+?)\s+([0-9.]+)$", first).groups()
    return label, float(probability)


def report(log: Path) -> str:
    runs = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]

    def spread(values: list[float], digits: int = 3) -> str:
        return (
            f"{statistics.mean(values):.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})"
        )

    out = [f"{len(runs)} runs; mean (min-max)", ""]
    out.append(f"- wall time: {spread([r['seconds'] for r in runs], 0)} s")
    out.append(f"- kept round's global macro-F1: {spread([r['kept_macro_f1'] for r in runs])}")
    out.append(f"- kept rounds: {', '.join(str(r['kept_round']) for r in runs)}")
    for note in NOTES:
        tops = [top_label(r["prediction"], note) for r in runs]
        labels = ", ".join(f"{label} {p:.3f}" for label, p in tops)
        out.append(f"- first label for {note!r}: {labels}")
    names = sorted({name for r in runs for name in r["worth_joining"]})
    if names:
        out += ["", "| hospital | alone | global | own |", "| --- | --- | --- | --- |"]
        for name in names:
            cells = [
                spread([r["worth_joining"][name][key] for r in runs if name in r["worth_joining"]])
                for key in ("alone", "global", "own")
            ]
            out.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--log", type=Path, default=Path("bench/results/default_run.jsonl"))
    parser.add_argument("--report", action="store_true", help="print the table of --log")
    args = parser.parse_args()
    if not args.report:
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="fedward-default-") as work:
                row = one_run(Path(work))
            print(json.dumps({k: v for k, v in row.items() if k != "prediction"}), flush=True)
            with args.log.open("a", encoding="utf-8") as log:
                log.write(json.dumps(row) + "\n")
    print(report(args.log))


if __name__ == "__main__":
    main()
