"""Throughput of one hospital's local training (`client.trainer.train_locally`), in samples/s.

The default `RunConfig` (packaged all-MiniLM-L6-v2, LoRA in its top 2 of 6 layers, batch 128,
dynamic padding) on the same synthetic notes, with DP-SGD on or off, the frozen-prefix cache
(client/prefix_cache.py) on or off and length-bucketed micro-batches (client/trainer.py) on or
off, side by side. Each configuration trains one local epoch per call; a repeat is `--epochs`
calls in a row from a fresh cache, so the first call is the epoch that builds the cache (or
round 1) and the later calls are the epochs (or rounds) that reuse it. The calls alternate
between the configurations of the same DP setting (a machine that slows down penalises all
alike); DP on and off are separate runs. Rates are means over `--repeats`. One warm-up call per
configuration is not timed.

    python -m bench.train_throughput --examples 128 --epochs 3 --repeats 2

Samples/s counts the data set once per local epoch (Poisson sampling under DP draws batches of
varying size, but the expected number of examples per epoch is the same). Also printed: how far
16-bit storage of the cached states moves the loss and the gradient of one batch.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch

from fedward.client.prefix_cache import drop_prefix_caches
from fedward.client.trainer import pick_device, train_locally
from fedward.common.config import ModelSpec, RunConfig, TrainingSpec
from fedward.common.data import Record, encode_classification, pad_batch
from fedward.common.model import (
    build_model,
    get_adapter_arrays,
    load_tokenizer,
    split_frozen_prefix,
)
from fedward.simulation.synthetic import DIAGNOSES, generate_notes

#: (label, dp, prefix cache, length bucketing) of the configurations, in the order printed.
CONFIGURATIONS = [
    ("DP, cache, buckets", True, True, True),
    ("DP, cache", True, True, False),
    ("DP, buckets", True, False, True),
    ("DP", True, False, False),
    ("no DP, cache, buckets", False, True, True),
    ("no DP, cache", False, True, False),
    ("no DP, buckets", False, False, True),
    ("no DP", False, False, False),
]
#: (label, faster configuration, slower one) of the printed ratios.
RATIOS = [
    ("DP: cache / none", "DP, cache", "DP"),
    ("DP: buckets / none", "DP, buckets", "DP"),
    ("DP: cache and buckets / cache", "DP, cache, buckets", "DP, cache"),
    ("DP: cache and buckets / none", "DP, cache, buckets", "DP"),
    ("no DP: cache / none", "no DP, cache", "no DP"),
    ("no DP: buckets / none", "no DP, buckets", "no DP"),
    ("no DP: cache and buckets / cache", "no DP, cache, buckets", "no DP, cache"),
    ("no DP: cache and buckets / none", "no DP, cache, buckets", "no DP"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--examples", type=int, default=128, help="notes per timed call (default 128)"
    )
    parser.add_argument(
        "--epochs", type=int, default=3, help="one-epoch calls per repeat (default 3)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="repeats per configuration (default 2)"
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


def storage_error(model, dataset, pad_id: int, lora_layers: int) -> dict[str, tuple]:
    """Relative change of one batch's loss and gradient when the prefix states are stored in
    float16 or bfloat16 instead of float32 (an adapter with B != 0, as after training).
    Measured on the CPU in float32 wherever the throughput ran (a CUDA run leaves the model there).
    """
    model.cpu().eval()
    prefix, top = split_frozen_prefix(model)
    trainable = [p for p in top.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in trainable]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in trainable:
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    batch = [(dataset.input_ids[i], dataset.labels[i]) for i in range(min(64, len(dataset)))]
    input_ids, attention_mask, labels = pad_batch(batch, pad_id)
    with torch.no_grad():
        states = prefix(input_ids, attention_mask)

    def loss_and_gradient(hidden):
        for parameter in trainable:
            parameter.grad = None
        loss = top(hidden_states=hidden, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        return float(loss), torch.cat([p.grad.flatten() for p in trainable])

    exact_loss, exact = loss_and_gradient(states)
    errors = {}
    for dtype in (torch.float16, torch.bfloat16):
        loss, gradient = loss_and_gradient(states.to(dtype).float())
        errors[str(dtype).removeprefix("torch.")] = (
            abs(loss - exact_loss) / abs(exact_loss),
            float((gradient - exact).norm() / exact.norm()),
        )
    with torch.no_grad():
        for parameter, value in zip(trainable, saved):
            parameter.copy_(value)
            parameter.grad = None
    model.train()
    return errors


def print_setup(
    model: ModelSpec,
    training: TrainingSpec,
    max_length: int,
    device: torch.device,
    lengths: list[int],
    args: argparse.Namespace,
) -> None:
    """What is measured: the model and its LoRA, the device, the data and the repeats."""
    print(f"model        {model.name}")
    print(f"device       {device}")
    print(f"torch        {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"data         {len(lengths)} synthetic notes, tokens per note: mean "
        f"{statistics.mean(lengths):.0f}, max {max(lengths)} (max_length "
        f"{max_length})"
    )
    print(
        f"training     batch_size {training.batch_size}, "
        f"{training.padding} padding, "
        f"LoRA r={model.lora_rank} on "
        f"{model.lora_target_modules} of the top "
        f"{model.lora_layers} layers"
    )
    print(
        f"repeats      {args.repeats} x {args.epochs} one-epoch calls per configuration "
        "after 1 warm-up call\n"
    )


def print_rates(
    names: list[str], first: dict[str, list[float]], later: dict[str, list[float]], examples: int
) -> None:
    """Samples/s of each configuration in its first and later epochs, and the ratios."""

    def rate(values: list[float]) -> float:
        return examples / statistics.mean(values) if values else float("nan")

    print(f"{'configuration':<22} {'1st epoch samples/s':>20} {'later epochs samples/s':>23}")
    for name in names:
        print(f"{name:<22} {rate(first[name]):>20.1f} {rate(later[name]):>23.1f}")

    print("\nratios of samples/s")
    for label, faster, slower in RATIOS:
        print(
            f"  {label:<33} first epoch {rate(first[faster]) / rate(first[slower]):.2f}, "
            f"later epochs {rate(later[faster]) / rate(later[slower]):.2f}"
        )


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()

    base_config = RunConfig(lora_variant="lora")  # the LoRA path, as train_throughput.md records
    labels = sorted(DIAGNOSES)
    label_to_id = {label: i for i, label in enumerate(labels)}
    tokenizer = load_tokenizer(base_config.spec.model.name)
    notes = generate_notes(0, args.examples, args.seed)
    records = [Record(note["text"], note["label"]) for note in notes]
    dataset = encode_classification(
        tokenizer, records, label_to_id, base_config.spec.task.max_length
    )
    warmup_records = records[: 2 * base_config.spec.training.batch_size]
    warmup = encode_classification(
        tokenizer, warmup_records, label_to_id, base_config.spec.task.max_length
    )
    lengths = [len(ids) for ids in dataset.input_ids]

    model = build_model(base_config.spec, len(labels))
    start = get_adapter_arrays(model)
    configs = {
        name: base_config.updated(
            **{
                "dp": dp,
                "prefix_cache": cache,
                "length_bucketing": buckets,
                "local_epochs": 1,
            }
        )
        for name, dp, cache, buckets in CONFIGURATIONS
    }

    def train(config: RunConfig, data, who: str) -> None:
        train_locally(model, data, config, start, [], pad_id=tokenizer.pad_token_id, who=who)

    print_setup(
        base_config.spec.model,
        base_config.spec.training,
        base_config.spec.task.max_length,
        pick_device(base_config.local.device),
        lengths,
        args,
    )
    for name, config in configs.items():
        train(config, warmup, f"warm-up {name}")
    drop_prefix_caches()

    first: dict[str, list[float]] = {name: [] for name in configs}
    later: dict[str, list[float]] = {name: [] for name in configs}
    # DP on and off are different run specs, hence different runs for the cache: the
    # configurations of one DP setting are timed round-robin within one run.
    for dp_setting in (True, False):
        group = [name for name, dp, _, _ in CONFIGURATIONS if dp == dp_setting]
        for _ in range(args.repeats):
            drop_prefix_caches()  # a new run: the first epoch builds the cache again
            for epoch in range(args.epochs):
                for name in group:
                    config = configs[name]
                    seconds = time_call(
                        lambda config=config, name=name: train(config, dataset, f"bench {name}")
                    )
                    (first if epoch == 0 else later)[name].append(seconds)
    drop_prefix_caches()

    print_rates(list(configs), first, later, len(dataset))
    print("\n16-bit storage of the cached states, relative change of one batch's")
    for dtype, (loss, gradient) in storage_error(
        model, dataset, tokenizer.pad_token_id, base_config.spec.model.lora_layers
    ).items():
        print(f"  {dtype:<9} loss {loss:.1e}, gradient {gradient:.1e}")


if __name__ == "__main__":
    main()
