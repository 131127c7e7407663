"""Tests for fedward's built-in synthetic clinical notes (simulation/synthetic/)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from importlib import resources

import pytest

from fedward.common.errors import ConfigError
from fedward.simulation.synthetic import (
    DIAGNOSES,
    ENTITY_TYPES,
    generate_ner_notes,
    generate_notes,
    hospital_style,
    label_weights,
    tokenize,
)


def _label_shares(notes: list[dict[str, str]]) -> dict[str, float]:
    counts = Counter(note["label"] for note in notes)
    return {label: counts[label] / len(notes) for label in DIAGNOSES}


def _total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    return 0.5 * sum(abs(p[label] - q[label]) for label in DIAGNOSES)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _macro_f1(gold: list[str], predicted: list[str]) -> float:
    scores = []
    for label in DIAGNOSES:
        tp = sum(g == p == label for g, p in zip(gold, predicted))
        fp = sum(p == label != g for g, p in zip(gold, predicted))
        fn = sum(g == label != p for g, p in zip(gold, predicted))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


# --- classification -------------------------------------------------------------------------


def test_same_arguments_give_the_same_notes_and_another_seed_other_notes():
    first = generate_notes(1, 50, seed=7)
    assert first == generate_notes(1, 50, seed=7)
    assert [n["text"] for n in first] != [n["text"] for n in generate_notes(1, 50, seed=8)]


def test_notes_carry_text_a_known_label_and_the_hospital_name():
    notes = generate_notes(2, 40, seed=0)
    assert len(notes) == 40
    for note in notes:
        assert set(note) == {"text", "label", "hospital"}
        assert note["label"] in DIAGNOSES
        assert note["hospital"] == "hospital-2"
        assert note["text"] == note["text"].strip() and note["text"]


def test_at_least_eight_distinct_diagnoses():
    assert len(DIAGNOSES) >= 8 and len(set(DIAGNOSES)) == len(DIAGNOSES)


@pytest.mark.parametrize("seed", [0, 42])
def test_every_diagnosis_has_several_notes_at_every_hospital(seed):
    for hospital in range(3):
        counts = Counter(n["label"] for n in generate_notes(hospital, 240, seed))
        assert set(counts) == set(DIAGNOSES)
        assert min(counts.values()) >= 5, counts


def test_ten_notes_cover_all_ten_diagnoses():
    notes = generate_notes(0, len(DIAGNOSES), seed=3)
    assert sorted(n["label"] for n in notes) == sorted(DIAGNOSES)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_label_mix_differs_between_hospitals(seed):
    shares = [_label_shares(generate_notes(h, 300, seed)) for h in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert _total_variation(shares[a], shares[b]) > 0.2


def test_label_mix_depends_on_the_seed_but_not_on_the_number_of_notes():
    assert label_weights(0, 1) != label_weights(0, 2)
    small = _label_shares(generate_notes(0, 500, seed=5))
    large = _label_shares(generate_notes(0, 1000, seed=5))
    assert _total_variation(small, large) < 0.01
    assert math.isclose(sum(label_weights(4, 9, num_hospitals=12)), 1.0)


def test_hospitals_write_in_different_styles():
    terse, prose, soap = (generate_notes(h, 200, seed=11) for h in range(3))

    def share(notes, pattern):
        return sum(bool(re.search(pattern, n["text"])) for n in notes) / len(notes)

    # Hospital 1 writes prose ("67-year-old man"), the others do not.
    assert share(prose, r"\d+-year-old") > 0.95
    assert share(terse, r"year-old") == share(soap, r"year-old") == 0
    # Hospital 2 writes SOAP sections on separate lines, the others write one paragraph.
    assert share(soap, r"\nO: ") > 0.95
    assert share(terse, "\n") == share(prose, "\n") == 0
    # Hospital 0 abbreviates: "67M", "w/", "p/w".
    assert share(terse, r"^\d+[MF] ") == 1
    assert share(prose, r"\bp/w\b") == 0
    # Hospital 1 records temperatures in Fahrenheit, hospital 2 in Celsius.
    assert share(prose, r"temperature was 9\d\.\d F|temperature was 10\d\.\d F") > 0.7
    assert share(soap, r"Temp 3\d\.\d C") > 0.9
    mean_words = [
        sum(len(n["text"].split()) for n in notes) / len(notes) for notes in (terse, prose, soap)
    ]
    assert mean_words[0] + 15 < mean_words[1]


def test_hospitals_beyond_the_third_mix_forms_and_vary_their_habits():
    styles = [hospital_style(h) for h in range(3, 12)]
    assert all(len(style.forms) == 2 for style in styles)
    assert len({style.abbreviation for style in styles}) == len(styles)
    notes = generate_notes(5, 200, seed=1, num_hospitals=12)  # primary form: SOAP
    with_sections = sum("\n" in n["text"] for n in notes)
    assert 0.5 * len(notes) < with_sections < len(notes)
    assert hospital_style(5) == hospital_style(5)


def test_note_lengths_fit_a_small_model():
    lengths = [len(n["text"].split()) for h in range(3) for n in generate_notes(h, 300, seed=2)]
    within = sum(20 <= n <= 130 for n in lengths) / len(lengths)
    assert within > 0.95
    assert max(lengths) <= 160
    assert 40 <= sum(lengths) / len(lengths) <= 100


def test_the_diagnosis_name_is_not_a_giveaway():
    notes = [n for h in range(3) for n in generate_notes(h, 300, seed=4)]
    names_own = sum(n["label"].lower() in n["text"].lower() for n in notes) / len(notes)
    names_other = sum(
        any(other.lower() in n["text"].lower() for other in DIAGNOSES if other != n["label"])
        for n in notes
    ) / len(notes)
    assert names_own < 0.5
    assert names_other > 0.1


def test_notes_share_symptoms_across_diagnoses():
    notes = [n for h in range(3) for n in generate_notes(h, 300, seed=6)]
    breathless = {
        n["label"] for n in notes if re.search(r"shortness of breath|\bSOB\b|dyspnea", n["text"])
    }
    confused = {
        n["label"] for n in notes if re.search(r"confusion|altered mental|\bAMS\b", n["text"])
    }
    assert {"heart failure", "pneumonia", "COPD exacerbation", "asthma exacerbation"} <= breathless
    assert {"sepsis", "stroke", "urinary tract infection"} <= confused


def test_a_bag_of_words_model_learns_the_task_but_does_not_solve_it():
    """Naive Bayes on word counts: clearly above chance (0.1), clearly below perfect."""
    train = [n for h in range(3) for n in generate_notes(h, 300, seed=21)]
    test = [n for h in range(3) for n in generate_notes(h, 300, seed=22)]
    word_counts = {label: Counter() for label in DIAGNOSES}
    label_counts = Counter(n["label"] for n in train)
    for note in train:
        word_counts[note["label"]].update(_words(note["text"]))
    vocabulary = set().union(*word_counts.values())
    totals = {label: sum(c.values()) + len(vocabulary) for label, c in word_counts.items()}

    def predict(text: str) -> str:
        words = [w for w in _words(text) if w in vocabulary]
        return max(
            DIAGNOSES,
            key=lambda label: (
                math.log(label_counts[label])
                + sum(math.log((word_counts[label][w] + 1) / totals[label]) for w in words)
            ),
        )

    predicted = [predict(n["text"]) for n in test]
    f1 = _macro_f1([n["label"] for n in test], predicted)
    assert 0.5 < f1 < 0.97, f1


@pytest.mark.parametrize("hospital, num_hospitals", [(-1, 3), (3, 3), (0, 0)])
def test_a_hospital_outside_the_federation_is_refused(hospital, num_hospitals):
    with pytest.raises(ConfigError, match="hospital"):
        generate_notes(hospital, 10, seed=0, num_hospitals=num_hospitals)


def test_zero_notes_is_an_empty_list_and_negative_is_refused():
    assert generate_notes(0, 0, seed=0) == []
    with pytest.raises(ConfigError, match="notes"):
        generate_notes(0, -1, seed=0)


def test_the_packaged_profiles_name_only_concepts_the_vocabulary_has():
    # The tables are package data (simulation/synthetic/data/*.json): an edit that misspells a key
    # would otherwise fail only for the seeds that happen to draw it.
    vocabulary = json.loads(_data_file("vocabulary.json"))
    profiles = json.loads(_data_file("profiles.json"))
    assert list(profiles) == list(DIAGNOSES)
    drugs = set(vocabulary["drugs"])
    for label, profile in profiles.items():
        assert set(profile["symptoms"]) <= set(vocabulary["symptoms"]), label
        assert set(profile["findings"]) <= set(vocabulary["findings"]), label
        assert set(profile["labs"]) <= set(vocabulary["labs"]), label
        assert set(profile["vitals"]) <= set(vocabulary["normal_vitals"]), label
        assert set(profile["history"]) <= set(vocabulary["diseases"]), label
        assert {drug.lstrip("-") for drug in profile["drugs"]} <= drugs, label
        assert set(profile["plan"]) <= set(vocabulary["plan_items"]), label
        assert set(profile["confusable"]) <= set(DIAGNOSES), label
    assert set(vocabulary["diagnosis_names"]) == set(DIAGNOSES)
    assert set(vocabulary["nonspecific_symptoms"]) <= set(vocabulary["symptoms"])
    for condition, drug_keys in vocabulary["home_medications"].items():
        assert condition in vocabulary["diseases"] and set(drug_keys) <= drugs


def _data_file(name: str) -> str:
    return resources.files("fedward.simulation.synthetic").joinpath("data", name).read_text("utf-8")


# --- named-entity recognition ---------------------------------------------------------------

_TAGS = {"O"} | {f"{p}-{t}" for p in "BI" for t in ENTITY_TYPES}


def _spans(sentence: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(entity type, entity text) for every B-... run in a sentence."""
    spans: list[tuple[str, list[str]]] = []
    for token, tag in sentence:
        if tag.startswith("B-"):
            spans.append((tag[2:], [token]))
        elif tag.startswith("I-"):
            spans[-1][1].append(token)
    return [(kind, " ".join(tokens)) for kind, tokens in spans]


def test_ner_same_arguments_give_the_same_sentences_and_another_seed_others():
    first = generate_ner_notes(0, 60, seed=3)
    assert first == generate_ner_notes(0, 60, seed=3)
    assert first != generate_ner_notes(0, 60, seed=4)
    assert len(first) == 60 and generate_ner_notes(0, 0, seed=3) == []


@pytest.mark.parametrize("hospital, num_hospitals", [(0, 3), (1, 3), (2, 3), (7, 9)])
def test_ner_tags_are_valid_iob2(hospital, num_hospitals):
    for sentence in generate_ner_notes(hospital, 300, seed=5, num_hospitals=num_hospitals):
        assert sentence
        previous = "O"
        for token, tag in sentence:
            assert tag in _TAGS
            assert token and not any(c.isspace() for c in token)
            if tag.startswith("I-"):
                assert previous in (f"B-{tag[2:]}", f"I-{tag[2:]}"), sentence
            previous = tag


@pytest.mark.parametrize("hospital", [0, 1, 2])
def test_ner_every_entity_type_occurs_with_multi_word_spans(hospital):
    sentences = generate_ner_notes(hospital, 200, seed=9)
    tags = Counter(tag for sentence in sentences for _, tag in sentence)
    for kind in ENTITY_TYPES:
        assert tags[f"B-{kind}"] >= 10, tags
    assert tags["I-DISEASE"] > 0 and tags["I-SYMPTOM"] > 0
    # Most sentences carry an entity; a few plain ones ("NKDA.") remain.
    with_entity = sum(any(tag != "O" for _, tag in s) for s in sentences)
    assert 0.7 * len(sentences) < with_entity < len(sentences)


def test_ner_multi_word_entities_are_one_span_and_doses_stay_outside():
    sentences = generate_ner_notes(1, 400, seed=2)  # prose: full names
    spans = [span for sentence in sentences for span in _spans(sentence)]
    assert ("SYMPTOM", "shortness of breath") in spans
    assert any(kind == "DISEASE" and text.startswith("type 2 diabetes") for kind, text in spans)
    for sentence in sentences:
        for token, tag in sentence:
            if token in {"mg", "g", "units", "IV", "daily"}:
                assert tag == "O", sentence


def test_ner_punctuation_is_split_into_its_own_tokens():
    assert tokenize("pt 67M w/ SOB, T 38.6; piperacillin-tazobactam.") == [
        "pt",
        "67M",
        "w",
        "/",
        "SOB",
        ",",
        "T",
        "38.6",
        ";",
        "piperacillin",
        "-",
        "tazobactam",
        ".",
    ]
    for sentence in generate_ner_notes(2, 100, seed=1):
        for token, _ in sentence:
            assert tokenize(token) == [token]


def test_ner_sentences_keep_the_hospital_style():
    def share_with_slash(hospital):
        sentences = generate_ner_notes(hospital, 300, seed=8)
        return sum(any(t == "/" for t, _ in s) for s in sentences) / len(sentences)

    # Terse notes abbreviate with slashes (w/, p/w), prose notes hardly ever do.
    assert share_with_slash(0) > 3 * share_with_slash(1)


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_notes_come_in_patients_most_with_a_few_some_with_many(task):
    """Patient-level DP is measured on these notes: the spread must look like a hospital's
    (most patients with one to three notes, a long tail), and a patient's notes one illness."""
    from collections import Counter

    from fedward.simulation.synthetic import synthetic_examples

    examples = synthetic_examples(task, 0, 700, 42, 3)
    assert all(example.patient for example in examples)
    notes = Counter(example.patient for example in examples)
    assert len(notes) < len(examples) / 2  # patients are fewer than the notes
    assert max(notes.values()) >= 16  # a few with many
    if task == "classification":
        sizes = sorted(notes.values())
        assert sum(size <= 3 for size in sizes) / len(sizes) > 0.7  # most with one to three
        labels = {}
        for example in examples:
            labels.setdefault(example.patient, set()).add(example.label)
        assert all(len(held) == 1 for held in labels.values())  # one illness each
    other = synthetic_examples(task, 1, 700, 42, 3)
    assert not {e.patient for e in examples} & {e.patient for e in other}  # not shared
    again = synthetic_examples(task, 0, 700, 42, 3)
    assert [e.patient for e in again] == [e.patient for e in examples]
