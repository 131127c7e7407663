"""fedward's built-in synthetic clinical notes, the default data of `fedward simulate`.

Only simulation and the benchmarks use them; a hospital never does. `notes.py` writes the notes
(its words and diagnosis profiles are the JSON files in `data/`); this module hands them out in
the shape each task reads: `Record`s for classification, tagged sentences for NER.
"""

from __future__ import annotations

from fedward.common.data import Record
from fedward.common.tasks.ner import label_list
from fedward.simulation.synthetic.notes import (
    DIAGNOSES,
    ENTITY_TYPES,
    generate_ner_notes,
    generate_notes,
    hospital_style,
    label_weights,
    tokenize,
)

__all__ = [
    "DIAGNOSES",
    "ENTITY_TYPES",
    "generate_ner_notes",
    "generate_notes",
    "hospital_style",
    "label_weights",
    "synthetic_examples",
    "synthetic_labels",
    "tokenize",
]


def synthetic_examples(task: str, hospital: int, per_hospital: int, seed: int, hospitals: int):
    """The synthetic examples of `hospital` (0-based) for `task`: notes as `Record`s grouped by
    hospital for classification, tagged sentences for NER."""
    if task == "ner":
        return generate_ner_notes(hospital, per_hospital, seed, num_hospitals=hospitals)
    notes = generate_notes(hospital, per_hospital, seed, num_hospitals=hospitals)
    return [Record(note["text"], note["label"], note["hospital"]) for note in notes]


def synthetic_labels(task: str, hospitals: int, per_hospital: int, seed: int) -> list[str]:
    """The labels a synthetic run lists: every diagnosis (present in this draw or not) for
    classification, the tags of every hospital's sentences for NER."""
    if task != "ner":
        return sorted(DIAGNOSES)
    return label_list(
        [
            sentence
            for hospital in range(hospitals)
            for sentence in synthetic_examples(task, hospital, per_hospital, seed, hospitals)
        ]
    )
