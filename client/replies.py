"""What a hospital's reply may say about itself and its refusals: its name, and for a refusal
a reason code with numbers (common/protocol/reasons.py), never an exception's text; the full
story goes to the hospital's own log only."""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedward.common.config import RunSpec
from fedward.common.errors import FedwardError
from fedward.common.protocol import wire
from fedward.common.protocol.reasons import Reason

log = logging.getLogger(__name__)


def hospital_name(context: Context) -> str:
    """The name a hospital reports: node config 'hospital-name', else its simulation index.

    Args:
        context: The node's context (its node config and node id).

    Returns:
        'hospital-name' as a string; else "hospital-<partition-id>" (simulation); else
        "node-<node id>".
    """
    config = context.node_config
    if "hospital-name" in config:
        return str(config["hospital-name"])
    if "partition-id" in config:
        return f"hospital-{config['partition-id']}"
    return f"node-{context.node_id}"


def round_identity(msg: Message) -> tuple[RunSpec | None, int, str]:
    """Run spec, round and run id of a request; a spec that does not validate is None.

    Args:
        msg: A train or evaluate request (its config record).

    Returns:
        `(spec, server_round, run_id)`; when the record does not validate, None, the round
        as given (0 when missing or not a number) and the run id as given ("" when missing);
        (None, 0, "") for a request without a config record.
    """
    if wire.CONFIG not in msg.content:
        return None, 0, ""
    record = msg.content[wire.CONFIG]
    try:
        return wire.read_round_config(record)
    except (FedwardError, KeyError, ValueError, TypeError):
        values = dict(record)
        try:
            server_round = int(values.get(wire.ROUND_KEY, 0))
        except (TypeError, ValueError):
            server_round = 0
        return None, server_round, str(values.get(wire.RUN_KEY, ""))


def log_refusal(name: str, stage: str, server_round: int, exc: Exception) -> None:
    """The full story, for this hospital's log only.

    Args:
        name: The hospital's name.
        stage: The refused stage ("train", "evaluate" or a SecAgg+ stage).
        server_round: The round, for the log line.
        exc: The error: a `FedwardError` is logged as a warning with its message, anything
            else with its traceback.
    """
    if isinstance(exc, FedwardError):
        log.warning("%s refused %s of round %d: %s", name, stage, server_round, exc)
    else:
        log.exception("%s: unexpected error in %s of round %d", name, stage, server_round)


def refusal(msg: Message, name: str, exc: Exception) -> Message:
    """A refusal reply: the error's reason code and numbers, never its text.

    Args:
        msg: The request refused.
        name: The hospital's name, in the reply's info record.
        exc: The error: a `FedwardError`'s reason, else `error.internal`.

    Returns:
        The reply, carrying the reason record and the hospital's name.
    """
    reason = exc.reason if isinstance(exc, FedwardError) else Reason("error.internal")
    content = RecordDict(
        {
            wire.REFUSAL: ConfigRecord(reason.to_record()),
            wire.INFO: ConfigRecord({"hospital": name}),
        }
    )
    return Message(content=content, reply_to=msg)
