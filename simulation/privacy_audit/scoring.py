"""Membership scores for canaries, and the guesses the bound counts.

Two auditors, both of which a curious coordinator could run:

- **final model**: how much the canary's loss fell from the initial global adapter to the final
  one, `loss(c; theta_0) - loss(c; theta_T)`, less the mean fall of the canaries with the same
  label. Subtracting the initial loss takes out what the canary's text alone does to the model
  (some random strings are easier than others); the label's mean takes out what training on
  the included canaries of a label does to every random text.
- **every round**: the coordinator sees each round's global adapter, so it can ask of every
  round's update how far it moved along the direction that would lower the canary's loss:
  the sum over rounds of `<theta_t - theta_{t-1}, -g_c / |g_c|>`, `g_c` the canary's gradient at
  `theta_{t-1}` less the mean gradient of the canaries with its label. DP-SGD adds each
  sampled record's clipped gradient to the update, so this is where a record that escaped
  clipping or noise shows most (the white-box auditor of Steinke,
  Nasr and Jagielski 2023, with the iterates a federated coordinator actually sees).

A higher score means "more likely included". `count_guesses` guesses "in" for the k highest
scores and "out" for the k lowest and abstains on the rest; the audit fixes its k in advance
(`GUESS_FRACTIONS`) and pays for trying several with a Bonferroni correction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedward.common.data import EncodedDataset, pad_batch
from fedward.common.model import set_adapter_arrays

#: k, the guesses on each side, as shares of the canaries: 5%, 10%, 25% and 50% each way
#: (the last guesses on every canary). Few confident guesses reach a higher bound when the
#: separation is partial; guessing on all reaches the ceiling when it is perfect.
GUESS_FRACTIONS = (0.05, 0.1, 0.25, 0.5)

#: Canaries per forward pass when scoring.
SCORING_BATCH = 64


@torch.no_grad()
def canary_losses(
    model: torch.nn.Module, canaries: EncodedDataset, arrays: dict[str, np.ndarray], pad_id: int
) -> np.ndarray:
    """Each canary's cross-entropy under the adapter `arrays` (dropout off)."""
    set_adapter_arrays(model, arrays)
    model.eval()
    losses = []
    for start in range(0, len(canaries), SCORING_BATCH):
        batch = [canaries[i] for i in range(start, min(start + SCORING_BATCH, len(canaries)))]
        input_ids, attention_mask, labels = pad_batch(batch, pad_id)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
    return torch.cat(losses).numpy().astype(np.float64)


def canary_alignments(
    model: torch.nn.Module,
    canaries: EncodedDataset,
    before: dict[str, np.ndarray],
    after: dict[str, np.ndarray],
    pad_id: int,
) -> np.ndarray:
    """Per canary, `<after - before, -u>`, `u` the unit vector along its loss gradient at
    `before` less the mean gradient of the canaries with the same label: how far one round's
    global update moved along the canary's own descent direction.

    The mean is taken out because the canaries of a label share part of their gradient (the
    head's row for that label, the part of the features all text has): the included ones
    together move the model along it, which would lift every such canary's score, the left-out
    ones' too. The mean is over all canaries of the label, included or not, so it depends only
    on what the coordinator sees and on the canaries' public labels, as the bound requires.

    Per-example gradients come from Opacus's `GradSampleModule`, the same hooks the trainer's
    DP-SGD uses on this model; dropout is switched off while they run.
    """
    from opacus import GradSampleModule

    set_adapter_arrays(model, before)
    names = sorted(before)
    parameters = dict(model.named_parameters())
    step = torch.from_numpy(
        np.concatenate([(after[name] - before[name]).ravel() for name in names])
    )
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in dropouts]
    for m in dropouts:
        m.p = 0.0
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    model.train()
    gradients = []
    try:
        for start in range(0, len(canaries), SCORING_BATCH):
            batch = [canaries[i] for i in range(start, min(start + SCORING_BATCH, len(canaries)))]
            input_ids, attention_mask, labels = pad_batch(batch, pad_id)
            logits = wrapped(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
            gradients.append(
                torch.cat(
                    [parameters[name].grad_sample.reshape(len(batch), -1) for name in names],
                    dim=1,
                ).detach()
            )
            wrapped.zero_grad(set_to_none=True)
    finally:
        wrapped._close()
        for m, p in zip(dropouts, saved):
            m.p = p
        model.eval()
    centred = torch.cat(gradients)
    labels = torch.tensor(list(canaries.labels))
    for label in labels.unique():
        rows = labels == label
        centred[rows] -= centred[rows].mean(dim=0, keepdim=True)
    norms = centred.norm(dim=1).clamp(min=1e-12)
    return (-(centred @ step) / norms).double().numpy()


def label_centred(scores: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """`scores` less the mean score of the canaries with the same label: training on the
    included canaries of a label raises that label for all random text, which says nothing
    about which of them were included."""
    scores = np.asarray(scores, dtype=np.float64).copy()
    labels = np.asarray(labels)
    for label in np.unique(labels):
        scores[labels == label] -= scores[labels == label].mean()
    return scores


def final_model_scores(initial_losses: np.ndarray, final_losses: np.ndarray) -> np.ndarray:
    """The final-model auditor's scores: how far each canary's loss fell over the run."""
    return np.asarray(initial_losses) - np.asarray(final_losses)


def count_guesses(
    scores: Sequence[float], included: Sequence[bool], per_side: int
) -> tuple[int, int]:
    """Guess "in" for the `per_side` highest scores and "out" for the `per_side` lowest;
    return (guesses, correct guesses). Ties are broken by position, never by inclusion."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if not 0 <= 2 * per_side <= len(scores):
        raise ValueError(f"cannot guess {per_side} each way on {len(scores)} canaries")
    order = np.argsort(-scores, kind="stable")
    guessed_in, guessed_out = order[:per_side], order[len(order) - per_side :]
    correct = int(included[guessed_in].sum()) + int((~included[guessed_out]).sum())
    return 2 * per_side, correct
