"""A real federation on loopback for the deployment tests: Flower's SuperLink and SuperNodes as
subprocesses, started with fedward's own commands (`fedward server start`, `fedward client
start`, ...), with TLS and SuperNode authentication. Every process is killed (with its children)
when the tests using it end, and every wait is bounded.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from bench.soak_processes import kill_tree
from fedward.client.policy import model_content_hash
from fedward.client.privacy.ledger import PrivacyLedger
from fedward.client.secagg import write_signing_key

LABELS = ["cardiac", "respiratory"]
NOTES = {
    "cardiac": [
        "crushing chest pain radiating to the left arm, sweating, troponin rising",
        "palpitations and syncope, ecg shows atrial fibrillation with rapid rate",
    ],
    "respiratory": [
        "productive cough, fever and crackles at the right lung base",
        "wheeze and shortness of breath, peak flow reduced, responds to salbutamol",
    ],
}
HOSPITALS = ("north", "south")
START_TIMEOUT = 90.0


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end runs over a real federation (minutes on 2 CPU cores)"
    )


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fedward(*args: str) -> list[str]:
    """The `fedward` command of this Python environment."""
    script = Path(sys.executable).parent / "fedward"
    if script.is_file():
        return [str(script), *args]
    return [sys.executable, "-c", "from fedward.cli import main; main()", *args]


def process_env() -> dict[str, str]:
    """Environment for every process: one thread each (2 cores are shared by many), quick polls."""
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
    return env


def wait_until(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.5):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


class Process:
    """A background process with its output in a log file; `kill` takes its children too."""

    def __init__(self, command: list[str], log_path: Path, cwd: Path) -> None:
        self.log_path = log_path
        self.command = command
        self._log = open(log_path, "ab")  # noqa: SIM115 (open while the process lives)
        self.popen = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=process_env(),
            start_new_session=True,  # its own process group: killed as a whole
        )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{' '.join(self.command[:3])} still running after {timeout:.0f} s")

    def kill(self) -> None:
        """SIGKILL the process, its process group and every descendant (Flower starts some in
        their own sessions), like a crash or a power cut."""
        try:
            family = psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        kill_tree(self.popen, family)
        self._log.close()


def write_notes(path: Path, hospital: str, count: int = 40) -> None:
    """`count` short notes of two clearly different kinds, worded per hospital."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(count):
            label = LABELS[i % 2]
            note = NOTES[label][(i // 2) % 2]
            writer.writerow([f"{hospital} patient {i}: {note}", label])


class Federation:
    """A coordinator and hospitals in one temporary folder, driven through the `fedward` CLI."""

    def __init__(self, root: Path, model_dir: str) -> None:
        self.root = root
        self.model_dir = model_dir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.certs = root / "coordinator" / "certs"
        self.database = root / "coordinator" / "superlink.db"
        self.server: Process | None = None
        self.hospitals: dict[str, Process] = {}
        self.node_ids: dict[str, int] = {}
        self.processes: list[Process] = []
        self.runs = 0
        self.starts = 0  # every process start gets its own log file

    # --- setup ---------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run one `fedward` command to completion (bounded)."""
        return subprocess.run(
            fedward(*args),
            check=False,
            cwd=self.root,
            env=process_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def site(self, name: str) -> Path:
        return self.root / "hospitals" / name

    def prepare(self) -> None:
        (self.root / "coordinator").mkdir(parents=True)
        done = self.cli(
            "certs",
            "init",
            "--out",
            str(self.certs),
            "--server-name",
            "localhost",
            "--server-name",
            "127.0.0.1",
        )
        assert done.returncode == 0, done.stderr
        self.roster = {}
        for name in (*HOSPITALS, "intruder"):
            site = self.site(name)
            site.mkdir(parents=True)
            if name != "intruder":  # the hospitals exchanged their SecAgg signing keys
                self.roster[name] = write_signing_key(site / "secagg-signing.pem")
            done = self.cli("keys", "node", "--out", str(site), "--name", name)
            assert done.returncode == 0, done.stderr
            write_notes(site / "notes.csv", name)
            self.set_policy(name)

    def set_policy(self, name: str, **rules) -> None:
        """Write hospital `name`'s site policy (read again by every request)."""
        values = {
            "lifetime_epsilon": 50.0,
            "min_examples": 10,
            "max_rounds": 5,
            "min_secure_aggregation_hospitals": 2,  # the tests federate two hospitals
            "secagg_signing_key": str(self.site(name) / "secagg-signing.pem"),
            "allowed_model_hashes": [model_content_hash(self.model_dir)],  # the tiny model
            **rules,
        }
        text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
        text += "[secagg_roster]\n" + "".join(
            f"{member} = {json.dumps(key)}\n" for member, key in self.roster.items()
        )
        (self.site(name) / "policy.toml").write_text(text, encoding="utf-8")

    def start_server(self) -> Process:
        self.starts += 1
        self.server = Process(
            fedward(
                "server",
                "start",
                "--certs",
                str(self.certs),
                "--port",
                str(self.port),
                "--database",
                str(self.database),
            ),
            self.root / "coordinator" / f"superlink-{self.starts}.log",
            self.root,
        )
        self.processes.append(self.server)
        wait_until(
            lambda: "Uvicorn running on https" in self.server.log() or not self.server.running(),
            START_TIMEOUT,
            "the SuperLink to listen",
        )
        assert self.server.running(), self.server.log()[-3000:]
        return self.server

    def kill_server(self) -> None:
        assert self.server is not None
        self.server.kill()

    def register(self, name: str) -> None:
        done = self.cli(
            "server",
            "register",
            str(self.site(name) / f"{name}.pub"),
            "--server",
            self.address,
            "--ca",
            str(self.certs / "ca.crt"),
            "--name",
            name,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        self.node_ids[name] = int(done.stdout.rsplit("node id", 1)[1].strip())

    def start_hospital(self, name: str, *extra: str, wait: bool = True) -> Process:
        site = self.site(name)
        command = fedward(
            "client",
            "start",
            "--server",
            self.address,
            "--data",
            str(site / "notes.csv"),
            "--policy",
            str(site / "policy.toml"),
            "--ca",
            str(self.certs / "ca.crt"),
            "--key",
            str(site / f"{name}.key"),
            "--ledger",
            str(site / "ledger"),
            "--dataset-id",
            f"{name}-notes",
            "--device",
            "cpu",
            "--runtime-port",
            str(free_port()),
            *extra,
        )
        self.starts += 1
        process = Process(command, site / f"supernode-{self.starts}.log", self.root)
        self.processes.append(process)
        if wait:
            wait_until(
                lambda: "SuperNode ID" in process.log() or not process.running(),
                START_TIMEOUT,
                f"hospital {name} to connect",
            )
            assert process.running(), process.log()[-3000:]
            self.hospitals[name] = process
        return process

    free_port = staticmethod(free_port)
    wait_until = staticmethod(wait_until)

    def spawn(self, log_name: str, *args: str) -> Process:
        """Any `fedward` command in the background (killed at the end)."""
        process = Process(fedward(*args), self.root / log_name, self.root)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in reversed(self.processes):
            process.kill()

    # --- runs ----------------------------------------------------------------------------------

    def run_config(self, out: str, **values) -> Path:
        """A run.toml for the tiny model; small and quick."""
        self.runs += 1
        config = {
            "model": self.model_dir,
            "labels": LABELS,
            "rounds": 2,
            "hospitals": 2,
            "min_hospitals": 2,
            "target_epsilon": 5.0,
            "batch_size": 8,
            "max_length": 32,
            "round_timeout": 90.0,
            "secagg_timeout": 90.0,
            "device": "cpu",
            "out": str(self.root / "coordinator" / out),
            **values,
        }
        path = self.root / "coordinator" / f"run-{self.runs}.toml"
        path.write_text(
            "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()), encoding="utf-8"
        )
        return path

    def run_args(self, config: Path, *extra: str) -> list[str]:
        return [
            "run",
            "--config",
            str(config),
            "--server",
            self.address,
            "--ca",
            str(self.certs / "ca.crt"),
            *extra,
        ]

    def out(self, name: str) -> Path:
        return self.root / "coordinator" / name

    def history(self, out: str) -> dict:
        return json.loads((self.out(out) / "history.json").read_text(encoding="utf-8"))

    def ledger(self, name: str) -> PrivacyLedger:
        site = self.site(name)
        return PrivacyLedger.open(site / "ledger", f"{name}-notes")  # its --dataset-id

    def audit_records(self, path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def hospital_audit(self, name: str) -> list[dict]:
        path = self.site(name) / "ledger" / "audit.jsonl"
        return self.audit_records(path) if path.exists() else []


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model_dir) -> Iterator[Federation]:
    """A SuperLink (TLS, node auth) with the hospitals 'north' and 'south' registered and
    connected; 'intruder' has keys and data but was never registered."""
    federation = Federation(tmp_path_factory.mktemp("federation"), tiny_model_dir)
    try:
        federation.prepare()
        federation.start_server()
        for name in HOSPITALS:
            federation.register(name)
        for name in HOSPITALS:
            federation.start_hospital(name)
        yield federation
    finally:
        federation.close()
