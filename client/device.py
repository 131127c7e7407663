"""Where a hospital's model runs: CUDA when present, with bf16 autocast, else CPU in float32.
Shared by training, prediction and the hospital's own model."""

from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; nothing on CPU (where the model trains in float32).

    Args:
        device: Where the model runs (`pick_device`).

    Returns:
        A context manager: `torch.autocast` to bfloat16 on a CUDA device, else a no-op.
    """
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU.

    Args:
        preference: The local setting `device`: "auto" (CUDA when available), "cuda" (CUDA,
            not checked for here) or "cpu"; any other value gives CPU.

    Returns:
        `torch.device("cuda")` or `torch.device("cpu")`.
    """
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
