"""Behaviour unchanged, shown (issue 43): one seeded run without DP, its figures kept, and the
same run after a refactor compared with them bit for bit.

The run is a small `fedward simulate` (three hospitals of 120 notes, two rounds, each hospital's
own model at the end, `--seed 1`, `--no-dp` so that no DP noise is drawn from the operating
system), in two arms: `clear` (no secure aggregation) and `secagg` (SecAgg+ on). Its figures
are every per-round metric in history.json, the run's settings, each hospital's own-model
report, and a sha256 of every file the run saved as an adapter (the global one and each
hospital's own).

`--save` runs each arm twice on the base commit: what differs between the two runs of the same
commit is kept as that arm's varying fields and left out of the comparison. Besides run ids,
process ids, the output folder and timings (`VARYING`), that is everything downstream of the
first secure sum in the `secagg` arm: SecAgg+ rounds each update's quantized coordinates
stochastically with a generator seeded by the operating system (common/secagg/quantize.py), so
only the first round's local training is deterministic there. The `clear` arm must have no
varying field at all.

One figure depended on the order the hospitals' replies arrive in, which the machine's load
decides: a round's mean training loss was summed in arrival order, so it could differ in its
last bit. server/strategy.py now sums in the hospitals' order (since 310b0fc); a differing round
mean is still accepted, and said so, when it is the mean of the very same per-hospital losses
(compared bit for bit) in another order (`reply_order_only`), for figures saved before that.

Each adapter's README.md is left out of the figures, in a saved file and in a new run alike: it
is PEFT's model card, which names the base model's path on this machine (inside the virtual
environment), so it differed between two checkouts of the same commit.

    python -m bench.same_figures --save bench/results/same_figures.json    # on the base commit
    python -m bench.same_figures --against bench/results/same_figures.json  # after the change
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

#: The run: small enough for a laptop's minute, and every mechanism a round has except DP noise.
SIMULATE = [
    "fedward",
    "simulate",
    "--no-dp",
    "--rounds",
    "2",
    "--hospitals",
    "3",
    "--notes-per-hospital",
    "120",
    "--seed",
    "1",
]

#: The two arms: secure aggregation off and on.
ARMS = {"clear": "--no-secure-aggregation", "secagg": "--secure-aggregation"}

#: Fields that differ between any two runs: ids, process ids, the output folder, timings.
VARYING = {"run_id", "flower_run_id", "worker_pid", "out", "seconds", "aggregation_seconds"}


def without_varying(value: object) -> object:
    """`value` with every dict key in `VARYING` left out, at any depth."""
    if isinstance(value, dict):
        return {k: without_varying(v) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [without_varying(v) for v in value]
    return value


def file_bytes(path: Path) -> bytes:
    """A saved file's bytes; PEFT's adapter_config.json with its `target_modules` sorted (PEFT
    writes a set there, in an order that changes with each process's hash seed)."""
    if path.name != "adapter_config.json":
        return path.read_bytes()
    content = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(content.get("target_modules"), list):
        content["target_modules"] = sorted(content["target_modules"])
    return json.dumps(content, sort_keys=True).encode()


#: Saved files that are no figure of the run: PEFT's model card names a path on this machine.
NOT_FIGURES = {"README.md"}


def adapter_digests(out: Path) -> dict[str, str]:
    """sha256 of each file of the global adapter and of every hospital's own adapter, but for
    `NOT_FIGURES`."""
    files = sorted([*(out / "adapter").iterdir(), *(out / "own").glob("*/*")])
    return {
        str(path.relative_to(out)): hashlib.sha256(file_bytes(path)).hexdigest()
        for path in files
        if path.is_file() and path.name not in NOT_FIGURES
    }


def without_model_cards(saved: dict) -> dict:
    """An arm's saved figures without the digests of `NOT_FIGURES` (files saved before they
    were left out)."""
    digests = {
        name: digest
        for name, digest in saved["adapter_sha256"].items()
        if Path(name).name not in NOT_FIGURES
    }
    return {**saved, "adapter_sha256": digests}


def figures(out: Path) -> dict:
    """The run's deterministic figures: history.json, own-model reports, adapter digests."""
    history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    reports = {
        path.parent.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted((out / "own").glob("*/report.json"))
    }
    return {
        "history": without_varying(history),
        "own_reports": reports,
        "adapter_sha256": adapter_digests(out),
    }


def differences(before: object, after: object, where: str = "") -> list[str]:
    """Every path at which `after` differs from `before` (exact equality, floats included)."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(set(before) | set(after)):
            if key not in before or key not in after:
                found.append(f"{where}/{key}: only in {'after' if key in after else 'before'}")
            else:
                found.extend(differences(before[key], after[key], f"{where}/{key}"))
        return found
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [
            d
            for i, (b, a) in enumerate(zip(before, after))
            for d in differences(b, a, f"{where}/{i}")
        ]
    return [] if before == after else [f"{where}: {before!r} -> {after!r}"]


def summary(found: dict) -> list[str]:
    """What a reader checks by eye: per-round loss and macro-F1, and the adapters' digests."""
    lines = []
    for row in found["history"]["rounds"]:
        lines.append(
            f"round {row['round']}: train_loss {row['train_loss']!r} "
            f"val loss {row['global']['loss']!r} macro_f1 {row['global']['macro_f1']!r}"
        )
    for hospital, report in found["own_reports"].items():
        lines.append(
            f"{hospital}: alone {report['alone']} global {report['global']} own {report['own']}"
        )
    lines.extend(f"{name} {digest[:16]}" for name, digest in found["adapter_sha256"].items())
    return lines


def run_arm(arm: str, out: Path, run: bool = True) -> dict:
    """Run `arm` into `out` (a fresh folder; `run` False: read it as an earlier run left it);
    its figures."""
    if run:
        subprocess.run([*SIMULATE, ARMS[arm], "--out", str(out)], check=True, capture_output=True)
    return json.loads(json.dumps(figures(out)))  # the same JSON round trip as a saved file


def reply_order_only(path: str, found: dict) -> bool:
    """Whether the figure at `path` is a round's mean training loss that equals the mean of
    that round's per-hospital losses in some order of the replies (`weighted_mean`)."""
    from fedward.server.aggregation import weighted_mean

    match = re.fullmatch(r"/history/rounds/(\d+)/train_loss", path)
    if match is None:
        return False
    row = found["history"]["rounds"][int(match.group(1))]
    pairs = [
        (entry["train_loss"], entry["num_train_examples"])
        for entry in row["hospitals"].values()
        if "train_loss" in entry and "num_train_examples" in entry
    ]
    means = {weighted_mean(list(order)) for order in itertools.permutations(pairs)}
    return row["train_loss"] in means


def leaves(value: object) -> int:
    """How many numbers and strings `value` holds: what a comparison compares."""
    if isinstance(value, dict):
        return sum(leaves(v) for v in value.values())
    if isinstance(value, list):
        return sum(leaves(v) for v in value)
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="run into this folder (default: a temporary one)")
    parser.add_argument("--save", type=Path, help="run twice, write the figures to this JSON file")
    parser.add_argument("--against", type=Path, help="compare with figures saved by --save")
    parser.add_argument("--no-run", action="store_true", help="read the runs left in --work")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="same-figures-"))
    saved = {"figures": {}, "varying": {}}
    changed_any = False
    for arm in ARMS:
        found = run_arm(arm, work / f"{arm}-1", not args.no_run)
        print(f"--- {arm}\n" + "\n".join(summary(found)))
        if args.save:
            again = run_arm(arm, work / f"{arm}-2", not args.no_run)
            varying = [line.split(":")[0] for line in differences(found, again)]
            print(f"{arm}: {len(varying)} of {leaves(found)} figures differ between two runs")
            saved["figures"][arm], saved["varying"][arm] = found, varying
        if args.against:
            before = json.loads(args.against.read_text(encoding="utf-8"))
            varying = set(before["varying"][arm])
            base = without_model_cards(before["figures"][arm])
            changed = [
                line for line in differences(base, found) if line.split(":")[0] not in varying
            ]
            reordered = [line for line in changed if reply_order_only(line.split(":")[0], found)]
            changed = [line for line in changed if line not in reordered]
            for line in reordered:
                print(f"{line} (the same per-hospital losses, summed in another reply order)")
            compared = leaves(base) - len(varying) - len(reordered)
            same = f"{arm}: {compared} figures bit-identical to {args.against}"
            print("\n".join(changed) or same)
            changed_any = changed_any or bool(changed)
    if args.save:
        args.save.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"figures saved to {args.save}")
    sys.exit(1 if changed_any else 0)


if __name__ == "__main__":
    main()
