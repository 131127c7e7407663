"""Many hospitals on one machine: peak memory of the whole process tree and wall time per round.

Runs `simulate` for 2, 10 and 50 hospitals on the default model with a fixed amount of data per
hospital, samples the resident memory of this process and all its children (Ray workers
included) every 0.2 s, and prints the peaks and their ratio to the smallest federation. Each
federation runs twice, with the frozen-prefix cache (client/prefix_cache.py) on and off, and the
difference of the peaks is the memory the cache adds; beside it, what the cached states of all
hospitals take in 16 bits (tokens x hidden size x 2 bytes, counted from the same notes).

    python -m bench.scale [--hospitals 2 10 50] [--notes 40] [--rounds 1]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time

import psutil

from fedward.common.config import RunConfig


class PeakMemory:
    """Peak resident memory (bytes) of this process tree while the context is open."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        root = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [root, *root.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run(hospitals: int, notes: int, rounds: int, secure: bool, cache: bool = True) -> dict:
    from fedward.simulation.runner import plan_workers, simulate

    with tempfile.TemporaryDirectory() as out:
        config = RunConfig.build(
            {
                "lora_variant": "lora",  # as scale.md records
                "hospitals": hospitals,
                "rounds": rounds,
                "notes_per_hospital": notes,
                "secure_aggregation": secure,
                "prefix_cache": cache,
                "out": out,
            }
        )
        workers = plan_workers(config.simulation, config.local.device).workers
        started = time.monotonic()
        with PeakMemory() as memory:
            result = simulate(config)
        wall = time.monotonic() - started
    per_round = [row["seconds"] for row in result.rounds]
    loads = {}
    for row in result.rounds:
        for hospital in row["hospitals"].values():
            if "worker_pid" in hospital:
                loads[hospital["worker_pid"]] = max(
                    loads.get(hospital["worker_pid"], 0), hospital["model_loads"]
                )
    return {
        "hospitals": hospitals,
        "workers": workers,
        "peak_mb": memory.peak / 2**20,
        "round_s": sum(per_round) / len(per_round),
        "wall_s": wall,
        "trained": sum(
            1 for row in result.rounds for h in row["hospitals"].values() if h.get("trained")
        ),
        "model_loads": sum(loads.values()),
        "worker_processes": len(loads),
    }


def main() -> None:
    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[2, 10, 50])
    parser.add_argument("--notes", type=int, default=40, help="synthetic notes per hospital")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-secure-aggregation", action="store_true")
    args = parser.parse_args()

    secure = not args.no_secure_aggregation
    rows = []
    for n in args.hospitals:
        row = run(n, args.notes, args.rounds, secure)
        row["uncached_peak_mb"] = run(n, args.notes, args.rounds, secure, cache=False)["peak_mb"]
        row["states_mb"] = cached_states_mb(n, args.notes)
        rows.append(row)
    base = rows[0]
    print(
        f"default model, {args.notes} notes per hospital, {args.rounds} round(s), "
        f"secure aggregation {'off' if args.no_secure_aggregation else 'on'}, DP on"
    )
    print(
        f"{'hospitals':>10}{'workers':>9}{'peak MB':>10}{'x smallest':>11}{'s/round':>9}"
        f"{'wall s':>8}{'trained':>9}{'model loads':>13}"
    )
    for row in rows:
        print(
            f"{row['hospitals']:>10}{row['workers']:>9}{row['peak_mb']:>10.0f}"
            f"{row['peak_mb'] / base['peak_mb']:>11.2f}{row['round_s']:>9.1f}{row['wall_s']:>8.1f}"
            f"{row['trained']:>9}{row['model_loads']:>6} in {row['worker_processes']} workers"
        )
    print("target: peak memory at 50 hospitals at most 1.3x that at 2")
    print("\nmemory of the frozen-prefix cache (peaks with the cache on and off)")
    print(
        f"{'hospitals':>10}{'peak MB on':>12}{'peak MB off':>13}{'added MB':>10}{'states MB':>11}"
    )
    for row in rows:
        print(
            f"{row['hospitals']:>10}{row['peak_mb']:>12.0f}{row['uncached_peak_mb']:>13.0f}"
            f"{row['peak_mb'] - row['uncached_peak_mb']:>10.0f}{row['states_mb']:>11.1f}"
        )


def cached_states_mb(hospitals: int, notes: int) -> float:
    """MiB the 16-bit cached states of every hospital's training notes take (all workers)."""
    from fedward.common.model import load_tokenizer
    from fedward.simulation.synthetic import generate_notes

    config = RunConfig(lora_variant="lora")
    tokenizer = load_tokenizer(config.spec.model.name)
    hidden = 384  # all-MiniLM-L6-v2
    tokens = 0
    for hospital in range(hospitals):
        texts = [
            note["text"]
            for note in generate_notes(hospital, notes, config.spec.training.seed, hospitals)
        ]
        encoded = tokenizer(texts, truncation=True, max_length=config.spec.task.max_length)
        tokens += sum(len(ids) for ids in encoded["input_ids"])
    return tokens * (1 - config.data_schema.val_fraction) * hidden * 2 / 2**20


if __name__ == "__main__":
    main()
