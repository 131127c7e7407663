"""NER's loss with the O tag weighed down (`outside_tag_weight`): most tokens of a clinical
sentence are O, and weighing them less leaves more of each sentence's gradient to the
entities. Shared by local training and the distributed-noise gradient sum."""

from __future__ import annotations

import torch

from fedward.common.config import TaskSpec, TrainingSpec
from fedward.common.errors import ConfigError


def outside_tag_id(training: TrainingSpec, task: TaskSpec) -> int | None:
    """The O tag's label id when the run weighs its loss (`outside_tag_weight` below 1).

    Args:
        training: The run's training group (`outside_tag_weight`).
        task: The run's task group (`labels`).

    Returns:
        The position of "O" in the run's labels, or None when the weight is 1.

    Raises:
        ConfigError: a weight other than 1 without labels, or without "O" among them.
    """
    if training.outside_tag_weight == 1.0:
        return None
    if not task.labels or "O" not in task.labels:
        raise ConfigError(
            f"outside_tag_weight {training.outside_tag_weight:g} needs the run's labels, with 'O'"
        )
    return task.labels.index("O")


def weighted_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, outside_id: int, outside_weight: float
) -> torch.Tensor:
    """Token cross-entropy with the O tag's terms weighted by `outside_weight`, averaged over
    the labelled tokens (-100 is unlabelled), as the plain loss is: weight 1 gives the plain
    loss, and a smaller weight only shrinks the O tokens' share of each sentence's gradient.

    Args:
        logits: The token classifier's logits, (batch, tokens, labels); computed in float32.
        labels: The label id of each token, (batch, tokens), -100 where it has none.
        outside_id: The O tag's label id (`outside_tag_id`).
        outside_weight: The weight of an O token's term (`outside_tag_weight`).

    Returns:
        The loss, a float32 scalar: the weighted sum of the labelled tokens' terms divided by
        their count (not by their weights' sum); 0 when no token is labelled.
    """
    labels = labels.reshape(-1)
    per_token = torch.nn.functional.cross_entropy(
        logits.float().reshape(labels.numel(), -1), labels, ignore_index=-100, reduction="none"
    )
    weights = torch.where(labels == outside_id, outside_weight, 1.0)
    return (per_token * weights).sum() / (labels != -100).sum().clamp(min=1)
