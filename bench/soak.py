"""A bounded soak of a real deployment: faults on a seeded schedule, invariants checked after.

Sets up, in one folder on loopback, a SuperLink (`fedward server start`: TLS, SuperNode
authentication) and N hospitals' SuperNodes (`fedward client start`), each a separate process
tree with its own synthetic patients (notes with a patient column), site policy (patient-level
DP, a SecAgg+ roster), privacy ledger and audit log. Then it runs R rounds of the default task
(diagnosis classification on fedward's synthetic notes) with secure aggregation on and
`--fraction` below 1, and injects faults on a schedule drawn from `--seed`
(the kinds, and when each counts as survived: bench/soak_faults.py).

Each fault is logged with its time and stage. After the run the invariants of
`bench/soak_checks.py` are checked, and the figures are printed and appended to
`bench/results/soak.md`: rounds attempted/completed/failed with reasons, faults injected and
survived by kind, ledger discrepancies, torn files, audit chains verified, wall time, peak RSS
per SuperNode and of the SuperLink, seconds per round with and without faults.

    python -m bench.soak --hospitals 10 --rounds 30 --seed 1 [--fraction 0.5] [--model PATH]

Without `--model`, a tiny randomly initialised BERT with the packaged tokenizer (as in the tests)
keeps each round to seconds of compute; `--model default` uses the packaged all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.soak_checks import check_deployment
from bench.soak_faults import (
    FAULT_KINDS,
    STAGE_MESSAGES,
    Fault,
    fault_schedule,
    judge_faults,
)
from bench.soak_hooks import SITECUSTOMIZE
from bench.soak_processes import (
    START_TIMEOUT,
    Process,
    SoakError,
    fedward,
    free_port,
    process_env,
    tiny_model,
    wait_until,
    write_patient_notes,
)
from bench.soak_report import report

__all__ = ["Fault", "Settings", "Soak", "main"]

RESULTS = Path(__file__).parent / "results" / "soak.md"
SENTINEL = "zqxvort"  # planted in the notes: a made-up word no log or message may ever hold


@dataclass
class Settings:
    hospitals: int = 3
    rounds: int = 10
    seed: int = 1
    fraction: float = 0.67
    notes: int = 40
    model: str | None = None
    faults: tuple[str, ...] = FAULT_KINDS
    stage_timeout: float = 30.0
    round_timeout: float = 60.0
    deadline: float = 1800.0
    root: Path | None = None
    schedule: list[Fault] | None = None  # explicit faults (several may share a round)
    extra: dict = field(default_factory=dict)


class Soak:
    """The deployment, the fault injector, and the checks afterwards."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.root or Path(tempfile.mkdtemp(prefix="fedward-soak-"))
        self.coordinator = self.root / "coordinator"
        self.certs = self.coordinator / "certs"
        self.database = self.coordinator / "superlink.db"
        self.out = self.coordinator / "out"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.names = [f"hospital-{i:02d}" for i in range(settings.hospitals)]
        self.superlink: Process | None = None
        self.runner: Process | None = None
        self.nodes: dict[str, Process] = {}
        self.retired: list[Process] = []  # killed processes (their peaks count too)
        self.superlinks: list[Process] = []
        self.starts = 0
        self.started = time.monotonic()
        self.events: list[str] = []
        self.resumes = 0
        self.planted = 0
        self.stopped_at: int | None = None  # rounds recorded when the deadline stopped the run

    # --- set-up --------------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.started

    def event(self, text: str) -> None:
        line = f"{self.now():8.1f} s  {text}"
        self.events.append(line)
        print(line, flush=True)

    def cli(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess:
        done = subprocess.run(
            fedward(*args), cwd=self.root, env=process_env(), capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise SoakError(f"fedward {' '.join(args[:2])}: {done.stdout[-2000:]}{done.stderr}")
        return done

    def site(self, name: str) -> Path:
        return self.root / "hospitals" / name

    def prepare(self) -> None:
        from fedward.client.policy import model_content_hash
        from fedward.client.secagg import write_signing_key

        self.coordinator.mkdir(parents=True, exist_ok=True)
        if self.settings.model in (None, "tiny"):
            self.model = tiny_model(self.coordinator / "tiny-model")
        else:
            from fedward.common.model import resolve_model_path

            self.model = str(resolve_model_path(self.settings.model))
        # what `fedward certs init` and `fedward keys node` do, without a process each
        from fedward.server.certs import init_ca_and_server, make_node_keys

        init_ca_and_server(self.certs, ["localhost", "127.0.0.1"])
        roster = {}
        for index, name in enumerate(self.names):
            site = self.site(name)
            site.mkdir(parents=True)
            roster[name] = write_signing_key(site / "secagg-signing.pem")
            make_node_keys(site, name)
            self.planted += write_patient_notes(
                site / "notes.csv",
                index,
                len(self.names),
                self.settings.notes,
                self.settings.seed,
                SENTINEL,
            )
            (site / "hook" / "replies").mkdir(parents=True)
            (site / "hook" / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
        model_hash = model_content_hash(self.model)
        for name in self.names:
            policy = {
                "lifetime_epsilon": 100.0,
                "dp_unit": "patient",
                "min_examples": 10,
                "max_rounds": self.settings.rounds,
                "min_secure_aggregation_hospitals": 2,
                "secagg_signing_key": str(self.site(name) / "secagg-signing.pem"),
                "allowed_model_hashes": [model_hash],
            }
            text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in policy.items())
            text += "[secagg_roster]\n" + "".join(
                f"{member} = {json.dumps(key)}\n" for member, key in roster.items()
            )
            (self.site(name) / "policy.toml").write_text(text, encoding="utf-8")
        from fedward.simulation.synthetic.notes import DIAGNOSES

        config = {
            "model": self.model,
            "labels": list(DIAGNOSES),
            "rounds": self.settings.rounds,
            "hospitals": len(self.names),
            "min_hospitals": 2,
            "fraction": self.settings.fraction,
            "dp_unit": "patient",
            "target_epsilon": 8.0,
            "local_epochs": 1,
            "batch_size": 8,
            "max_length": 64,
            "round_timeout": self.settings.round_timeout,
            "secagg_timeout": self.settings.stage_timeout,
            "device": "cpu",
            "out": str(self.out),
            **self.settings.extra,
        }
        self.config = self.coordinator / "run.toml"
        self.config.write_text(
            "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()), encoding="utf-8"
        )

    def start_superlink(self) -> None:
        self.starts += 1
        self.superlink = Process(
            fedward(
                "server", "start", "--certs", str(self.certs), "--port", str(self.port),
                "--database", str(self.database),
            ),
            self.coordinator / f"superlink-{self.starts}.log", self.root, process_env(),
        )  # fmt: skip
        self.superlinks.append(self.superlink)
        link = self.superlink
        wait_until(
            lambda: "Uvicorn running on https" in link.log() or not link.running(),
            START_TIMEOUT,
            "the SuperLink to listen",
        )
        if not link.running():
            raise SoakError(f"the SuperLink did not start:\n{link.log()[-3000:]}")

    def register_all(self) -> None:
        """`fedward server register` for every hospital, a few at a time."""

        def register(name: str) -> subprocess.Popen:
            command = fedward(
                "server", "register", str(self.site(name) / f"{name}.pub"),
                "--server", self.address, "--ca", str(self.certs / "ca.crt"), "--name", name,
            )  # fmt: skip
            return subprocess.Popen(
                command, cwd=self.root, env=process_env(), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip

        for first in range(0, len(self.names), 4):
            running = [(name, register(name)) for name in self.names[first : first + 4]]
            for name, process in running:
                output, _ = process.communicate(timeout=180)
                if process.returncode != 0:
                    raise SoakError(f"registering {name} failed: {output[-2000:]}")

    def start_node(self, name: str, wait: bool = True) -> Process:
        site = self.site(name)
        env = process_env(
            {
                "PYTHONPATH": os.pathsep.join(
                    [str(site / "hook"), *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
                "FEDWARD_SOAK_ENOSPC": str(site / "enospc-armed"),
                "FEDWARD_SOAK_LEDGER": f"{name}-notes",
                "FEDWARD_SOAK_REPLIES": str(site / "hook" / "replies"),
                "FEDWARD_SOAK_REPLAY": str(site / "replay-armed"),
                "FEDWARD_SOAK_TRUNCATE": str(site / "truncate-armed"),
            }
        )
        self.starts += 1
        process = Process(
            fedward(
                "client", "start", "--server", self.address, "--data", str(site / "notes.csv"),
                "--policy", str(site / "policy.toml"), "--ca", str(self.certs / "ca.crt"),
                "--key", str(site / f"{name}.key"), "--ledger", str(site / "ledger"),
                "--dataset-id", f"{name}-notes", "--patient-column", "patient",
                "--device", "cpu", "--runtime-port", str(free_port()),
            ),
            site / f"supernode-{self.starts}.log", self.root, env,
        )  # fmt: skip
        self.nodes[name] = process
        if wait:
            wait_until(
                lambda: "SuperNode ID" in process.log() or not process.running(),
                START_TIMEOUT,
                f"{name} to connect",
            )
            if not process.running():
                raise SoakError(f"{name} did not start:\n{process.log()[-3000:]}")
        return process

    def start_run(self, resume: bool) -> None:
        self.starts += 1
        args = ["run", "--config", str(self.config), "--server", self.address]
        args += ["--ca", str(self.certs / "ca.crt"), *(["--resume"] if resume else [])]
        self.runner = Process(
            fedward(*args), self.coordinator / f"run-{self.starts}.log", self.root, process_env()
        )

    # --- following the run ---------------------------------------------------------------------

    def history(self) -> dict:
        try:
            return json.loads((self.out / "history.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {"rounds": []}

    def received(self, name: str) -> Counter:
        """How many messages of each type this hospital's current SuperNode received."""
        counts: Counter = Counter()
        process = self.nodes.get(name)
        if process is None:
            return counts
        for line in process.log().splitlines():
            if "Receiving: " in line:
                counts[line.split("Receiving: ", 1)[1].split(" message", 1)[0]] += 1
        return counts

    def sample_memory(self) -> None:
        for process in [*self.nodes.values(), *self.superlinks]:
            if process.running():
                process.sample_rss()

    def run(self) -> None:
        """Start everything, run the rounds with the faults, until done or the deadline."""
        settings = self.settings
        self.event(f"set-up in {self.root}")
        self.prepare()
        self.start_superlink()
        self.register_all()
        for name in self.names:
            self.start_node(name, wait=False)
        for name in self.names:
            process = self.nodes[name]
            wait_until(lambda p=process: "SuperNode ID" in p.log(), START_TIMEOUT, name)
        self.schedule = settings.schedule or fault_schedule(
            settings.faults, settings.rounds, settings.seed
        )
        self.event(
            "schedule: " + ", ".join(f"round {f.round} {f.kind}" for f in self.schedule) or "none"
        )
        self.started_run = self.now()
        self.start_run(resume=False)
        pending = list(self.schedule)
        restarts: list[tuple[str, int]] = []  # (hospital, restart once this round is recorded)
        frozen: list[tuple[str, float]] = []  # (hospital, SIGCONT at)
        baseline: dict[str, Counter] = {}
        seen_rounds = -1
        last_memory = 0.0
        while True:
            if self.now() > settings.deadline:
                self.event(f"deadline of {settings.deadline:.0f} s reached; stopping the run")
                self.stopped_at = len(self.history()["rounds"])
                break
            if self.now() - last_memory > 1.0:
                self.sample_memory()
                last_memory = self.now()
            done_rounds = len(self.history()["rounds"])
            if done_rounds != seen_rounds:  # a round ended: new baselines for "this round"
                seen_rounds = done_rounds
                baseline = {name: self.received(name) for name in self.names}
            current = done_rounds + 1
            for name, after in list(restarts):
                if done_rounds >= after:
                    restarts.remove((name, after))
                    self.start_node(name)
                    baseline[name] = Counter()
                    self.event(f"{name} restarted")
            for name, until in list(frozen):
                if self.now() >= until:
                    frozen.remove((name, until))
                    self.nodes[name].signal_tree(signal.SIGCONT)
                    self.event(f"{name} continued (SIGCONT)")
            if not self.runner.running():
                code = self.runner.popen.returncode
                history = self.history()
                if len(history["rounds"]) >= settings.rounds:
                    self.event(f"run finished (exit {code})")
                    break
                self.event(f"fedward run exited {code} at round {current}; resuming")
                self.resumes += 1
                self.start_run(resume=True)
                continue
            if pending and pending[0].round < current:  # its round ended before it could fire
                missed = pending.pop(0)
                missed.detail = "not injected: its round ended before the trigger"
                self.event(f"round {missed.round} {missed.kind}: {missed.detail}")
                continue
            for fault in [f for f in pending if f.round == current]:
                busy = {f.hospital for f in self.schedule if f.round == current and f.hospital}
                if self.try_inject(fault, baseline, restarts, frozen, current, busy):
                    pending.remove(fault)
                    break  # the SuperLink may have been replaced: look again
            time.sleep(0.3)
        for name, _ in frozen:
            self.nodes[name].signal_tree(signal.SIGCONT)
        self.wall = self.now()

    def sampled_now(self, baseline: dict[str, Counter], message: str, busy: set[str]) -> str | None:
        """The first hospital (by name, not `busy` with another fault) that received `message`
        in the current round."""
        for name in self.names:
            if name in busy or not self.nodes[name].running():
                continue
            if self.received(name)[message] > baseline.get(name, Counter())[message]:
                return name
        return None

    def try_inject(self, fault, baseline, restarts, frozen, current, busy) -> bool:
        """Inject `fault` once its trigger is seen; True when it was injected."""
        if fault.kind.startswith("supernode_kill@"):
            stage = fault.kind.split("@", 1)[1]
            name = self.sampled_now(baseline, STAGE_MESSAGES[stage], busy)
            if name is None:
                return False
            self.nodes[name].sample_rss()
            self.nodes[name].kill()
            self.retired.append(self.nodes[name])
            restarts.append((name, current))
            self.record(fault, name, stage, "kill -9 of the SuperNode's process tree")
            return True
        if fault.kind == "supernode_freeze":
            name = self.sampled_now(baseline, STAGE_MESSAGES["share_keys"], busy)
            if name is None:
                return False
            self.nodes[name].signal_tree(signal.SIGSTOP)
            hold = self.settings.stage_timeout + 10.0
            frozen.append((name, self.now() + hold))
            self.record(fault, name, "share_keys", f"SIGSTOP for {hold:.0f} s, then SIGCONT")
            return True
        if fault.kind == "ledger_enospc":
            name = self.sampled_now(baseline, STAGE_MESSAGES["advertise_keys"], busy)
            if name is None:
                return False
            (self.site(name) / "enospc-armed").write_text("1")  # let the reservation pass
            self.record(fault, name, "advertise_keys", "ENOSPC on the ledger write after training")
            return True
        if fault.kind == "replayed_message":
            # a hospital that has a share-keys reply of an earlier round to send again
            name = self.sampled_now(
                baseline,
                STAGE_MESSAGES["advertise_keys"],
                busy | {n for n in self.names if not self.kept_reply(n)},
            )
            if name is None:
                return False
            (self.site(name) / "replay-armed").write_text("")
            self.record(fault, name, "share_keys", "its share-keys reply of an earlier round")
            return True
        if fault.kind == "truncated_message":
            name = self.sampled_now(baseline, STAGE_MESSAGES["advertise_keys"], busy)
            if name is None:
                return False
            (self.site(name) / "truncate-armed").write_text("")
            self.record(fault, name, "masked_update", "its masked update cut to half its bytes")
            return True
        if fault.kind == "superlink_kill":
            name = self.sampled_now(baseline, STAGE_MESSAGES["share_keys"], busy)
            if name is None:
                return False
            self.superlink.sample_rss()
            self.superlink.kill()
            self.runner.kill()
            self.record(fault, None, "share_keys", "kill -9 of the SuperLink and of fedward run")
            self.start_superlink()
            self.resumes += 1
            self.start_run(resume=True)
            self.event("SuperLink restarted; fedward run --resume")
            return True
        raise SoakError(f"unknown fault kind {fault.kind}")

    def kept_reply(self, name: str) -> bool:
        return (self.site(name) / "hook" / "replies" / "share_keys.pkl").exists()

    def record(self, fault: Fault, hospital: str | None, stage: str, detail: str) -> None:
        fault.hospital, fault.stage, fault.detail = hospital, stage, detail
        fault.injected_at = self.now()
        self.event(f"round {fault.round} FAULT {fault.kind} {hospital or ''} in {stage}: {detail}")

    def close(self) -> None:
        self.wall = getattr(self, "wall", None) or self.now()
        self.started_run = getattr(self, "started_run", None) or self.wall
        self.schedule = getattr(self, "schedule", [])
        for process in [*self.nodes.values(), *self.superlinks]:
            if process.running():
                process.sample_rss()
        for process in [self.runner, *self.nodes.values(), *self.superlinks]:
            if process is not None:
                process.kill()

    # --- afterwards ----------------------------------------------------------------------------

    def check(self) -> dict:
        """Every invariant of bench/soak_checks.py, on what the run left behind, and the
        verdict on each fault."""
        # a run the deadline stopped is checked on the rounds it reached (the report says so)
        reached = self.settings.rounds if self.stopped_at is None else self.stopped_at
        sites = {name: self.site(name) for name in self.names}
        result = check_deployment(self.out, sites, reached, SENTINEL, self.root)
        judge_faults(self.schedule, result["history"], self.site)
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hospitals", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--notes", type=int, default=40, help="Synthetic notes per hospital.")
    parser.add_argument("--model", default=None, help="tiny (default), default, or a folder.")
    parser.add_argument("--faults", default=",".join(FAULT_KINDS), help="Comma-separated kinds.")
    parser.add_argument("--stage-timeout", type=float, default=30.0)
    parser.add_argument("--round-timeout", type=float, default=90.0)
    parser.add_argument("--deadline", type=float, default=1800.0, help="Seconds for the run.")
    parser.add_argument("--root", type=Path, default=None, help="Folder (default: a temp one).")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Appended to; '-': none.")
    args = parser.parse_args(argv)
    faults = tuple(kind for kind in args.faults.split(",") if kind)
    unknown = set(faults) - set(FAULT_KINDS)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
    settings = Settings(
        hospitals=args.hospitals, rounds=args.rounds, seed=args.seed, fraction=args.fraction,
        notes=args.notes, model=args.model, faults=faults, stage_timeout=args.stage_timeout,
        round_timeout=args.round_timeout, deadline=args.deadline, root=args.root,
    )  # fmt: skip
    soak = Soak(settings)
    try:
        soak.run()
    except SoakError as exc:  # still check and report what the run left behind
        soak.event(f"soak stopped: {exc}")
        soak.stopped_at = len(soak.history()["rounds"])
    finally:
        soak.close()
    result = soak.check()
    text = report(soak, result, "python -m bench.soak " + " ".join(argv or sys.argv[1:]))
    print(text)
    if str(args.results) != "-":
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a", encoding="utf-8") as handle:
            handle.write("\n" + text)
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
