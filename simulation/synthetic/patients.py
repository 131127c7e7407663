"""Patients for the synthetic notes: who each note is about, for patient-level DP.

Real records come in patients: most patients have one to three notes (an admission note, a
discharge summary), a few have many (chronic care, long stays). Patient-level DP protects all of
a patient's notes as one unit, and its cost grows with how unevenly notes spread over patients,
so the synthetic notes get a realistic spread rather than one note each:

    notes per patient   1     2     3     4-6    7-15   16-40
    share of patients   40%   25%   15%   12%    6%     2%

That is about 3.4 notes per patient on average, with the largest patients holding tens of notes
(a skewed, long-tailed count, as in MIMIC-style note collections, where a median patient has a
handful of notes and a few have hundreds). A patient's notes share one diagnosis (the notes of
one illness); the notes themselves are the same as without patients, only grouped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

#: (smallest, largest notes, share of patients) of each band of the spread above.
NOTES_PER_PATIENT = (
    (1, 1, 0.40),
    (2, 2, 0.25),
    (3, 3, 0.15),
    (4, 6, 0.12),
    (7, 15, 0.06),
    (16, 40, 0.02),
)


def draw_patient_size(rng: random.Random) -> int:
    """How many notes a new patient has, from `NOTES_PER_PATIENT`."""
    low, high, _ = rng.choices(NOTES_PER_PATIENT, [share for *_, share in NOTES_PER_PATIENT])[0]
    return rng.randint(low, high)


def assign_patients(labels: Sequence[str], prefix: str, seed: int) -> list[str]:
    """A patient id for each of the notes whose diagnoses are `labels`.

    The notes of each diagnosis are dealt out in order to patients whose sizes are drawn from
    `NOTES_PER_PATIENT` (the last patient of a diagnosis takes what is left), so a patient's
    notes share a diagnosis. Ids are `<prefix>-patient-<n>`; the same arguments always give the
    same patients.
    """
    rng = random.Random(f"patients:{prefix}:{seed}")
    by_label: dict[str, list[int]] = {}
    for position, label in enumerate(labels):
        by_label.setdefault(label, []).append(position)
    patients = [""] * len(labels)
    number = 0
    for label in sorted(by_label):
        positions = by_label[label]
        start = 0
        while start < len(positions):
            size = draw_patient_size(rng)
            for position in positions[start : start + size]:
                patients[position] = f"{prefix}-patient-{number}"
            number += 1
            start += size
    return patients
