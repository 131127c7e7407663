"""What travels in Flower messages: adapter arrays <-> ArrayRecord, run spec <-> ConfigRecord.

Record keys both sides agree on are named here once.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedward.common.config import RunSpec

ARRAYS = "arrays"  # the global adapter (server -> hospital) or an update (hospital -> server)
CONFIG = "config"  # run spec + round identity (server -> hospital)
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
    return {name: record[name].numpy() for name in record}


def round_config(spec: RunSpec, server_round: int, run_id: int | str) -> ConfigRecord:
    """The config record sent with every message of a round: the run spec only (a config's
    local and simulation settings never leave the machine, and are not taken here)."""
    return ConfigRecord({**spec.to_flower(), ROUND_KEY: server_round, RUN_KEY: str(run_id)})


def read_round_config(record: ConfigRecord) -> tuple[RunSpec, int, str]:
    """Run spec, round number and run id from a received config record."""
    values = dict(record)
    return RunSpec.from_flat(values), int(values[ROUND_KEY]), str(values[RUN_KEY])


SECAGG = "secagg"  # a SecAgg+ stage payload (ConfigRecord); the masked vector travels in ARRAYS
MASKED_VECTOR = "masked_update"
#: Message types of the SecAgg+ stages after the first (which rides on the train message).
SECAGG_STAGE_TYPES = {
    "share_keys": "train.share_keys",
    "masked_update": "train.masked_update",
    "consistency_check": "train.consistency_check",
    "unmask": "train.unmask",
}


def flatten(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Adapter tensors as one float64 vector, in the dict's (spec) order."""
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()])


def unflatten(vector: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split a flat vector back into tensors shaped and typed like `like`."""
    out, offset = {}, 0
    for name, array in like.items():
        out[name] = (
            np.asarray(vector[offset : offset + array.size])
            .reshape(array.shape)
            .astype(array.dtype)
        )
        offset += array.size
    if offset != len(vector):
        raise ValueError(f"flat vector has {len(vector)} values, the adapter has {offset}")
    return out


def payload_to_records(payload: dict) -> tuple[ConfigRecord, ArrayRecord | None]:
    """A SecAgg+ payload as a ConfigRecord (+ ArrayRecord for the masked vector)."""
    values, vector = {}, None
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            vector = ArrayRecord({key: Array(np.ascontiguousarray(value))})
        elif isinstance(value, (list, tuple)):
            values[key] = [v if isinstance(v, (bytes, str, float, bool)) else int(v) for v in value]
        elif isinstance(value, (np.integer,)):
            values[key] = int(value)
        else:
            values[key] = value
    return ConfigRecord(values), vector


def records_to_payload(record: ConfigRecord, vector: ArrayRecord | None = None) -> dict:
    """The inverse of `payload_to_records`."""
    payload = {key: value for key, value in record.items()}
    if vector is not None:
        for key in vector:
            payload[key] = vector[key].numpy()
    return payload
