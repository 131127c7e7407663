"""A hospital's SecAgg+ stages as Flower messages: the session (client/secagg/session.py)
makes and checks the payloads; this starts it with the train message, keeps it in the node
state between stages and relays each later stage. The terms of a secure round come from the
hospital's own admitted run spec, never from the coordinator's request."""

from __future__ import annotations

from dataclasses import replace

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedward.client.replies import hospital_name, log_refusal, refusal
from fedward.client.secagg.identity import SecAggIdentity
from fedward.client.secagg.session import SecAggClientSession
from fedward.common.config import PrivacySpec
from fedward.common.errors import SecAggError
from fedward.common.protocol import wire
from fedward.common.secagg import CONSISTENCY_CHECK, MASKED_UPDATE, SHARE_KEYS, UNMASK
from fedward.common.secagg.distributed_noise import INTEGER, WEIGHTED

#: SecAgg+ stages after the first (which rides on the train message), in order.
SECAGG_STAGES = (SHARE_KEYS, MASKED_UPDATE, CONSISTENCY_CHECK, UNMASK)

SECAGG_STATE = "fedward.secagg"  # this round's SecAgg+ session (secrets stay on this node)
SECAGG_UPDATE = "fedward.secagg.update"  # this round's update until it is masked


def handle_secagg_stage(msg: Message, context: Context, stage: str) -> Message:
    """One of the SecAgg+ stages after the first: share keys, masked update, consistency check,
    unmask. The session makes and checks the payloads (wire packing included); this relays.

    The session lives in the node state between stages and is dropped after unmask; the
    update kept for the masked stage is dropped once it is masked.

    Args:
        msg: The coordinator's request for this stage (its SecAgg+ record).
        context: The node's context: its state holds this round's session and, until the
            masked stage, the update and its weight.
        stage: Which stage: `SHARE_KEYS`, `MASKED_UPDATE`, `CONSISTENCY_CHECK` or `UNMASK`.

    Returns:
        The stage's reply (its SecAgg+ record, and the masked vector in the masked stage), or
        a refusal carrying only the reason code: a `SecAggError` when no secure round is in
        progress on this node, or whatever the session refused, is answered, not raised.
    """
    name = hospital_name(context)
    state = context.state.get(SECAGG_STATE)
    server_round = 0  # the session's, once it is read: for this hospital's log
    try:
        if state is None:
            raise SecAggError(
                f"node {context.node_id}, stage {stage}: no secure-aggregation round in progress"
            )
        session = SecAggClientSession.from_state(bytes(state["session"]))
        server_round = session.server_round
        if wire.SECAGG not in msg.content:
            raise SecAggError(f"node {context.node_id}, stage {stage}: the request has no payload")
        request = wire.records_to_payload(msg.content[wire.SECAGG])
        if stage == SHARE_KEYS:
            reply = session.share_keys(request)
        elif stage == MASKED_UPDATE:
            update = context.state[SECAGG_UPDATE]
            # capped again at the limit this round's keys were agreed with: a weight above it
            # would be a refusal that tells the coordinator the count exceeds its limit
            weight = min(int(update["weight"].numpy()[0]), int(session.params["max_weight"]))
            reply = session.masked_update(request, update["delta"].numpy(), weight)
        elif stage == CONSISTENCY_CHECK:
            reply = session.consistency_check(request)
        else:
            reply = session.unmask(request)
    except Exception as exc:  # whatever it was, only a code leaves
        log_refusal(name, stage, server_round, exc)
        return refusal(msg, name, exc)
    if stage == UNMASK:
        context.state.pop(SECAGG_STATE, None)
        context.state.pop(SECAGG_UPDATE, None)
    else:
        context.state[SECAGG_STATE] = ConfigRecord({"session": session.to_state()})
    if stage == MASKED_UPDATE:
        context.state.pop(SECAGG_UPDATE, None)  # the update is no longer needed in any form
    payload, vector = wire.payload_to_records(reply)
    content = RecordDict({wire.SECAGG: payload, wire.INFO: ConfigRecord({"hospital": name})})
    if vector is not None:
        content[wire.ARRAYS] = vector
    return Message(content=content, reply_to=msg)


def distributed(privacy: PrivacySpec) -> bool:
    """Whether the run's DP noise is distributed over the secure sum (issue 39).

    Args:
        privacy: The run's privacy group (`dp`, `noise`).

    Returns:
        True for DP with `noise = "distributed"`.
    """
    return privacy.dp and privacy.noise == "distributed"


def secure_round_terms(
    identity: SecAggIdentity, privacy: PrivacySpec
) -> tuple[SecAggIdentity, str]:
    """The identity a secure round runs with and the encoding of its vectors, from this
    hospital's own admitted config (never from the coordinator's request).

    Under distributed noise the hospital's share of the noise is 1/t of it, so every secure
    cohort it is unmasked in must hold at least t hospitals, itself included, whatever its
    policy's own minimum: the session refuses a smaller one at every stage, and after the masked
    upload it signs and reveals nothing (`secagg.cohort_too_small`).

    Args:
        identity: This hospital's SecAgg+ identity, as its site policy pins it.
        privacy: The privacy group of the run spec this hospital admitted (`dp`, `noise`,
            `noise_hospitals`).

    Returns:
        `(identity, encoding)`: unchanged and `WEIGHTED` without distributed noise; under it,
        the identity with `min_hospitals` raised to at least `noise_hospitals`, and
        `INTEGER`.
    """
    if not distributed(privacy):
        return identity, WEIGHTED
    trusted = privacy.noise_hospitals
    return replace(identity, min_hospitals=max(identity.min_hospitals, trusted)), INTEGER


def advertise_keys(
    msg: Message,
    context: Context,
    run_id: str,
    server_round: int,
    identity: SecAggIdentity,
    privacy: PrivacySpec,
) -> ConfigRecord:
    """Start this round's SecAgg+ session on the terms of this hospital's own admitted run spec
    (`secure_round_terms`), keep it in the node state, and answer the first stage, which rides
    on the train message: the public keys.

    Args:
        msg: The train request; its SecAgg+ record is the first stage's request.
        context: The node's context; the session is kept in its state.
        run_id: The run's id.
        server_round: The round.
        identity: This hospital's SecAgg+ identity, as its site policy pins it.
        privacy: The privacy group of the run spec this hospital admitted.

    Returns:
        The first stage's reply (the signed public keys), for the train reply.
    """
    identity, encoding = secure_round_terms(identity, privacy)
    session = SecAggClientSession(context.node_id, run_id, server_round, identity, encoding)
    reply = session.advertise_keys(wire.records_to_payload(msg.content[wire.SECAGG]))
    context.state[SECAGG_STATE] = ConfigRecord({"session": session.to_state()})
    payload, _ = wire.payload_to_records(reply)
    return payload
