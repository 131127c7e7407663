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
    patient, drawn with a realistic spread of notes per patient (`patients.py`).

    Args:
        task: The task's name: "ner"; any other name gets the classification notes.
        hospital: The hospital's index, from 0.
        per_hospital: How many examples: notes for classification, sentences for NER.
        seed: The run's seed.
        hospitals: The number of simulated hospitals.

    Returns:
        For NER, `PatientSentence`s of (token, IOB2 tag) pairs (a note's sentences share its
        patient); else `Record`s whose group is "hospital-<index>". Patient ids are
        "hospital-<index>-patient-<n>".

    Raises:
        ConfigError: `hospitals` below 1, `hospital` outside 0..hospitals - 1, or a negative
            `per_hospital`.
    """
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
    classification, the tags of every hospital's sentences for NER.

    Args:
        task: The task's name: "ner"; any other name gets the diagnoses.
        hospitals: The number of simulated hospitals.
        per_hospital: The examples of every hospital (as in `synthetic_examples`), or a list
            with the number of each hospital, indexed by hospital.
        seed: The run's seed.

    Returns:
        The diagnoses sorted by name (not `DIAGNOSES`' order); for NER, `label_list` of all
        hospitals' sentences (generated here, as the run will generate them).

    Raises:
        ConfigError: for NER, a negative number of sentences.
    """
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
