"""`fedward predict`: load base model + global adapter and label notes or find entities."""

from __future__ import annotations

from pathlib import Path

import torch

from fedward.common.model import load_adapter_for_inference
from fedward.common.tasks import task_named


@torch.no_grad()
def predict_texts(adapter_dir: str | Path, texts: list[str]) -> list[str]:
    """One printable line (or block) per text: label and probability, or entities with spans."""
    model, tokenizer, meta = load_adapter_for_inference(adapter_dir)
    task = task_named(meta["task"])
    lines = []
    for text in texts:
        found = task.describe_prediction(model, tokenizer, meta["labels"], text, meta["max_length"])
        lines.append(f"{found}\t{_clip(text)}")
    return lines


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
