"""fedward's aggregation strategy: FedAvg over LoRA adapter updates, each with its own weight.

One method per phase of a round, as in Flower's `FedAvg`: `configure_train`, `aggregate_train`,
`configure_evaluate`, `aggregate_evaluate`. Arithmetic lives in `server/aggregation.py`.

Each update is validated before it is counted (names, shapes, dtypes, finite, within the clipping
range); a bad update is dropped and logged and the round goes on with the others. A round with
fewer usable updates than `min_hospitals` fails cleanly: the global adapter stays as it was.

A hospital's refusal is a reason code with numbers (common/protocol/reasons.py); it is rendered here
from the coordinator's own templates, so nothing a hospital writes as text is stored. With secure
aggregation a hospital sends no weight, example count or loss in the clear: the weight of its update
is inside the masked vector, and only the sum is unmasked. A deployed hospital's weight is the one
its site policy declares (default 1), never its training count.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedward.common.config import RunConfig
from fedward.common.errors import FedwardError, ModelError, SecAggError
from fedward.common.metrics import split_counts
from fedward.common.model import ArraySpec
from fedward.common.protocol import wire
from fedward.common.protocol.reasons import Reason
from fedward.common.secagg.distributed_noise import INTEGER, WEIGHTED
from fedward.server.aggregation import (
    Arrays,
    apply_average,
    global_evaluation,
    server_step,
    validate_update,
    weighted_mean,
    weighted_sum,
)
from fedward.server.secagg import SecAggResult, SecAggServerSession

log = logging.getLogger(__name__)


#: Per-hospital metrics of a hospital's own model (`personal_alone`, `personal_global`,
#: `personal_own`): reported by simulated hospitals at the last round, never averaged.
PERSONAL_PREFIX = "personal_"


@dataclass
class TrainOutcome:
    """What one round of training produced, for the history, report and audit log."""

    arrays: Arrays | None  # the new global adapter; None when the round failed
    status: str  # "ok" or "failed: <reason>"
    hospitals: dict[str, dict[str, float]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    train_loss: float = float("nan")
    #: seconds the coordinator computed the aggregate (the SecAgg+ session's work, or the plain
    #: validation and average), not counting the wait for hospitals
    aggregation_seconds: float = 0.0


@dataclass
class EvaluateOutcome:
    """Global-model metrics (over all hospitals' validation rows), each hospital's own, and who
    refused."""

    metrics: dict[str, float]
    hospitals: dict[str, dict[str, float]]
    refused: dict[str, str] = field(default_factory=dict)


class FedwardStrategy:
    """Federated averaging of adapter deltas (McMahan et al. 2017) with update validation.

    Named after Flower's round phases but not a Flower `Strategy`: a round here puts the SecAgg+
    stages between the replies and the average, and `server/app.py` runs the loop (why:
    docs/architecture.md, "Where fedward meets its frameworks").

    Parameters
    ----------
    config : RunConfig
        The run's configuration; uses `fraction` (default 1.0), `min_hospitals` (default 2),
        `round_timeout` (default 3600 s), `secagg_clip` (default 1.0: the range an update
        value must lie in) and `seed` (default 42: node sampling).
    adapter_layout : list[ArraySpec]
        Names, shapes and dtypes of the adapter tensors every update must match.
    run_id : int | str
        fedward's run id (stable across `--resume`, unlike Flower's); sent with every message
        so replies, ledgers and SecAgg+ messages are bound to their run.
    """

    def __init__(self, config: RunConfig, adapter_layout: list[ArraySpec], run_id: int) -> None:
        self.config = config
        self.adapter_layout = adapter_layout
        self.run_id = run_id
        self.node_names: dict[int, str] = {}  # learnt from replies; names failed nodes in logs

    def _name(self, reply: Message) -> str:
        """The hospital's name: from the reply, else remembered from an earlier reply."""
        node_id = reply.metadata.src_node_id
        if not reply.has_error() and wire.INFO in reply.content:
            self.node_names[node_id] = str(reply.content[wire.INFO]["hospital"])
        return self.node_names.get(node_id, f"node-{node_id}")

    # --- training ------------------------------------------------------------------------------

    def sample_hospitals(self, server_round: int, grid: Grid) -> list[int]:
        """Node ids for this round: `fraction` of those connected, at least `min_hospitals`."""
        node_ids = wait_for_nodes(
            grid, self.config.spec.federation.min_hospitals, self.config.local.round_timeout
        )
        wanted = max(
            self.config.spec.federation.min_hospitals,
            round(len(node_ids) * self.config.spec.federation.fraction),
        )
        rng = random.Random(f"{self.config.spec.training.seed}:{server_round}")
        return sorted(rng.sample(node_ids, min(wanted, len(node_ids))))

    def configure_train(
        self,
        server_round: int,
        arrays: Arrays,
        node_ids: list[int],
        secagg_requests: dict[int, dict] | None = None,
    ) -> list[Message]:
        """One train message per sampled hospital: the global adapter and the round config.

        With secure aggregation each message also carries that hospital's first SecAgg+
        request (advertise keys), so keys are exchanged in the same trip as training.
        """
        messages = []
        for node_id in node_ids:
            content = RecordDict(
                {
                    wire.ARRAYS: wire.arrays_to_record(arrays),
                    wire.CONFIG: wire.round_config(self.config.spec, server_round, self.run_id),
                }
            )
            if secagg_requests is not None:
                content[wire.SECAGG] = wire.payload_to_records(secagg_requests[node_id])[0]
            messages.append(
                Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)
            )
        return messages

    def train_round(self, server_round: int, arrays: Arrays, grid: Grid) -> TrainOutcome:
        """Sample, train and aggregate one round; secure or plain per the run config."""
        node_ids = self.sample_hospitals(server_round, grid)
        if not self.config.spec.secagg.secure_aggregation:
            replies = grid.send_and_receive(
                self.configure_train(server_round, arrays, node_ids),
                timeout=self.config.local.round_timeout,
            )
            return self.aggregate_train(server_round, arrays, replies, sent=len(node_ids))
        return self.secure_train_round(server_round, arrays, node_ids, grid)

    def aggregate_train(
        self, server_round: int, global_arrays: Arrays, replies: Iterable[Message], sent: int
    ) -> TrainOutcome:
        """Validate each update, then average the valid ones into a new global adapter."""
        replies = list(replies)  # received: what follows is the coordinator's own work
        started = time.perf_counter()
        outcome = self._average_clear_updates(server_round, global_arrays, replies, sent)
        outcome.aggregation_seconds = time.perf_counter() - started
        return outcome

    def _average_clear_updates(
        self, server_round: int, global_arrays: Arrays, replies: list[Message], sent: int
    ) -> TrainOutcome:
        outcome, accepted = self._read_train_replies(server_round, replies, sent)
        updates: list[tuple[Arrays, float]] = []
        # in the hospitals' order, not the replies': the float sums do not depend on timing
        for name, reply in sorted(accepted.values(), key=lambda item: item[0]):
            try:
                update = wire.record_to_arrays(reply.content[wire.ARRAYS])
                validate_update(self.adapter_layout, update, self.config.spec.secagg.secagg_clip)
            except (FedwardError, KeyError, ValueError, TypeError) as exc:
                reason = f"rejected update: {exc}"
                outcome.rejected[name] = reason
                outcome.hospitals.pop(name, None)
                log.warning("round %d: %s %s", server_round, name, reason)
                continue
            updates.append((update, _clear_weight(outcome.hospitals[name])))
        outcome.train_loss = _train_loss(outcome)
        if self._too_few(server_round, outcome, len(updates)):
            return outcome
        summed, total_weight = weighted_sum(updates)
        outcome.arrays = apply_average(global_arrays, summed, total_weight)
        return outcome

    def secure_train_round(
        self, server_round: int, global_arrays: Arrays, node_ids: list[int], grid: Grid
    ) -> TrainOutcome:
        """Train with SecAgg+: the server only ever holds masked updates and their sum.

        Stage 1 (advertise keys) rides on the train message; stages 2-5 (share keys, masked
        update, consistency check, unmask) follow. A hospital missing at any stage is recovered
        from its neighbours' shares while the threshold holds; otherwise the round fails
        cleanly and the global adapter stays as it was.
        """
        vector_length = sum(int(np.prod(item.shape)) for item in self.adapter_layout)
        distributed = self.config.spec.privacy.noise == "distributed"
        clock = _Stopwatch()
        try:
            session = clock.timed(SecAggServerSession)(
                self.run_id,
                server_round,
                node_ids,
                vector_length,
                neighbours=self.config.spec.secagg.secagg_neighbours,
                threshold=self.config.spec.secagg.secagg_threshold,
                clip=self.config.spec.secagg.secagg_clip,
                bits=self.config.spec.secagg.secagg_bits,
                max_weight=self.config.spec.secagg.secagg_max_weight,
                encoding=INTEGER if distributed else WEIGHTED,
            )
            requests = clock.timed(session.advertise_keys_requests)()
        except SecAggError as exc:
            return TrainOutcome(arrays=None, status=f"failed: secure aggregation: {exc}")
        replies = grid.send_and_receive(
            self.configure_train(server_round, global_arrays, node_ids, requests),
            timeout=self.config.local.round_timeout,
        )
        outcome, accepted = self._read_train_replies(server_round, replies, len(node_ids))
        payloads = {
            node_id: wire.records_to_payload(reply.content[wire.SECAGG])
            for node_id, (_, reply) in accepted.items()
        }
        names = {node_id: name for node_id, (name, _) in accepted.items()}
        try:
            requests = clock.timed(session.share_keys_requests)(payloads)
            payloads = self._secagg_stage(
                grid, server_round, "share_keys", requests, names, outcome
            )
            requests = clock.timed(session.masked_update_requests)(payloads)
            payloads = self._secagg_stage(
                grid, server_round, "masked_update", requests, names, outcome
            )
            requests = clock.timed(session.consistency_requests)(payloads)
            payloads = self._secagg_stage(
                grid, server_round, "consistency_check", requests, names, outcome
            )
            requests = clock.timed(session.unmask_requests)(payloads)
            payloads = self._secagg_stage(grid, server_round, "unmask", requests, names, outcome)
            result = clock.timed(session.aggregate)(payloads)
        except SecAggError as exc:
            outcome.status = f"failed: secure aggregation: {exc}; global adapter unchanged"
            log.warning("round %d %s", server_round, outcome.status)
            return outcome
        finally:
            outcome.aggregation_seconds = clock.seconds
            for node_id, reason in session.rejected.items():
                name = names.get(node_id, f"node-{node_id}")
                outcome.rejected[name] = f"rejected secure-aggregation reply: {reason}"
        for node_id in result.dropped:
            name = names.get(node_id, f"node-{node_id}")
            outcome.hospitals.pop(name, None)
            if name not in outcome.dropped and name not in outcome.rejected:
                outcome.dropped.append(name)
        outcome.train_loss = _train_loss(outcome)
        if self._too_few(server_round, outcome, len(result.included)):
            return outcome
        clock.timed(self._apply_secure_sum)(server_round, global_arrays, result, outcome)
        outcome.aggregation_seconds = clock.seconds
        return outcome

    def _apply_secure_sum(
        self, server_round: int, global_arrays: Arrays, result: SecAggResult, outcome: TrainOutcome
    ) -> None:
        """The new global adapter from the unmasked sum, into `outcome.arrays` (left None with
        the reason in `outcome.status` when the sum is unusable)."""
        if self.config.spec.privacy.noise == "distributed":
            self._noisy_gradient_step(server_round, global_arrays, result, outcome)
            return
        average = wire.unflatten(result.weighted_sum / result.total_weight, global_arrays)
        try:
            validate_update(self.adapter_layout, average, self.config.spec.secagg.secagg_clip)
        except FedwardError as exc:
            outcome.status = f"failed: aggregated update invalid ({exc}); global adapter unchanged"
            log.warning("round %d %s", server_round, outcome.status)
            return
        outcome.arrays = apply_average(global_arrays, average, 1.0)  # already divided

    def _noisy_gradient_step(
        self,
        server_round: int,
        global_arrays: Arrays,
        result: SecAggResult,
        outcome: TrainOutcome,
    ) -> TrainOutcome:
        """Distributed noise: the step on the noisy mean gradient (`server_step`)."""
        try:
            outcome.arrays = server_step(
                global_arrays,
                result.integer_sum,
                self.config.spec.privacy.max_grad_norm,
                self.config.spec.training.server_learning_rate,
            )
        except FedwardError as exc:
            outcome.status = f"failed: {exc}; global adapter unchanged"
            log.warning("round %d %s", server_round, outcome.status)
        return outcome

    def _secagg_stage(
        self,
        grid: Grid,
        server_round: int,
        stage: str,
        requests: dict[int, dict],
        names: dict[int, str],
        outcome: TrainOutcome,
    ) -> dict[int, dict]:
        """Send one SecAgg+ stage's requests and collect the replies that arrived."""
        messages = []
        for node_id, request in requests.items():
            record, vector = wire.payload_to_records(request)
            content = RecordDict({wire.SECAGG: record})
            if vector is not None:
                content[wire.ARRAYS] = vector
            messages.append(
                Message(
                    content=content,
                    message_type=wire.SECAGG_STAGE_TYPES[stage],
                    dst_node_id=node_id,
                )
            )
        payloads: dict[int, dict] = {}
        twice: set[int] = set()
        for reply in grid.send_and_receive(messages, timeout=self.config.local.secagg_timeout):
            node_id = reply.metadata.src_node_id
            name = names.get(node_id, f"node-{node_id}")
            if node_id in payloads or node_id in twice:
                # Which of the two is the hospital's is unknowable: neither is used.
                payloads.pop(node_id, None)
                twice.add(node_id)
                outcome.rejected[name] = f"rejected secure-aggregation reply: two to {stage}"
                log.warning("round %d, %s: %s replied twice; left out", server_round, stage, name)
                continue
            if reply.has_error() or wire.SECAGG not in reply.content:
                if reply.has_error():
                    reason = reply.error.reason
                elif wire.REFUSAL in reply.content:
                    reason = refusal_reason(reply)
                else:
                    reason = "reply without a secure-aggregation payload"
                log.warning(
                    "round %d, %s: %s dropped: %s", server_round, stage, name, _first_line(reason)
                )
                continue
            payloads[node_id] = wire.records_to_payload(
                reply.content[wire.SECAGG], reply.content.get(wire.ARRAYS)
            )
        return payloads

    def _read_train_replies(
        self, server_round: int, replies: Iterable[Message], sent: int
    ) -> tuple[TrainOutcome, dict[int, tuple[str, Message]]]:
        """Sort train replies into failed, refused and accepted; record their metrics."""
        outcome = TrainOutcome(arrays=None, status="ok")
        accepted: dict[int, tuple[str, Message]] = {}
        losses: list[tuple[float, float]] = []
        received = 0
        for reply in replies:
            received += 1
            name = self._name(reply)
            if reply.has_error():
                outcome.dropped.append(name)
                log.warning(
                    "round %d: %s failed: %s", server_round, name, _first_line(reply.error.reason)
                )
                continue
            if wire.REFUSAL in reply.content:
                reason = refusal_reason(reply)
                outcome.refused[name] = reason
                log.warning("round %d: %s refused: %s", server_round, name, reason)
                continue
            try:
                metrics = {k: float(v) for k, v in reply.content[wire.METRICS].items()}
                weighted_in_clear = not self.config.spec.secagg.secure_aggregation
                if weighted_in_clear and not _clear_weight(metrics) > 0:
                    raise ModelError("weight must be a positive number")
            except (FedwardError, KeyError, ValueError, TypeError) as exc:
                outcome.rejected[name] = f"rejected reply: {exc}"
                log.warning("round %d: %s rejected reply: %s", server_round, name, exc)
                continue
            accepted[reply.metadata.src_node_id] = (name, reply)
            if "train-loss" in metrics and "num-examples" in metrics:
                losses.append((metrics["train-loss"], metrics["num-examples"]))
            outcome.hospitals[name] = {k.replace("-", "_"): v for k, v in metrics.items()}
        outcome.dropped.extend(f"no reply #{i + 1}" for i in range(sent - received))
        outcome.train_loss = weighted_mean(losses)
        return outcome, accepted

    def _too_few(self, server_round: int, outcome: TrainOutcome, usable: int) -> bool:
        if usable >= self.config.spec.federation.min_hospitals:
            return False
        outcome.status = (
            f"failed: {usable} usable update(s), fewer than min_hospitals "
            f"({self.config.spec.federation.min_hospitals}); global adapter unchanged"
        )
        log.warning("round %d %s", server_round, outcome.status)
        return True

    # --- evaluation ----------------------------------------------------------------------------

    def configure_evaluate(self, server_round: int, arrays: Arrays, grid: Grid) -> list[Message]:
        """Every connected hospital evaluates the new global adapter on its validation split."""
        content = RecordDict(
            {
                wire.ARRAYS: wire.arrays_to_record(arrays),
                wire.CONFIG: wire.round_config(self.config.spec, server_round, self.run_id),
            }
        )
        return [
            Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node_id)
            for node_id in sorted(grid.get_node_ids())
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> EvaluateOutcome:
        """The global model's metrics (`aggregation.global_evaluation`: macro-F1 or entity F1
        from the hospitals' summed counts, the rest example-weighted means) and each hospital's
        own (its counts are summed, not kept)."""
        hospitals: dict[str, dict[str, float]] = {}
        counts: dict[str, dict[str, float]] = {}
        refused: dict[str, str] = {}
        for reply in replies:
            name = self._name(reply)
            if not reply.has_error() and wire.REFUSAL in reply.content:
                refused[name] = refusal_reason(reply)
                log.info("round %d: no evaluation from %s: %s", server_round, name, refused[name])
                continue
            if reply.has_error() or wire.METRICS not in reply.content:
                log.warning("round %d: no evaluation from %s", server_round, name)
                continue
            try:
                metrics = {k: float(v) for k, v in reply.content[wire.METRICS].items()}
            except (TypeError, ValueError):
                log.warning("round %d: unreadable evaluation from %s", server_round, name)
                continue
            scores, counts[name] = split_counts(metrics)
            hospitals[name] = {key.replace("-", "_"): value for key, value in scores.items()}
        # A hospital's alone / global / own figures (simulation, last round) are its own: they
        # are kept per hospital, not averaged into the global model's metrics.
        scores = {
            name: {k: v for k, v in metrics.items() if not k.startswith(PERSONAL_PREFIX)}
            for name, metrics in hospitals.items()
        }
        merged = global_evaluation(self.config.spec.task.definition, scores, counts)
        return EvaluateOutcome(metrics=merged, hospitals=hospitals, refused=refused)


def _clear_weight(metrics: dict[str, float]) -> float:
    """A clear update's weight in the average: the `weight` it carries (a deployed hospital's
    is the one its policy declares, never its count); a reply without one (an older hospital)
    is weighted by its `num-examples`."""
    for key in ("weight", "num-examples", "num_examples"):
        if key in metrics:
            return metrics[key]
    return 0.0


def _train_loss(outcome: TrainOutcome) -> float:
    """Example-weighted train loss of the hospitals whose updates are in the average (NaN when
    hospitals do not report it: deployed ones do not)."""
    return weighted_mean(
        [
            (m["train_loss"], m["num_examples"])
            for _, m in sorted(outcome.hospitals.items())  # not in the order replies arrived
            if "train_loss" in m and "num_examples" in m
        ]
    )


def refusal_reason(reply: Message) -> str:
    """A refusal reply's reason, rendered by the coordinator from its code and numbers."""
    return Reason.from_record(reply.content[wire.REFUSAL]).render()


class _Stopwatch:
    """Adds up the seconds spent in the calls it wraps (`timed(f)(...)`)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, function):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return call


def _first_line(reason: str) -> str:
    """The readable part of an error reason (Ray appends whole tracebacks)."""
    lines = [line for line in str(reason).splitlines() if line.strip()]
    text = lines[-1] if lines and "Error" in lines[-1] else (lines[0] if lines else "")
    return text[:300]


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """Connected node ids once at least `wanted` are there (or all there are at `timeout`)."""
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < wanted and time.monotonic() < deadline:
        log.info("waiting for hospitals: %d of %d connected", len(node_ids), wanted)
        time.sleep(2.0)
        node_ids = list(grid.get_node_ids())
    return node_ids


def finite_or_none(value: float) -> float | None:
    """JSON-friendly number: NaN/inf become None."""
    return float(value) if value is not None and np.isfinite(value) else None
