"""A simulation in one process: the coordinator's real loop (`server/app.py:run_federation`,
strategy, SecAgg+ server session, history, adapter) and the simulated hospitals' real ClientApp
(`simulation/app.py`: DP training, SecAgg+ client sessions), joined by a Grid that hands each
message to the ClientApp directly instead of through Ray and Flower's transport.

For tests where the model is under test, not the transport (`fedward simulate` itself is run
through Ray by tests/simulation/test_simulate_e2e.py and the CLI tests): it starts no worker
processes, which on a 2-core machine is most of a one-round simulation's time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedward.common.config import RunConfig
from fedward.server.app import RunResult, run_federation
from fedward.simulation.app import build_simulation_client_app
from fedward.simulation.hospitals import prepare_config

#: Flower's run id for the in-process run (what a real runtime would assign).
FLOWER_RUN_ID = 11


class InProcessGrid:
    """The Grid methods the coordinator's loop calls, served by the ClientApp in this process:
    node `1 + i` is simulated hospital `i`, each with the Context it keeps between stages."""

    def __init__(self, config: RunConfig) -> None:
        self.app = build_simulation_client_app(config)
        count = config.simulation.hospitals
        self.contexts = {
            1 + number: Context(
                run_id=FLOWER_RUN_ID,
                node_id=1 + number,
                node_config={"partition-id": number, "num-partitions": count},
                state=RecordDict(),
                run_config={},
            )
            for number in range(count)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            with _stamped(node):
                reply = self.app(message, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node  # what the transport fills in
            replies.append(reply)
        return replies


@contextlib.contextmanager
def _stamped(node: int) -> Iterator[None]:
    """The task identity Flower's runtime sets while a ClientApp runs (messages read it)."""
    saved = {name: getattr(TaskIdentity, name, None) for name in _IDENTITY}
    for name, value in zip(_IDENTITY, (FLOWER_RUN_ID, node, 1), strict=True):
        setattr(TaskIdentity, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


_IDENTITY = ("_run_id", "_node_id", "_task_id")


def simulate_in_process(config: RunConfig) -> RunResult:
    """`fedward simulate`'s run without Ray: the same config preparation, the same server loop
    and ClientApp. Returns what `simulate` returns."""
    config = prepare_config(config)
    with _stamped(0):  # the coordinator's own messages are stamped too
        return run_federation(InProcessGrid(config), config, FLOWER_RUN_ID)
