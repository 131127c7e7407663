"""Patient-level DP inside Opacus's own per-sample machinery: the per-record gradient rows of a
batch's micro-batches are added up into one row per sampled patient before Opacus clips, so
Opacus clips, sums and noises one vector per patient (docs/privacy.md). Opacus's internals are
reached only through `opacus_seam`."""

from __future__ import annotations

import torch

from fedward.client.privacy import opacus_seam


class PatientSums:
    """Per-patient sums of Opacus's per-record gradients (`grad_sample`) over a batch's
    micro-batches: one row per sampled patient, which Opacus then clips as one unit.

    The rows are the sums of the records' *unclipped* gradients, i.e. the gradient of the
    patient's summed loss; clipping that sum to `max_grad_norm` bounds what one patient can move
    the update, whatever its number of records (sensitivity one clipped row, as for a record).
    """

    def __init__(self, patients: int) -> None:
        self.patients = patients
        self.sums: dict[int, torch.Tensor] = {}

    def add(self, optimizer, row_patients: list[int]) -> None:
        """Add the current `grad_sample` rows into the rows of their patients."""
        for number, param in enumerate(optimizer.params):
            rows = opacus_seam.per_record_rows(optimizer, param)
            target = torch.tensor(row_patients, device=rows.device)
            if number not in self.sums:
                shape = (self.patients, *rows.shape[1:])
                self.sums[number] = torch.zeros(shape, dtype=rows.dtype, device=rows.device)
            self.sums[number].index_add_(0, target, rows)

    def hand_over(self, optimizer) -> None:
        """Put the per-patient rows where Opacus reads per-sample gradients."""
        for number, param in enumerate(optimizer.params):
            opacus_seam.hand_over_rows(param, self.sums[number])
