"""Secure aggregation cost: compute and bytes per hospital and on the server, and a whole round.

Part 1 runs the four SecAgg+ stages in one process for 3, 10 and 50 hospitals with vectors of
the default adapter's size and of 1M values: compute seconds per hospital and on the server,
bytes each hospital sends. Part 2 times one simulated federated round (10 hospitals, default
model, DP on) with secure aggregation and without, in the same run, and prints the ratio.

    python -m bench.secagg [--hospitals 3 10 50] [--skip-round] [--round-hospitals 10]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np

from bench.comm import payload_content, size
from fedward.client.secagg import SecAggClientSession
from fedward.common.config import RunConfig
from fedward.common.model import build_model, get_adapter_arrays
from fedward.common.secagg import pack_bits, unpack_bits
from fedward.server.secagg import SecAggServerSession


def one_secure_round(hospitals: int, length: int, config: RunConfig) -> dict[str, float]:
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
        neighbours=config.secagg_neighbours,
        threshold=config.secagg_threshold,
        clip=config.secagg_clip,
        bits=config.secagg_bits,
        max_weight=config.secagg_max_weight,
    )
    requests = server.advertise_keys_requests()
    server_seconds += time.perf_counter() - started
    clients = {node: SecAggClientSession(node, "bench", 1) for node in node_ids}
    replies: dict[int, dict] = {}
    for stage in ("advertise_keys", "share_keys", "masked_update", "unmask"):
        if stage != "advertise_keys":
            started = time.perf_counter()
            if stage == "unmask":  # the replies are the packed masked vectors
                for reply in replies.values():
                    reply["masked_update"] = unpack_bits(
                        reply["masked_update"], server.modulus_bits, length + 1
                    )
            requests = getattr(server, f"{stage}_requests")(replies)
            server_seconds += time.perf_counter() - started
        replies = {}
        for node, request in requests.items():
            started = time.perf_counter()
            if stage == "masked_update":
                reply = clients[node].masked_update(request, updates[node], 300)
                reply["masked_update"] = pack_bits(reply["masked_update"], server.modulus_bits)
            else:
                reply = getattr(clients[node], stage)(request)
            client_seconds[node] += time.perf_counter() - started
            sent[node] += size(payload_content(reply))
            replies[node] = reply
    started = time.perf_counter()
    result = server.aggregate(replies)
    server_seconds += time.perf_counter() - started
    plain = sum(updates.values()) / hospitals
    error = float(np.max(np.abs(result.average - plain)))
    return {
        "client_s": float(np.mean(list(client_seconds.values()))),
        "server_s": server_seconds,
        "sent_kb": float(np.mean(list(sent.values()))) / 1e3,
        "plain_kb": length * 4 / 1e3,
        "max_error": error,
    }


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
    parser.add_argument("--round-hospitals", type=int, default=10)
    parser.add_argument("--skip-round", action="store_true", help="only the in-process part")
    args = parser.parse_args()

    config = RunConfig()
    labels = [str(i) for i in range(10)]
    model = build_model(config.model_copy(update={"labels": labels}), len(labels))
    adapter = sum(a.size for a in get_adapter_arrays(model).values())  # the default adapter
    graph = f"{config.secagg_neighbours} neighbours" if config.secagg_neighbours else "all-to-all"
    print(
        f"SecAgg+ ({config.secagg_bits}-bit quantization, clip {config.secagg_clip}, "
        f"{graph}, "
        f"threshold {config.secagg_threshold:g})"
    )
    print(
        f"{'values':>9}{'hospitals':>10}{'client s':>10}{'server s':>10}{'plain avg s':>12}"
        f"{'sent kB':>10}{'plain kB':>10}{'sent/plain':>11}{'max err':>10}"
    )
    for length in (adapter, 1_000_000):
        for hospitals in args.hospitals:
            row = one_secure_round(hospitals, length, config)
            plain = plain_average_seconds(hospitals, length)
            print(
                f"{length:>9}{hospitals:>10}{row['client_s']:>10.3f}{row['server_s']:>10.3f}"
                f"{plain:>12.4f}{row['sent_kb']:>10.1f}{row['plain_kb']:>10.1f}"
                f"{row['sent_kb'] / row['plain_kb']:>11.2f}{row['max_error']:>10.2e}"
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
