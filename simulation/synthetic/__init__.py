"""fedward's built-in synthetic clinical notes, the default data of `fedward simulate`.

Only simulation and the benchmarks use them; a hospital never does. `notes.py` writes the notes
(its words and diagnosis profiles are the JSON files in `data/`); this module hands them out in
the shape each task reads: `Record`s for classification, tagged sentences for NER.
"""

from __future__ import annotations

from fedward.common.data import Record
from fedward.common.tasks.ner import PatientSentence, label_list
from fedward.simulation.synthetic.notes import (
    DIAGNOSES,
    ENTITY_TYPES,
    generate_ner_notes,
    generate_notes,
    hospital_style,
    label_weights,
    tokenize,
)
from fedward.simulation.synthetic.patients import assign_patients

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
    hospital for classification, tagged sentences (`PatientSentence`s) for NER; each names its
    patient, drawn with a realistic spread of notes per patient (`patients.py`)."""
    prefix = f"hospital-{hospital}"
    if task == "ner":
        sentences, cases, case_labels = generate_ner_notes(
            hospital, per_hospital, seed, num_hospitals=hospitals, with_cases=True
        )
        of_case = assign_patients(case_labels, prefix, seed)
        return [
            PatientSentence(sentence, of_case[case])
            for sentence, case in zip(sentences, cases, strict=True)
        ]
    notes = generate_notes(hospital, per_hospital, seed, num_hospitals=hospitals)
    patients = assign_patients([note["label"] for note in notes], prefix, seed)
    return [
        Record(note["text"], note["label"], note["hospital"], patient)
        for note, patient in zip(notes, patients, strict=True)
    ]


def synthetic_labels(
    task: str, hospitals: int, per_hospital: int | list[int], seed: int
) -> list[str]:
    """The labels a synthetic run lists: every diagnosis (present in this draw or not) for
    classification, the tags of every hospital's sentences for NER. `per_hospital`: the notes
    of every hospital, or of each."""
    if task != "ner":
        return sorted(DIAGNOSES)
    sizes = per_hospital if isinstance(per_hospital, list) else [per_hospital] * hospitals
    return label_list(
        [
            sentence
            for hospital in range(hospitals)
            for sentence in synthetic_examples(task, hospital, sizes[hospital], seed, hospitals)
        ]
    )
