"""Scale in simulation for the soak (issue 42): many hospitals, a sampled cohort, SecAgg+.

Runs `simulate` (the same code as `fedward simulate`) for `--hospitals` hospitals at
`--fraction`, once with SecAgg+ over a neighbour graph and once without (the plain round), and
prints: wall time, peak resident memory of the whole process tree and of the largest single
process in it (a worker), and seconds per round; the difference of the two runs' seconds per
round is what SecAgg+ costs a round. The server's own aggregation work per round (`agg s`: the
SecAgg+ session's computation, or the plain validation and average, without the wait for
hospitals; `agg ms`, its mean per round in milliseconds) is read from each round's
`aggregation_seconds` in the history.

    python -m bench.soak_scale [--hospitals 100] [--fraction 0.1] [--rounds 5] [--neighbours 6]

Appends its table to bench/results/soak.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

from fedward.common.config import RunConfig

RESULTS = Path(__file__).parent / "results" / "soak.md"


class TreeMemory:
    """Peak RSS (bytes) of this process tree, and of each process in it, while open."""

    def __init__(self, interval: float = 0.3) -> None:
        self.interval = interval
        self.peak = 0
        self.per_process: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        root = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [root, *root.children(recursive=True)]:
                try:
                    rss = process.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                if process.pid != root.pid:
                    self.per_process[process.pid] = max(self.per_process.get(process.pid, 0), rss)
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run(args, secure: bool) -> dict:
    from fedward.simulation.runner import plan_workers, simulate

    with tempfile.TemporaryDirectory() as out:
        config = RunConfig.build(
            {
                "hospitals": args.hospitals,
                "fraction": args.fraction,
                "min_hospitals": 2,
                "rounds": args.rounds,
                "notes_per_hospital": args.notes,
                "secure_aggregation": secure,
                "secagg_neighbours": args.neighbours if secure else 0,
                "out": out,
                **({"model": args.model} if args.model else {}),
            }
        )
        workers = plan_workers(config.simulation, config.local.device).workers
        started = time.monotonic()
        with TreeMemory() as memory:
            result = simulate(config)
        wall = time.monotonic() - started
    rows = result.rounds
    return {
        "secure": secure,
        "workers": workers,
        "wall_s": wall,
        "peak_mb": memory.peak / 2**20,
        "worker_peak_mb": max(memory.per_process.values(), default=0) / 2**20,
        "round_s": sum(row["seconds"] for row in rows) / max(len(rows), 1),
        "aggregation_s": sum(row["aggregation_seconds"] for row in rows) / max(len(rows), 1),
        "ok": sum(row["status"] == "ok" for row in rows),
        "rounds": len(rows),
        "trained": sum(1 for row in rows for h in row["hospitals"].values() if h.get("trained")),
    }


def main() -> None:
    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--notes", type=int, default=20, help="synthetic notes per hospital")
    parser.add_argument("--neighbours", type=int, default=6, help="SecAgg+ graph degree")
    parser.add_argument("--model", default=None, help="default: the packaged MiniLM")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    load = os.getloadavg()
    header = [
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: simulation, {args.hospitals} hospitals at "
        f"fraction {args.fraction}, {args.rounds} rounds",
        "",
        f"Command: `python -m bench.soak_scale --hospitals {args.hospitals} --fraction "
        f"{args.fraction} --rounds {args.rounds} --notes {args.notes} --neighbours "
        f"{args.neighbours}{' --no-plain' if not args.plain else ''}`; model "
        f"{args.model or 'all-MiniLM-L6-v2 (packaged)'}; {os.cpu_count()} cores, load average "
        f"at the start {load[0]:.1f} (shared). Each row is appended as its run ends.",
        "",
        f"    {'aggregation':<22}{'workers':>8}{'wall s':>8}{'peak MiB':>10}{'worker MiB':>11}"
        f"{'s/round':>9}{'agg ms':>8}{'rounds ok':>11}{'trained':>9}",
    ]
    write(args.results, "\n" + "\n".join(header) + "\n")
    for secure in (True, False) if args.plain else (True,):
        row = run(args, secure=secure)
        name = f"SecAgg+ k={args.neighbours}" if row["secure"] else "plain"
        write(
            args.results,
            f"    {name:<22}{row['workers']:>8}{row['wall_s']:>8.0f}{row['peak_mb']:>10.0f}"
            f"{row['worker_peak_mb']:>11.0f}{row['round_s']:>9.1f}"
            f"{row['aggregation_s'] * 1000:>8.1f}"
            f"{row['ok']:>7}/{row['rounds']:<3}{row['trained']:>9}\n",
        )


def write(path: Path, text: str) -> None:
    print(text, end="", flush=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
