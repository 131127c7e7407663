"""Bytes a hospital uploads and downloads per round, with and without secure aggregation.

Builds the real message contents of one round (global adapter + round config down; update or
the four SecAgg+ stage payloads up) for the default model and LoRA settings, serialises them
with Flower's own protobuf serde, and compares them with the full model's size.

    python -m bench.comm [--hospitals 3 10 50]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedward.client.secagg import SecAggClientSession, SecAggIdentity
from fedward.common.config import RunConfig, SecAggSpec
from fedward.common.model import build_model, get_adapter_arrays
from fedward.common.protocol import wire
from fedward.server.secagg import SecAggServerSession
from fedward.simulation.synthetic import DIAGNOSES


def size(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serialises it."""
    return recorddict_to_proto(content).ByteSize()


def payload_content(payload: dict) -> RecordDict:
    record, vector = wire.payload_to_records(payload)
    content = RecordDict({wire.SECAGG: record})
    if vector is not None:
        content[wire.ARRAYS] = vector
    return content


def secure_round_bytes(
    secagg: SecAggSpec, round_record: ConfigRecord, arrays: dict, hospitals: int
) -> tuple[float, float, dict]:
    """Mean bytes per hospital (down, up) of one SecAgg+ round, plus per-stage upload.

    Args:
        secagg: The run's secure aggregation group (neighbours, threshold, quantization).
        round_record: The round's config record (`wire.round_config`), sent with the train
            and the evaluate message.
        arrays: The global adapter.
        hospitals: Hospitals in the round.

    Returns:
        Mean bytes down and up per hospital, and the upload of each SecAgg+ stage.
    """
    node_ids = list(range(1, hospitals + 1))
    delta = np.random.default_rng(0).normal(0, 0.01, sum(a.size for a in arrays.values()))
    server = SecAggServerSession(
        "bench",
        1,
        node_ids,
        delta.size,
        neighbours=secagg.secagg_neighbours,
        threshold=secagg.secagg_threshold,
        clip=secagg.secagg_clip,
        bits=secagg.secagg_bits,
        max_weight=secagg.secagg_max_weight,
    )
    clients = {
        node: SecAggClientSession(
            node, "bench", 1, SecAggIdentity.simulated(index, hospitals, min_hospitals=2)
        )
        for index, node in enumerate(node_ids)
    }
    down = {node: 0 for node in node_ids}
    up = {node: 0 for node in node_ids}
    later = ("share_keys", "masked_update", "consistency_check", "unmask")
    stages = dict.fromkeys(("advertise_keys", *later), 0)
    base = RecordDict({wire.ARRAYS: wire.arrays_to_record(arrays), wire.CONFIG: round_record})
    requests = server.advertise_keys_requests()
    replies = {}
    for node, request in requests.items():
        content = RecordDict(
            {**dict(base.items()), wire.SECAGG: wire.payload_to_records(request)[0]}
        )
        down[node] += size(content)
        replies[node] = clients[node].advertise_keys(request)
        reply = payload_content(replies[node])
        reply[wire.METRICS] = MetricRecord({"num-examples": 300, "train-loss": 1.0, "epsilon": 2.0})
        reply[wire.INFO] = ConfigRecord({"hospital": f"hospital-{node}"})
        up[node] += size(reply)
        stages["advertise_keys"] += size(reply)
    collect = {
        "share_keys": server.share_keys_requests,
        "masked_update": server.masked_update_requests,
        "consistency_check": server.consistency_requests,
        "unmask": server.unmask_requests,
    }
    for stage in later:
        requests = collect[stage](replies)
        replies = {}
        for node, request in requests.items():
            down[node] += size(payload_content(request))
            if stage == "masked_update":
                reply = wire_reply = replies[node] = clients[node].masked_update(
                    request, delta, 300
                )  # already packed for the wire by the session
            else:
                reply = getattr(clients[node], stage)(request)
                wire_reply = replies[node] = reply
            up[node] += size(payload_content(wire_reply))
            stages[stage] += size(payload_content(wire_reply))
    server.aggregate(replies)
    evaluate = RecordDict({wire.ARRAYS: wire.arrays_to_record(arrays), wire.CONFIG: round_record})
    for node in node_ids:
        down[node] += size(evaluate)
    per_stage = {stage: total / hospitals for stage, total in stages.items()}
    return float(np.mean(list(down.values()))), float(np.mean(list(up.values()))), per_stage


def plain_round_bytes(round_record: ConfigRecord, arrays: dict) -> tuple[float, float]:
    """Bytes per hospital (down, up) of one round without secure aggregation.

    Args:
        round_record: The round's config record (`wire.round_config`).
        arrays: The global adapter.

    Returns:
        Bytes down (the train and the evaluate message) and up (the update).
    """
    train = RecordDict({wire.ARRAYS: wire.arrays_to_record(arrays), wire.CONFIG: round_record})
    reply = RecordDict(
        {
            wire.ARRAYS: wire.arrays_to_record(arrays),
            wire.METRICS: MetricRecord({"num-examples": 300, "train-loss": 1.0, "epsilon": 2.0}),
            wire.INFO: ConfigRecord({"hospital": "hospital-1"}),
        }
    )
    return 2 * size(train), size(reply)  # train + evaluate messages down, the update up


def main() -> None:
    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[3, 10, 50])
    args = parser.parse_args()

    # LoRA, as comm.md records; head-only (the classification default) sends the head alone.
    config = RunConfig.build({"labels": sorted(DIAGNOSES), "lora_variant": "lora"})
    model = build_model(config.spec, len(config.spec.task.labels))
    arrays = get_adapter_arrays(model)
    full = sum(p.numel() for p in model.parameters()) * 4
    adapter_values = sum(a.size for a in arrays.values())
    print(
        f"model {config.spec.model.name}: full model {full / 1e6:.1f} MB (float32); adapter "
        f"{adapter_values} values = {adapter_values * 4 / 1e3:.1f} kB "
        f"(LoRA r={config.spec.model.lora_rank} on "
        f"{config.spec.model.lora_target_modules} of the top {config.spec.model.lora_layers} "
        "layers + head)"
    )
    round_record = wire.round_config(config.spec, 1, 0)
    plain_down, plain_up = plain_round_bytes(round_record, arrays)
    print()
    print(
        f"{'mode':<22}{'hospitals':>10}{'down kB':>10}{'up kB':>10}{'up/full':>10}{'up/plain':>10}"
    )
    print(
        f"{'plain FedAvg':<22}{'any':>10}{plain_down / 1e3:>10.1f}{plain_up / 1e3:>10.1f}"
        f"{plain_up / full:>10.3%}{1:>10.2f}"
    )
    for hospitals in args.hospitals:
        down, up, stages = secure_round_bytes(config.spec.secagg, round_record, arrays, hospitals)
        keys = up - stages["masked_update"]
        print(
            f"{'SecAgg+':<22}{hospitals:>10}{down / 1e3:>10.1f}{up / 1e3:>10.1f}{up / full:>10.3%}"
            f"{up / plain_up:>10.2f}   (masked vector {stages['masked_update'] / 1e3:.1f} kB = "
            f"{stages['masked_update'] / plain_up:.2f}x plain; key exchange {keys / 1e3:.1f} kB)"
        )
    print()
    print("target: upload per round at most 0.5% of the full model with the default LoRA settings")


if __name__ == "__main__":
    main()
