"""A hospital's side of a deployment: Flower's SuperNode with fedward's node config, and only
fedward's own ClientApp.

`fedward client start` checks the hospital's files up front (data, policy, CA, key), writes the
node config as a TOML file next to the ledger, and starts

    flower-supernode --superlink HOST:PORT --root-certificates ca.crt \
        --auth-supernode-private-key node.key --port 9094 --node-config <ledger>/supernode.toml \
        --isolation process

The SuperNode connects out to the coordinator over HTTPS (TLS on by default) and authenticates
with the node key. With `--isolation process` it runs no ClientApp itself: the `fedward client
start` process stays in front (`run_supernode`) and starts fedward's own ClientApp process for
each message (client/deploy/runtime.py), which refuses any app bundle that carries code, names
another component or asks for dependencies (client/deploy/bundle.py), and otherwise runs the
installed `fedward.client.app:app`. The ClientApp finds the data, policy, ledger and audit log
through the
node config (see client/site/node.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedward.client.deploy.node_config import (
    AUDIT_KEY,
    CACHE_KEYS,
    DATA_KEY,
    DATASET_KEY,
    DEVICE_KEY,
    LEDGER_KEY,
    NAME_KEY,
    OFFLINE_ENV,
    POLICY_KEY,
)
from fedward.client.policy import SitePolicy
from fedward.client.privacy.ledger import IDENTIFIER
from fedward.common.config import DataSchema, LocalSettings
from fedward.common.errors import ConfigError, DataError
from fedward.common.programs import flower_env, flower_program

log = logging.getLogger(__name__)

DEFAULT_RUNTIME_PORT = 9094

NODE_CONFIG_FILE = "supernode.toml"


@dataclass(frozen=True)
class HospitalSettings:
    """Everything `fedward client start` needs.

    Attributes:
        server: The coordinator's SuperLink as host:port.
        data: The hospital's data file (never leaves this machine).
        policy: The hospital's site policy (TOML).
        ledger: Folder of the privacy ledgers (keep it, and back it up: deleting it resets the
            hospital's privacy budget).
        ca: The federation's CA certificate (`ca.crt` from the coordinator).
        key: This hospital's SuperNode private key (`fedward keys node`).
        name: The name this hospital reports in round tables and audit logs.
        dataset_id: The name of this data set's privacy ledger (`<ledger>/<dataset_id>.json`),
            required: a default taken from a name an operator may change (the node key file's,
            the hospital's) would start a fresh lifetime budget when it changed. Keep it when
            records are added or corrected: the budget continues.
        device: auto, cpu or cuda.
        audit_log: The hospital's audit log (default `<ledger>/audit.jsonl`).
        runtime_port: Local port of the SuperNode's Runtime API (one per SuperNode on a host).
        insecure: Plain HTTP without node authentication (testing only).
        max_wait_time: Give up reconnecting after this many seconds (None: never).
        schema: How to read the data file (text and label columns, validation share): the
            hospital's own, never the run's.
        prefix_cache: Cache the frozen layers' outputs once per run (client/prefix_cache.py);
            off: recompute them in every epoch (slower, less memory).
        prefix_cache_mb: Memory (MiB) the cache may hold before it spills to a private
            temporary folder.
    """

    server: str
    data: Path
    policy: Path
    ledger: Path = Path("fedward-ledger")
    ca: Path | None = None
    key: Path | None = None
    name: str = "hospital"
    dataset_id: str | None = None
    device: str = "auto"
    audit_log: Path | None = None
    runtime_port: int = DEFAULT_RUNTIME_PORT
    insecure: bool = False
    max_wait_time: float | None = None
    schema: DataSchema = field(default_factory=DataSchema)
    prefix_cache: bool = LocalSettings.model_fields["prefix_cache"].default
    prefix_cache_mb: int = LocalSettings.model_fields["prefix_cache_mb"].default
    own_model: bool = LocalSettings.model_fields["own_model"].default


def check_settings(settings: HospitalSettings) -> SitePolicy:
    """Fail before starting anything when a file is missing or the policy is invalid."""
    if ":" not in settings.server:
        raise ConfigError(f"--server {settings.server!r}: give HOST:PORT, e.g. fl.example.org:8000")
    if not settings.data.exists():
        raise DataError(f"{settings.data}: data file not found; check --data")
    policy = SitePolicy.load(settings.policy)
    if not settings.dataset_id:
        raise ConfigError(
            "--dataset-id: required, the name of this data set's privacy ledger (e.g. "
            "icu-notes); keep it for as long as the data set lives, whatever its file or the "
            "node key are called, or its lifetime budget starts again"
        )
    if not IDENTIFIER.fullmatch(settings.dataset_id):
        raise ConfigError(
            f"--dataset-id {settings.dataset_id!r}: a data-set id is 1 to 64 letters, digits, "
            "'_' or '-', starting with a letter or digit"
        )
    if settings.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {settings.device!r}: use auto, cpu or cuda")
    if settings.prefix_cache_mb < 0:
        raise ConfigError(
            f"--prefix-cache-mb {settings.prefix_cache_mb}: give 0 or more MiB (0 keeps the "
            "cache on disk only)"
        )
    if not 0 < settings.runtime_port < 65536:
        raise ConfigError(f"--runtime-port {settings.runtime_port}: not a TCP port (1-65535)")
    if settings.insecure:
        if settings.key is not None or settings.ca is not None:
            raise ConfigError(
                "--insecure turns TLS off, and node authentication needs TLS: drop --key and "
                "--ca to run without both (testing only), or drop --insecure"
            )
        return policy
    for option, path in (("--ca", settings.ca), ("--key", settings.key)):
        if path is None:
            raise ConfigError(
                f"{option}: required (the federation's ca.crt and this hospital's node key); "
                "only a test federation started with --insecure needs neither"
            )
        if not path.is_file():
            raise ConfigError(f"{option} {path}: file not found")
    return policy


def node_config(settings: HospitalSettings) -> dict[str, str | float]:
    """The SuperNode's node config: what the deployed ClientApp reads (absolute paths)."""
    ledger = settings.ledger.resolve()
    audit = (settings.audit_log or ledger / "audit.jsonl").resolve()
    return {
        DATA_KEY: str(settings.data.resolve()),
        POLICY_KEY: str(settings.policy.resolve()),
        LEDGER_KEY: str(ledger),
        AUDIT_KEY: str(audit),
        NAME_KEY: settings.name,
        DATASET_KEY: settings.dataset_id,
        DEVICE_KEY: settings.device,
        **dict(
            zip(
                CACHE_KEYS,
                (settings.prefix_cache, settings.prefix_cache_mb, settings.own_model),
                strict=True,
            )
        ),
        **{
            key.replace("_", "-"): value
            for key, value in settings.schema.model_dump().items()
            if value is not None  # an unset patient column is left out, not written as null
        },
    }


def node_config_toml(values: dict[str, str | float]) -> str:
    """The node config as TOML (`flower-supernode --node-config FILE.toml` reads it)."""
    lines = ["# Written by `fedward client start`; read by the deployed fedward ClientApp."]
    lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def supernode_command(settings: HospitalSettings, node_config_file: Path) -> list[str]:
    """The `flower-supernode` command line for `settings`."""
    command = [flower_program("flower-supernode"), "--superlink", settings.server]
    if settings.insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(settings.ca)]
        command += ["--auth-supernode-private-key", str(settings.key)]
    command += ["--port", str(settings.runtime_port), "--node-config", str(node_config_file)]
    # Flower starts no ClientApp: fedward's own process runs every task (client/deploy/runtime.py)
    command += ["--isolation", "process"]
    if settings.max_wait_time is not None:
        command += ["--max-wait-time", str(settings.max_wait_time)]
    return command


def prepare_supernode(settings: HospitalSettings) -> list[str]:
    """Check the settings, write the node config file; returns the command to run."""
    check_settings(settings)
    settings.ledger.mkdir(parents=True, exist_ok=True)
    config_file = settings.ledger.resolve() / NODE_CONFIG_FILE
    config_file.write_text(node_config_toml(node_config(settings)), encoding="utf-8")
    return supernode_command(settings, config_file)


def runtime_api_address(settings: HospitalSettings) -> str:
    """Where the SuperNode serves its Runtime API (loopback only: Flower's default host)."""
    return f"127.0.0.1:{settings.runtime_port}"


def run_supernode(command: list[str], settings: HospitalSettings) -> int:
    """Run the SuperNode and fedward's ClientApp processes until the SuperNode exits (or this
    process is interrupted or terminated); returns the SuperNode's exit code."""
    from fedward.client.deploy.runtime import serve_tasks  # imports Flower: only here

    log.info("starting: %s", " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    # Every hospital process -- this one, the SuperNode, each ClientApp process it starts --
    # runs without a model hub: a model comes from a local folder the policy pins, or not at all.
    os.environ.update(OFFLINE_ENV)
    supernode = subprocess.Popen(command, env=flower_env(OFFLINE_ENV), preexec_fn=_die_with_parent)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return serve_tasks(runtime_api_address(settings), supernode)
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(supernode)


def _die_with_parent() -> None:
    """In the SuperNode's process, before it starts: ask Linux to end it when `fedward client
    start` dies, even by SIGKILL, so that no orphaned SuperNode keeps the hospital's node
    identity (a restarted hospital could not connect while it lives)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop(process: subprocess.Popen, grace_seconds: float = 10.0) -> None:
    """Ask `process` to stop (SIGINT: Flower's graceful shutdown), kill it after a grace."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_seconds)
