"""What travels in Flower messages: adapter arrays <-> ArrayRecord, run config <-> ConfigRecord.

Record keys both sides agree on are named here once.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from common.config import RunConfig

ARRAYS = "arrays"  # the global adapter (server -> hospital) or an update (hospital -> server)
CONFIG = "config"  # run config + round identity (server -> hospital)
METRICS = "metrics"  # numbers a hospital reports (loss, epsilon, example counts)
INFO = "info"  # strings a hospital reports (its name)
REFUSAL = "refusal"  # a hospital's reasoned refusal (policy, budget, data)

ROUND_KEY = "server-round"
RUN_KEY = "run-id"


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Adapter tensors as an ArrayRecord, in the given (spec) order."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord back to NumPy arrays keyed by tensor name."""
    return {name: record[name].numpy() for name in record.keys()}


def round_config(config: RunConfig, server_round: int, run_id: int) -> ConfigRecord:
    """The config record sent with every message of a round."""
    return ConfigRecord({**config.to_flower(), ROUND_KEY: server_round, RUN_KEY: str(run_id)})


def read_round_config(record: ConfigRecord) -> tuple[RunConfig, int, str]:
    """RunConfig, round number and run id from a received config record."""
    values = dict(record)
    return RunConfig.from_flower(values), int(values[ROUND_KEY]), str(values[RUN_KEY])
