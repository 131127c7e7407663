"""`fedward predict`: load base model + global adapter and label notes or find entities."""

from __future__ import annotations

from pathlib import Path

import torch

from fedward.common.model import load_adapter_for_inference
from fedward.common.tasks import recorded_task

#: How many labels `fedward predict` shows per note unless `--top` says otherwise.
DEFAULT_TOP = 3


@torch.no_grad()
def predict_texts(adapter_dir: str | Path, texts: list[str], top: int = DEFAULT_TOP) -> list[str]:
    """One printable block per text: the note (clipped) on its first line, then one indented
    line per label with its probability (the `top` most likely, most likely first) or per
    entity found with its character span.

    Example:
        >>> print(predict_texts("fedward-out/adapter", ["fever, cough, crackles"])[0])
        fever, cough, crackles
          pneumonia   0.912
          bronchitis  0.043
          sepsis      0.021
    """
    model, tokenizer, meta = load_adapter_for_inference(adapter_dir)
    task = recorded_task(meta)
    blocks = []
    for text in texts:
        lines = task.describe_prediction(
            model, tokenizer, meta["labels"], text, meta["max_length"], top=top
        )
        blocks.append("\n".join([_clip(text), *(f"  {line}" for line in lines)]))
    return blocks


def _clip(text: str, width: int = 80) -> str:
    text = " ".join(text.split())  # one line, whatever the note's own line breaks
    return text if len(text) <= width else text[: width - 1] + "…"
