"""The hospital's own ClientApp processes: only fedward's installed code touches its data.

`fedward client start` runs Flower's SuperNode with `--isolation process`: the SuperNode talks to
the coordinator, keeps messages and the app bundle (FAB), and serves them on its local Runtime
API, but starts no ClientApp itself. This module is what runs them instead:

- `serve_tasks` (in the `fedward client start` process) does what Flower's SuperExec does for a
  SuperNode: it asks the Runtime API for ClientApp tasks (no other kind) and starts one process
  per task, `python -P -m fedward.client.deploy.runtime --token ...`;
- `run_task` (that process) pulls the task's message, context and FAB, checks the FAB's bytes
  (client/deploy/bundle.py) and then runs `fedward.client.app:app` from the installed package.
  Unlike Flower's `flwr-clientapp`, it never installs or unpacks the FAB, never puts its folder on
  `sys.path`, never installs dependencies and never imports the component the FAB names. A
  refused bundle gets an error reply carrying only a reason code, and an audit record in the
  hospital's audit log (the node config's `audit-log`) with the details.

`-P` keeps the working directory off `sys.path`, so a stray `fedward/` folder there cannot stand
in for the installed package either.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedward.client.deploy.bundle import CLIENT_APP, check_bundle
from fedward.client.deploy.node_config import AUDIT_KEY, OFFLINE_ENV
from fedward.common.errors import DataError
from fedward.common.files.audit_log import AuditLog

log = logging.getLogger(__name__)

#: Audit record kind of a refused bundle.
REFUSED_KIND = "bundle.refused"
#: The reason a failed task's error reply carries (the details stay in this process's log).
FAILED_REASON = "fedward:client-app-error"
#: Seconds between two requests for a new task.
POLL_SECONDS = 0.5


def task_command(runtime_api_address: str, token: str) -> list[str]:
    """The command line of one task's process (this Python, installed fedward only)."""
    return [
        sys.executable,
        "-P",
        "-m",
        "fedward.client.deploy.runtime",
        "--runtime-api-address",
        runtime_api_address,
        "--token",
        token,
        "--parent-pid",
        str(os.getpid()),
    ]


def serve_tasks(
    runtime_api_address: str, supernode: subprocess.Popen, poll_seconds: float = POLL_SECONDS
) -> int:
    """Start a process for every ClientApp task the SuperNode holds, until it exits; returns
    the SuperNode's exit code."""

    client = _runtime_client(runtime_api_address, None, "SuperExec", retry=False)
    running: list[subprocess.Popen] = []
    try:
        while supernode.poll() is None:
            try:
                answer = client.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
                )
            except Exception as exc:  # the SuperNode may be starting or stopping
                log.debug("Runtime API not answering: %s", exc)
                answer = None
            if answer is not None and answer.HasField("task") and answer.token:
                log.info("starting fedward's ClientApp for task %d", answer.task.task_id)
                running.append(subprocess.Popen(task_command(runtime_api_address, answer.token)))
            running = [process for process in running if process.poll() is None]
            time.sleep(poll_seconds)
        return supernode.returncode
    finally:
        client.close()
        for process in running:
            if process.poll() is None:
                process.terminate()


def run_task(runtime_api_address: str, token: str) -> int:
    """Run one ClientApp task: pull it, check its bundle, run fedward's ClientApp, push the
    reply. Returns the process exit code (0: replied, 1: failed)."""

    client = _runtime_client(runtime_api_address, token, "flwr-clientapp")
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details, exit_code = SubStatus.FAILED, FAILED_REASON, 1
    try:
        message, context, run, fab = pull_task_input(client)
        refusal = check_bundle(fab.content)
        if refusal is not None:
            _audit_refusal(context, run.run_id, fab.hash_str, refusal.reason, refusal.detail)
            log.error("refused the app bundle of run %s: %s", run.run_id, refusal.detail)
            details = f"fedward:{refusal.reason}"
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=details), reply_to=message)
        else:
            reply = load_client_app()(message=message, context=context)
            status, details, exit_code = SubStatus.COMPLETED, "", 0
    except Exception:
        # the exception's text stays here: it may quote the hospital's data
        log.exception("fedward ClientApp task failed")
        if message is not None:
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reply = Message(Error(code=code, reason=FAILED_REASON), reply_to=message)
    try:
        if reply is not None and context is not None:
            push_message(client, reply, context)
    except Exception:
        log.exception("cannot push the reply to the SuperNode")
        exit_code = 1
    finally:
        heartbeat.stop()
        push_task_output(client=client, context=context, sub_status=status, details=details)
        client.close()
    return exit_code


def load_client_app() -> Any:
    """fedward's ClientApp, imported from the installed package (never from a bundle)."""
    module_name, attribute = CLIENT_APP.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def _audit_refusal(
    context: Context, flower_run_id: int, fab_hash: str, reason: str, detail: str
) -> None:
    """Record the refusal in the hospital's audit log (named by the hospital's node config)."""
    path = context.node_config.get(AUDIT_KEY)
    if not path:
        log.error("no %r in the node config: the bundle refusal is not audited", AUDIT_KEY)
        return
    try:
        AuditLog(Path(str(path))).append(
            REFUSED_KIND,
            flower_run_id=int(flower_run_id),
            fab_sha256=fab_hash,
            reason=reason,
            detail=detail,
        )
    except (OSError, DataError) as exc:
        log.error("cannot write the audit log %s: %s", path, exc)


def _runtime_client(address: str, token: str | None, component: str, retry: bool = True) -> Any:
    """A client of the SuperNode's local Runtime API (plain HTTP on loopback); `retry=False`
    fails at once when the SuperNode does not answer (the caller polls again)."""
    retry_invoker = make_simple_http_retry_invoker()
    if not retry:
        retry_invoker.max_tries = 1

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=retry_invoker,
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m fedward.client.deploy.runtime`: one task's process (started by `serve_tasks`)."""
    parser = argparse.ArgumentParser(description="Run one task with fedward's ClientApp.")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    # No model hub from a hospital's ClientApp, however this process was started (transformers
    # and huggingface_hub are first imported by the ClientApp, after this line).
    os.environ.update(OFFLINE_ENV)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API request
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    sys.exit(run_task(args.runtime_api_address, args.token))


if __name__ == "__main__":
    main()
