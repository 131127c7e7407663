"""Throughput of one hospital's local training (`client.trainer.train_locally`), in samples/s.

Four configurations of the default `RunConfig` (packaged all-MiniLM-L6-v2, its LoRA and batch
settings) on the same synthetic notes: DP-SGD on or off, times dynamic padding (each batch padded
to its longest note) or fixed padding to `max_length` (128). One warm-up call per configuration is
not timed; the timed calls then run round-robin over the configurations (so a machine that slows
down during the run penalises all four alike) and the mean of `--repeats` calls is reported, with
the ratios DP/no-DP and dynamic/fixed.

    python bench/train_throughput.py --examples 128 --repeats 3

Samples/s counts the data set once per local epoch (Poisson sampling under DP draws batches of
varying size, but the expected number of examples per epoch is the same).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch

from fedward.client.trainer import pick_device, train_locally
from fedward.common.config import RunConfig
from fedward.common.data import Record, encode_classification
from fedward.common.model import build_model, get_adapter_arrays, load_tokenizer
from fedward.common.synthetic import DIAGNOSES, generate_notes

#: (label, dp, padding) of the four configurations, in the order they are printed.
CONFIGURATIONS = [
    ("DP, dynamic padding", True, "dynamic"),
    ("DP, fixed padding", True, "max_length"),
    ("no DP, dynamic padding", False, "dynamic"),
    ("no DP, fixed padding", False, "max_length"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--examples", type=int, default=128, help="notes per timed call (default 128)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per configuration (default 3)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the synthetic notes (default 0)"
    )
    return parser.parse_args()


def time_call(function) -> float:
    """Seconds one call takes, with the GPU's queue drained before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()

    base_config = RunConfig()
    labels = sorted(DIAGNOSES)
    label_to_id = {label: i for i, label in enumerate(labels)}
    tokenizer = load_tokenizer(base_config.model)
    notes = generate_notes(0, args.examples, args.seed)
    records = [Record(note["text"], note["label"]) for note in notes]
    dataset = encode_classification(tokenizer, records, label_to_id, base_config.max_length)
    warmup_records = records[: 2 * base_config.batch_size]
    warmup = encode_classification(tokenizer, warmup_records, label_to_id, base_config.max_length)
    lengths = [len(ids) for ids in dataset.input_ids]

    model = build_model(base_config, len(labels))
    start = get_adapter_arrays(model)
    configs = {
        name: base_config.model_copy(update={"dp": dp, "padding": padding})
        for name, dp, padding in CONFIGURATIONS
    }

    def train(config: RunConfig, data) -> None:
        train_locally(model, data, config, start, [], pad_id=tokenizer.pad_token_id, who="bench")

    print(f"model        {base_config.model}")
    print(f"device       {pick_device(base_config.device)}")
    print(f"torch        {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"data         {len(dataset)} synthetic notes, tokens per note: mean "
        f"{statistics.mean(lengths):.0f}, max {max(lengths)} (max_length {base_config.max_length})"
    )
    print(
        f"training     batch_size {base_config.batch_size}, "
        f"local_epochs {base_config.local_epochs}, LoRA r={base_config.lora_rank} "
        f"on {base_config.lora_target_modules} of the top {base_config.lora_layers} layers"
    )
    print(f"repeats      {args.repeats} timed calls per configuration after 1 warm-up call\n")

    for config in configs.values():
        train(config, warmup)

    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, config in configs.items():
            seconds[name].append(time_call(lambda config=config: train(config, dataset)))

    samples = len(dataset) * base_config.local_epochs
    rate = {name: samples / statistics.mean(values) for name, values in seconds.items()}
    print(f"{'configuration':<24} {'samples/s':>10} {'s per call':>11} {'spread':>8}")
    for name, values in seconds.items():
        spread = (max(values) - min(values)) / statistics.mean(values)
        print(f"{name:<24} {rate[name]:>10.1f} {statistics.mean(values):>11.2f} {spread:>7.0%}")

    print("\nratios of samples/s")
    ratios = [
        ("DP / no DP (dynamic padding)", "DP, dynamic padding", "no DP, dynamic padding"),
        ("DP / no DP (fixed padding)", "DP, fixed padding", "no DP, fixed padding"),
        ("dynamic / fixed padding (DP)", "DP, dynamic padding", "DP, fixed padding"),
        ("dynamic / fixed padding (no DP)", "no DP, dynamic padding", "no DP, fixed padding"),
    ]
    for label, numerator, denominator in ratios:
        print(f"  {label:<34} {rate[numerator] / rate[denominator]:.2f}")


if __name__ == "__main__":
    main()
