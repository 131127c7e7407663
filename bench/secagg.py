"""Secure aggregation cost: compute and bytes per hospital and on the server, and a whole round.

Part 1 runs the five SecAgg+ stages in one process (signed keys and the consistency check
included) for 3, 10 and 50 hospitals with vectors of the default adapter's size: compute seconds
per hospital and on the server, bytes each hospital sends. Part 2 compares, at 10 hospitals and
1M and 10M values, fedward's compute with Flower 1.41's legacy SecAgg+ doing the same work with
its own primitives (`flwr.common.secure_aggregation`: quantize, `pseudo_rand_gen` masks, Shamir
shares, modular sums; the steps of `secaggplus_mod._collect_masked_vectors` and of the server's
`SecAggPlusWorkflow` unmask), and the upload of each against plain float32. Part 3 times one
simulated federated round (10 hospitals, default model, DP on) with secure aggregation and
without, in the same run, and prints the ratio.

    python -m bench.secagg [--hospitals 3 10 50] [--sizes 1000000 10000000] [--skip-round]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import numpy as np

from bench.comm import payload_content, size
from fedward.client.secagg import SecAggClientSession, SecAggIdentity
from fedward.common.config import RunConfig, SecAggSpec
from fedward.common.model import build_model, get_adapter_arrays
from fedward.common.secagg import STAGES
from fedward.server.secagg import SecAggServerSession

#: Trips between coordinator and hospital after the train reply (advertise rides on it).
TRIPS_BEFORE, TRIPS_NOW = 3, len(STAGES) - 1


def one_secure_round(hospitals: int, length: int, secagg: SecAggSpec) -> dict[str, float]:
    """Seconds per hospital, seconds on the server, bytes sent per hospital."""
    node_ids = list(range(1, hospitals + 1))
    rng = np.random.default_rng(0)
    updates = {node: rng.normal(0, 0.01, length) for node in node_ids}
    client_seconds = dict.fromkeys(node_ids, 0.0)
    sent = dict.fromkeys(node_ids, 0)
    server_seconds = 0.0

    started = time.perf_counter()
    server = SecAggServerSession(
        "bench",
        1,
        node_ids,
        length,
        neighbours=secagg.secagg_neighbours,
        threshold=secagg.secagg_threshold,
        clip=secagg.secagg_clip,
        bits=secagg.secagg_bits,
        max_weight=secagg.secagg_max_weight,
    )
    requests = server.advertise_keys_requests()
    server_seconds += time.perf_counter() - started
    clients = {
        node: SecAggClientSession(
            node, "bench", 1, SecAggIdentity.simulated(index, hospitals, min_hospitals=2)
        )
        for index, node in enumerate(node_ids)
    }
    collect = {
        "share_keys": server.share_keys_requests,
        "masked_update": server.masked_update_requests,
        "consistency_check": server.consistency_requests,
        "unmask": server.unmask_requests,
    }
    replies: dict[int, dict] = {}
    for stage in STAGES:
        if stage in collect:
            started = time.perf_counter()
            requests = collect[stage](replies)
            server_seconds += time.perf_counter() - started
        replies = {}
        for node, request in requests.items():
            started = time.perf_counter()
            if stage == "masked_update":  # the reply is already packed for the wire
                reply = clients[node].masked_update(request, updates[node], 300)
            else:
                reply = getattr(clients[node], stage)(request)
            client_seconds[node] += time.perf_counter() - started
            sent[node] += size(payload_content(reply)) if length <= 2_000_000 else 0
            replies[node] = reply
    started = time.perf_counter()
    result = server.aggregate(replies)
    server_seconds += time.perf_counter() - started
    plain = sum(updates.values()) / hospitals
    error = float(np.max(np.abs(result.average - plain)))
    packed = int(np.mean([reply_size for reply_size in sent.values()]))
    return {
        "client_s": float(np.mean(list(client_seconds.values()))),
        "server_s": server_seconds,
        "sent_kb": packed / 1e3,
        "masked_kb": (length + 1) * server.modulus_bits / 8 / 1e3,
        "plain_kb": length * 4 / 1e3,
        "max_error": error,
    }


def flower_secaggplus(hospitals: int, length: int) -> dict[str, float]:
    """Flower 1.41 legacy SecAgg+ doing one hospital's and the server's work (all-to-all).

    Client: quantize, weight, the self mask and one pairwise mask per other hospital from
    `pseudo_rand_gen`, modular sum, Shamir shares of its two secrets (`_share_keys` and
    `_collect_masked_vectors`). Server: the sum of the masked vectors, one Shamir combination
    and one self mask per hospital, modular reduction, dequantization (the unmask step of
    `SecAggPlusWorkflow`). Flower's defaults: 2**32 modulus, 2**22 quantization levels; its
    masked vectors travel as int64.
    """
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    mod_range, target_range, clipping_range = 1 << 32, 1 << 22, 8.0
    threshold = hospitals // 2 + 1
    rng = np.random.default_rng(0)
    update = [rng.normal(0, 0.01, length)]
    seeds = [os.urandom(32) for _ in range(hospitals)]

    started = time.perf_counter()
    create_shares(seeds[0], threshold, hospitals)
    create_shares(os.urandom(32), threshold, hospitals)  # stands in for its private key
    q_ratio = round(0.3 * target_range)
    parameters = parameters_multiply(update, q_ratio / target_range)
    vector = factor_combine(q_ratio, quantize(parameters, clipping_range, target_range))
    shapes = [a.shape for a in vector]
    vector = parameters_addition(vector, pseudo_rand_gen(seeds[0], mod_range, shapes))
    for other in range(1, hospitals):
        pairwise = pseudo_rand_gen(seeds[other], mod_range, shapes)
        vector = (parameters_addition if other % 2 else parameters_subtraction)(vector, pairwise)
    vector = parameters_mod(vector, mod_range)
    client_s = time.perf_counter() - started
    upload = sum(a.astype(np.int64).nbytes for a in vector)

    masked = [vector] * hospitals
    shares = {index: create_shares(seed, threshold, hospitals) for index, seed in enumerate(seeds)}
    started = time.perf_counter()
    total = masked[0]
    for other in masked[1:]:
        total = parameters_addition(total, other)
    total = parameters_mod(total, mod_range)
    for index in range(hospitals):
        seed = combine_shares(shares[index][:threshold])
        total = parameters_subtraction(total, pseudo_rand_gen(seed, mod_range, shapes))
    total = parameters_mod(total, mod_range)
    dequantize(total[1:], clipping_range, target_range)
    server_s = time.perf_counter() - started
    return {"client_s": client_s, "server_s": server_s, "sent_kb": upload / 1e3}


def plain_average_seconds(hospitals: int, length: int) -> float:
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.01, length).astype(np.float32) for _ in range(hospitals)]
    started = time.perf_counter()
    total = np.zeros(length)
    for update in updates:
        total += 300 * update
    _ = total / (300 * hospitals)
    return time.perf_counter() - started


def round_seconds(secure: bool, hospitals: int) -> float:
    """Wall time of round 1 of a simulation on the default model (Ray start-up excluded)."""
    from fedward.simulation.runner import simulate

    with tempfile.TemporaryDirectory() as out:
        config = RunConfig.build(
            {
                "lora_variant": "lora",
                "hospitals": hospitals,
                "rounds": 1,
                "notes_per_hospital": 40,
                "secure_aggregation": secure,
                "out": out,
            }
        )
        result = simulate(config)
    return float(result.rounds[0]["seconds"])


def main() -> None:
    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[3, 10, 50])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--round-hospitals", type=int, default=10)
    parser.add_argument("--skip-round", action="store_true", help="only the in-process parts")
    args = parser.parse_args()

    config = RunConfig(lora_variant="lora")  # LoRA's update length, as secagg.md records
    labels = [str(i) for i in range(10)]
    model = build_model(config.updated(**{"labels": labels}).spec, len(labels))
    adapter = sum(a.size for a in get_adapter_arrays(model).values())  # the default adapter
    graph = (
        f"{config.spec.secagg.secagg_neighbours} neighbours"
        if config.spec.secagg.secagg_neighbours
        else "all-to-all"
    )
    print(
        f"SecAgg+ ({config.spec.secagg.secagg_bits}-bit quantization, clip "
        f"{config.spec.secagg.secagg_clip}, {graph}, "
        f"threshold {config.spec.secagg.secagg_threshold:g} raised to a majority; signed keys and "
        "a signed "
        f"survivor set)"
    )
    print(
        f"round trips after training: {TRIPS_NOW} (share keys, masked update, consistency "
        f"check, unmask), {TRIPS_NOW - TRIPS_BEFORE} more than without the consistency check"
    )
    print(
        f"{'values':>9}{'hospitals':>10}{'client s':>10}{'server s':>10}{'plain avg s':>12}"
        f"{'sent kB':>10}{'plain kB':>10}{'sent/plain':>11}{'max err':>10}"
    )
    for hospitals in args.hospitals:
        row = one_secure_round(hospitals, adapter, config.spec.secagg)
        plain = plain_average_seconds(hospitals, adapter)
        print(
            f"{adapter:>9}{hospitals:>10}{row['client_s']:>10.3f}{row['server_s']:>10.3f}"
            f"{plain:>12.4f}{row['sent_kb']:>10.1f}{row['plain_kb']:>10.1f}"
            f"{row['sent_kb'] / row['plain_kb']:>11.2f}{row['max_error']:>10.2e}"
        )

    print()
    print("compute at 10 hospitals: fedward vs Flower 1.41 legacy SecAgg+ (same machine, run)")
    print(
        f"{'values':>9}{'':>10}{'client s':>10}{'server s':>10}{'masked MB':>11}"
        f"{'plain MB':>10}{'upload/plain':>13}"
    )
    for length in args.sizes:
        ours = one_secure_round(10, length, config.spec.secagg)
        flower = flower_secaggplus(10, length)
        plain_mb = length * 4 / 1e6
        for name, row, upload_mb in (
            ("fedward", ours, ours["masked_kb"] / 1e3),
            ("flower", flower, flower["sent_kb"] / 1e3),
        ):
            print(
                f"{length:>9}{name:>10}{row['client_s']:>10.3f}{row['server_s']:>10.3f}"
                f"{upload_mb:>11.1f}{plain_mb:>10.1f}{upload_mb / plain_mb:>13.2f}"
            )
    if args.skip_round:
        return
    print()
    plain = round_seconds(False, args.round_hospitals)
    secure = round_seconds(True, args.round_hospitals)
    print(f"one simulated round, {args.round_hospitals} hospitals, default model, DP on:")
    print(
        f"  without secure aggregation {plain:.1f} s, with {secure:.1f} s: "
        f"ratio {secure / plain:.2f}x "
        f"(target <= 1.2x)"
    )


if __name__ == "__main__":
    main()
