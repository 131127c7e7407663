"""fedward's built-in synthetic clinical notes: the default data set of `fedward simulate`.

Every note is invented here from small tables of clinical concepts; no text is copied from any
corpus. Two things make the notes useful for federated experiments:

- **Each hospital writes differently.** Hospital 0 writes terse abbreviated notes
  ("67M w/ SOB x3d ..."), hospital 1 full prose admission notes (temperatures in Fahrenheit),
  hospital 2 SOAP notes with section headers on separate lines. Further hospitals take one of the
  three forms (cycling by index), mix in a second one, and vary abbreviation rate, casing,
  vital-sign layout, temperature unit and typo rate.
- **Each hospital sees its own case mix.** The label distribution is skewed per hospital: every
  hospital over-represents its own block of diagnoses (so hospitals complement each other) plus
  a Dirichlet draw from the seed, and every diagnosis keeps a floor share so that it is present.

The task is learnable but not a keyword lookup. Diagnoses share symptoms (dyspnea in heart
failure, pneumonia, asthma and COPD; confusion in sepsis, stroke and UTI), the diagnosis name is
often absent, differentials name other diagnoses, histories name chronic conditions that are also
labels (a heart-failure patient with type 2 diabetes), negated symptoms ("denies fever") name
findings of other diagnoses, and some notes carry only weak evidence. There is no label noise:
the label is always the diagnosis the note was written about.

Notes are built as a list of fragments, each a piece of text with its entity type (DISEASE,
SYMPTOM, DRUG) or None, so the same writer serves note classification (`generate_notes`, the
fragments joined) and named-entity recognition (`generate_ner_notes`, the notes cut into
sentences of tokens with IOB2 tags).

The words and the diagnosis profiles are data, not code: `data/vocabulary.json` (the
concept tables) and `data/profiles.json` (how each diagnosis presents), shipped inside
the package. Editing them changes the notes of every seed.

Hospitals are numbered from 0. Everything is deterministic: seeds come from a stable hash of the
arguments, never from Python's salted `hash`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fedward.common.errors import ConfigError

logger = logging.getLogger(__name__)

#: The diagnosis labels of the classification task, in label-index order.
DIAGNOSES: tuple[str, ...] = (
    "pneumonia",
    "heart failure",
    "type 2 diabetes",
    "asthma exacerbation",
    "urinary tract infection",
    "stroke",
    "migraine",
    "acute kidney injury",
    "sepsis",
    "COPD exacerbation",
)

#: Entity types of the NER task; tags are B-<type>, I-<type> and O (IOB2).
ENTITY_TYPES: tuple[str, ...] = ("DISEASE", "SYMPTOM", "DRUG")

Fragment = tuple[str, "str | None"]  # (text, entity type or None)

# --------------------------------------------------------------------------------------------
# Concept tables: key -> (full forms, abbreviated forms); the table fixes the entity type.
# The words live in package data (data/vocabulary.json), read once at import.
# --------------------------------------------------------------------------------------------

_DATA_FOLDER = "data"


def _read_data(name: str) -> dict[str, Any]:
    """One JSON file of the vocabulary, shipped with the package (see pyproject's package-data)."""
    source = resources.files(__package__).joinpath(_DATA_FOLDER, name)
    return json.loads(source.read_text(encoding="utf-8"))


def _concepts(table: dict[str, dict[str, list[str]]]) -> dict[str, tuple[tuple[str, ...], ...]]:
    return {
        key: (tuple(forms["full"]), tuple(forms["abbreviated"])) for key, forms in table.items()
    }


def _pairs(table: list[dict[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((pair["full"], pair["abbreviated"]) for pair in table)


_VOCABULARY = _read_data("vocabulary.json")

_SYMPTOMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = _concepts(_VOCABULARY["symptoms"])

#: Symptoms that go with almost anything; added to some notes of every diagnosis.
_NONSPECIFIC: tuple[str, ...] = tuple(_VOCABULARY["nonspecific_symptoms"])

_DISEASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = _concepts(_VOCABULARY["diseases"])

#: How each diagnosis is named when a note names it (full forms, abbreviated forms).
_DIAGNOSIS_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = _concepts(
    _VOCABULARY["diagnosis_names"]
)

#: Drugs: full names, abbreviated/brand names, and dose strings that may follow the name.
_DRUGS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    key: (tuple(drug["full"]), tuple(drug["abbreviated"]), tuple(drug["doses"]))
    for key, drug in _VOCABULARY["drugs"].items()
}

#: Home medications that go with a chronic condition in the history.
_HOME_MEDS: dict[str, tuple[str, ...]] = {
    condition: tuple(drugs) for condition, drugs in _VOCABULARY["home_medications"].items()
}

#: Exam findings, imaging and bedside tests (never entities). `{x}` is filled per note.
_FINDINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = _concepts(_VOCABULARY["findings"])

#: Neutral context that every kind of case may carry: how the patient arrived, how they look.
_ARRIVALS: tuple[tuple[str, str], ...] = _pairs(_VOCABULARY["arrivals"])  # (full, abbreviated)
_APPEARANCES: tuple[tuple[str, str], ...] = _pairs(_VOCABULARY["appearances"])


def _finding_value(rng: random.Random, key: str) -> str:
    """The number a templated finding ({x}) reports; plausible for the diagnosis it belongs to."""
    if key == "echo":
        return str(rng.randint(3, 8) * 5)
    if key == "peak_flow":
        return str(rng.randint(30, 65))
    if key == "abg":
        return f"7.{rng.randint(24, 34)}/{rng.randint(52, 78)}"
    if key == "nihss":
        return str(rng.randint(3, 18))
    if key == "fena":
        return f"{rng.uniform(0.2, 0.9):.1f}"
    return ""


#: Non-drug plan items (never entities).
_PLAN_ITEMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = _concepts(
    _VOCABULARY["plan_items"]
)

#: Labs: full name, short name, unit, decimals, normal range.
_LABS: dict[str, tuple[str, str, str, int, tuple[float, float]]] = {
    key: (lab["name"], lab["short"], lab["unit"], lab["decimals"], tuple(lab["normal"]))
    for key, lab in _VOCABULARY["labs"].items()
}

#: Vital signs in health: temperature (C), heart rate, systolic/diastolic BP, resp. rate, SpO2.
_NORMAL_VITALS: dict[str, tuple[float, float]] = {
    name: tuple(low_high) for name, low_high in _VOCABULARY["normal_vitals"].items()
}


# --------------------------------------------------------------------------------------------
# Diagnosis profiles: what a case of each diagnosis tends to show, with probabilities
# (package data: data/profiles.json)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Profile:
    """How cases of one diagnosis present; every finding has the probability it is reported."""

    age: tuple[int, int]
    male: float
    symptoms: tuple[tuple[str, float], ...]
    findings: tuple[tuple[str, float], ...]
    labs: tuple[tuple[str, float, float, float], ...]  # key, low, high, probability abnormal
    vitals: dict[str, tuple[float, float]]
    history: tuple[tuple[str, float], ...]
    drugs: tuple[tuple[str, float], ...]  # a leading "-" means: hold this home drug
    plan: tuple[tuple[str, float], ...]
    confusable: tuple[str, ...]
    smoker: float = 0.15


def _profile(entry: dict[str, Any]) -> _Profile:
    """A profile as written in data/profiles.json: probabilities keyed by concept."""
    return _Profile(
        age=tuple(entry["age"]),
        male=entry["male"],
        symptoms=tuple(entry["symptoms"].items()),
        findings=tuple(entry["findings"].items()),
        labs=tuple((key, *low_high_p) for key, low_high_p in entry["labs"].items()),
        vitals={name: tuple(low_high) for name, low_high in entry["vitals"].items()},
        history=tuple(entry["history"].items()),
        drugs=tuple(entry["drugs"].items()),
        plan=tuple(entry["plan"].items()),
        confusable=tuple(entry["confusable"]),
        smoker=entry["smoker"],
    )


_PROFILES: dict[str, _Profile] = {
    label: _profile(entry) for label, entry in _read_data("profiles.json").items()
}

#: Symptoms that characterise each diagnosis; negated ("denies ...") in notes of its look-alikes.
_HALLMARKS: dict[str, tuple[str, ...]] = {
    label: tuple(key for key, _ in sorted(p.symptoms, key=lambda kp: -kp[1])[:3])
    for label, p in _PROFILES.items()
}


# --------------------------------------------------------------------------------------------
# Cases: the clinical content of one note, before any writing style is applied
# --------------------------------------------------------------------------------------------


@dataclass
class _Case:
    """What one note says, independent of how the hospital writes it."""

    label: str
    age: int
    male: bool
    days: int
    symptoms: list[str]
    negatives: list[str]
    history: list[str]
    home_meds: list[str]
    smoker: bool
    allergies: bool  # mention of no known drug allergies
    full_code: bool  # mention of the code status
    arrival: int | None  # index into _ARRIVALS
    appearance: int | None  # index into _APPEARANCES
    vitals: dict[str, float]
    findings: list[tuple[str, str]]  # key, value for {x}
    labs: list[tuple[str, float]]
    assessment: str  # "name", "ddx", "rule_out" or "none"
    differential: list[str]  # diagnosis labels named in the assessment
    drugs: list[str]  # drug keys; a leading "-" means hold
    plan: list[str]


def _take(
    rng: random.Random, items: tuple[tuple[str, float], ...], strength: float, limit: int
) -> list[str]:
    """Each item independently with its probability (scaled by strength), at most `limit`."""
    chosen = [key for key, p in items if rng.random() < min(0.95, p * strength)]
    rng.shuffle(chosen)
    return chosen[:limit]


def _symptoms(rng: random.Random, profile: _Profile, strength: float) -> list[str]:
    """The presenting complaints: at least one, at most four, sometimes a nonspecific one."""
    symptoms = _take(rng, profile.symptoms, strength, 4)
    if not symptoms:  # every note has a presenting complaint
        keys, weights = zip(*profile.symptoms)
        symptoms = [rng.choices(keys, weights)[0]]

    if len(symptoms) < 4 and rng.random() < 0.4:
        extra = rng.choice(_NONSPECIFIC)
        if extra not in symptoms:
            symptoms.append(extra)
    return symptoms


def _negatives(rng: random.Random, profile: _Profile, label: str, symptoms: list[str]) -> list[str]:
    """Sometimes one or two hallmarks of a confusable diagnosis, noted as absent."""
    if rng.random() >= 0.45:
        return []
    other = rng.choice(profile.confusable)
    pool = [k for k in _HALLMARKS[other] if k not in symptoms and k not in _HALLMARKS[label]]
    return rng.sample(pool, min(len(pool), rng.randint(1, 2)))


def _vitals(rng: random.Random, profile: _Profile, strength: float) -> dict[str, float]:
    """Vital signs: the diagnosis's ranges where the evidence shows, else normal ones."""
    vitals = {}
    for name, (low, high) in _NORMAL_VITALS.items():
        if name in profile.vitals and rng.random() < min(0.9, 0.7 * strength):
            low, high = profile.vitals[name]
        vitals[name] = rng.uniform(low, high)
    vitals["dbp"] = min(vitals["dbp"], vitals["sbp"] - rng.uniform(25, 45))
    return vitals


def _labs(rng: random.Random, profile: _Profile, strength: float) -> list[tuple[str, float]]:
    """At most four lab values: the diagnosis's, sometimes an unremarkable routine one."""
    labs: list[tuple[str, float]] = []
    for key, low, high, p in profile.labs:
        if rng.random() < min(0.95, p * strength):
            labs.append((key, rng.uniform(low, high)))
    if rng.random() < 0.35:  # an unremarkable routine lab
        key = rng.choice(("hemoglobin", "sodium", "potassium", "glucose", "wbc", "creatinine"))
        if all(key != k for k, _ in labs):
            labs.append((key, rng.uniform(*_LABS[key][4])))
    rng.shuffle(labs)
    return labs[:4]


def _assessment(rng: random.Random, profile: _Profile, label: str) -> tuple[str, list[str]]:
    """How the note's assessment reads: naming the diagnosis, a differential, a rule-out, or
    nothing; and the diagnoses it names."""
    roll = rng.random()
    if roll < 0.28:
        return "name", [label]
    if roll < 0.43:
        differential = [label, rng.choice(profile.confusable)]
        rng.shuffle(differential)
        return "ddx", differential
    if roll < 0.6:
        return "rule_out", [rng.choice(profile.confusable)]
    return "none", []


def _sample_case(rng: random.Random, label: str) -> _Case:
    """Draw one case of `label`: demographics, symptoms, vitals, findings, labs, plan."""
    profile = _PROFILES[label]
    # Some notes carry strong evidence, some little: the task should not be uniformly easy.
    strength = rng.choice((0.4, 0.7, 1.0, 1.2))

    symptoms = _symptoms(rng, profile, strength)
    negatives = _negatives(rng, profile, label, symptoms)

    history = _take(rng, profile.history, 1.0, 3)
    home_meds = [rng.choice(_HOME_MEDS[h]) for h in history if h in _HOME_MEDS]
    home_meds = list(dict.fromkeys(home_meds))[:2] if rng.random() < 0.45 else []

    vitals = _vitals(rng, profile, strength)

    findings = [(k, _finding_value(rng, k)) for k in _take(rng, profile.findings, strength, 3)]

    labs = _labs(rng, profile, strength)

    appearance = rng.randrange(len(_APPEARANCES)) if rng.random() < 0.6 else None
    if appearance == 3 and "confusion" in symptoms:
        appearance = 2

    assessment, differential = _assessment(rng, profile, label)

    drugs = _take(rng, profile.drugs, strength, 3) if rng.random() < 0.8 else []
    if rng.random() < 0.12:
        drugs.append(rng.choice(("heparin", "acetaminophen", "ondansetron")))
    plan = _take(rng, profile.plan, 1.0, 2)

    return _Case(
        label=label,
        age=rng.randint(*profile.age),
        male=rng.random() < profile.male,
        days=rng.choice((1, 1, 2, 2, 3, 3, 4, 5, 7, 10, 14)),
        symptoms=symptoms,
        negatives=negatives,
        history=history,
        home_meds=home_meds,
        smoker=rng.random() < profile.smoker,
        allergies=rng.random() < 0.3,
        full_code=rng.random() < 0.2,
        arrival=rng.randrange(len(_ARRIVALS)) if rng.random() < 0.5 else None,
        appearance=appearance,
        vitals=vitals,
        findings=findings,
        labs=labs,
        assessment=assessment,
        differential=differential,
        drugs=list(dict.fromkeys(drugs)),
        plan=plan,
    )


# --------------------------------------------------------------------------------------------
# Hospital writing styles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HospitalStyle:
    """How one hospital writes its notes.

    `forms` weighs the three note forms: "terse" (abbreviated one-liners), "prose" (full
    sentences) and "soap" (S/O/A/P sections on separate lines). `abbreviation` is the chance a
    concept is written in its abbreviated form; `typo_rate` the chance a word is misspelt.
    """

    forms: tuple[tuple[str, float], ...]
    abbreviation: float
    typo_rate: float
    lowercase: bool = False
    fahrenheit: bool = False
    vitals_separator: str = " "
    headers: tuple[str, str, str, str] = ("S:", "O:", "A:", "P:")


_BASE_STYLES: tuple[HospitalStyle, ...] = (
    HospitalStyle(forms=(("terse", 1.0),), abbreviation=0.85, typo_rate=0.015),
    HospitalStyle(forms=(("prose", 1.0),), abbreviation=0.05, typo_rate=0.003, fahrenheit=True),
    HospitalStyle(
        forms=(("soap", 1.0),), abbreviation=0.45, typo_rate=0.008, vitals_separator=" | "
    ),
)

_FORMS = ("terse", "prose", "soap")


def hospital_style(hospital: int) -> HospitalStyle:
    """The writing style of `hospital` (0-based): fixed for 0-2, varied from 3 on.

    A hospital's style belongs to the hospital, not to the run, so it does not depend on the seed.

    Args:
        hospital: The hospital's index, from 0.

    Returns:
        The style: hospital 0 terse, 1 prose, 2 SOAP; from 3 on, a main form cycling with the
        index mixed with a second one, and abbreviation rate, typos, casing, temperature unit,
        vital-sign separator and SOAP headers drawn from a seed of the index.
    """
    if hospital < len(_BASE_STYLES):
        return _BASE_STYLES[hospital]
    rng = random.Random(_stable_seed("style", hospital))
    primary = _FORMS[hospital % 3]
    secondary = _FORMS[(hospital % 3 + 1 + (hospital // 3) % 2) % 3]
    share = rng.uniform(0.6, 0.9)
    abbreviation = {"terse": (0.6, 0.95), "prose": (0.0, 0.2), "soap": (0.25, 0.65)}[primary]
    return HospitalStyle(
        forms=((primary, share), (secondary, 1.0 - share)),
        abbreviation=rng.uniform(*abbreviation),
        typo_rate=rng.uniform(0.0, 0.03),
        lowercase=primary == "terse" and rng.random() < 0.5,
        fahrenheit=rng.random() < 0.4,
        vitals_separator=rng.choice((" ", ", ", " | ", "; ")),
        headers=rng.choice(
            (
                ("S:", "O:", "A:", "P:"),
                ("SUBJECTIVE:", "OBJECTIVE:", "ASSESSMENT:", "PLAN:"),
                ("Subjective:", "Objective:", "Assessment:", "Plan:"),
            )
        ),
    )


# --------------------------------------------------------------------------------------------
# Writing a case in a style
# --------------------------------------------------------------------------------------------

_NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
)


class _Writer:
    """Accumulates the fragments of one note in one style."""

    def __init__(self, rng: random.Random, style: HospitalStyle) -> None:
        self.rng = rng
        self.style = style
        self.parts: list[Fragment] = []

    def add(self, text: str, entity: str | None = None) -> None:
        self.parts.append((text, entity))

    def _form(self, full: tuple[str, ...], abbr: tuple[str, ...]) -> str:
        forms = abbr if self.rng.random() < self.style.abbreviation else full
        return self.rng.choice(forms)

    # Each phrase is a list of fragments so that lists can be joined before being added.
    def symptom(self, key: str) -> list[Fragment]:
        return [(self._form(*_SYMPTOMS[key]), "SYMPTOM")]

    def disease(self, key: str) -> list[Fragment]:
        return [(self._form(*_DISEASES[key]), "DISEASE")]

    def diagnosis(self, label: str) -> list[Fragment]:
        return [(self._form(*_DIAGNOSIS_NAMES[label]), "DISEASE")]

    def drug(self, key: str, dose: bool) -> list[Fragment]:
        hold = key.startswith("-")
        full, abbr, doses = _DRUGS[key.lstrip("-")]
        phrase: list[Fragment] = [("hold ", None)] if hold else []
        phrase.append((self._form(full, abbr), "DRUG"))
        if dose and not hold and self.rng.random() < 0.6:
            phrase.append((" " + self.rng.choice(doses), None))
        return phrase

    def finding(self, key: str, value: str) -> list[Fragment]:
        return [(self._form(*_FINDINGS[key]).replace("{x}", value), None)]

    def plan_item(self, key: str) -> list[Fragment]:
        return [(self._form(*_PLAN_ITEMS[key]), None)]

    def lab(self, key: str, value: float, verbose: bool) -> list[Fragment]:
        full, short, unit, decimals, _ = _LABS[key]
        number = f"{value:.{decimals}f}"
        if verbose:
            return [(f"{full} {number}", None)]
        if self.rng.random() < 0.3:
            return [(f"{short} {number} {unit}", None)]
        return [(f"{short} {number}", None)]

    def neutral(self, pair: tuple[str, str]) -> str:
        return pair[1] if self.rng.random() < self.style.abbreviation else pair[0]

    def join(self, phrases: list[list[Fragment]], sep: str = ", ", last: str | None = None) -> None:
        """Add phrases separated by `sep`, the last two by `last` (default `sep`)."""
        for i, phrase in enumerate(phrases):
            if i:
                self.add(last if last is not None and i == len(phrases) - 1 else sep)
            self.parts.extend(phrase)

    def temperature(self, celsius: float, unit: bool) -> str:
        if self.style.fahrenheit:
            return f"{celsius * 9 / 5 + 32:.1f}" + (" F" if unit else "")
        return f"{celsius:.1f}" + (" C" if unit else "")


def _write_terse(w: _Writer, case: _Case) -> None:
    rng = w.rng
    w.add(f"{case.age}{'M' if case.male else 'F'} ")
    if case.history:
        w.add(rng.choice(("w/ PMH ", "PMH ", "hx ")))
        w.join([w.disease(h) for h in case.history])
        w.add(rng.choice((" p/w ", ", p/w ", " presents w/ ")))
    else:
        w.add(rng.choice(("p/w ", "presenting w/ ", "c/o ")))
    w.join([w.symptom(s) for s in case.symptoms])
    w.add(rng.choice((f" x{case.days}d", f" x {case.days} days", f" x{case.days} days")))
    if case.arrival is not None:
        w.add(", " + w.neutral(_ARRIVALS[case.arrival]))
    w.add(". ")
    if case.negatives:
        w.add(rng.choice(("denies ", "no ")))
        w.join([w.symptom(s) for s in case.negatives])
        w.add(". ")
    if case.smoker:
        w.add(rng.choice(("smoker. ", f"{rng.randint(2, 8) * 10} pk-yr smoker. ")))
    if case.home_meds:
        w.add("meds: ")
        w.join([w.drug(d, dose=False) for d in case.home_meds])
        w.add(". ")
    if case.allergies:
        w.add("NKDA. ")
    v = case.vitals
    if case.appearance is not None:
        w.add(w.neutral(_APPEARANCES[case.appearance]) + ". ")
    if rng.random() < 0.95:
        sep = w.style.vitals_separator
        w.add(
            sep.join(
                (
                    f"T {w.temperature(v['temp'], False)}",
                    f"HR {v['hr']:.0f}",
                    f"BP {v['sbp']:.0f}/{v['dbp']:.0f}",
                    f"RR {v['rr']:.0f}",
                    f"SpO2 {v['spo2']:.0f}% RA",
                )
            )
            + ". "
        )
    if case.findings:
        w.join([w.finding(k, x) for k, x in case.findings], sep="; ")
        w.add(". ")
    if case.labs:
        w.join([w.lab(k, x, verbose=False) for k, x in case.labs])
        w.add(". ")
    _write_assessment(w, case, terse=True)
    if case.drugs or case.plan:
        w.add("P: ")
        w.join([w.drug(d, dose=True) for d in case.drugs] + [w.plan_item(p) for p in case.plan])
        w.add(". ")
    if case.full_code:
        w.add("full code.")


def _write_prose(w: _Writer, case: _Case) -> None:
    rng = w.rng
    he, his = ("He", "his") if case.male else ("She", "her")
    w.add(rng.choice(("The patient is a ", "This is a ", "Patient is a ")))
    w.add(f"{case.age}-year-old {'man' if case.male else 'woman'}")
    if case.history:
        w.add(" with a history of ")
        w.join([w.disease(h) for h in case.history], last=" and ")
    w.add(rng.choice((" who presents with ", " presenting with ", " admitted with ")))
    days = _NUMBER_WORDS[case.days] if case.days < len(_NUMBER_WORDS) else str(case.days)
    w.add(f"{days} day{'s' if case.days > 1 else ''} of ")
    w.join([w.symptom(s) for s in case.symptoms], last=" and ")
    w.add(". ")
    if case.arrival is not None:
        w.add(f"{he} {_ARRIVALS[case.arrival][0]}. ")
    if case.negatives:
        w.add(f"{he} denies ")
        w.join([w.symptom(s) for s in case.negatives], last=" or ")
        w.add(". ")
    if case.smoker:
        w.add(f"{he} has a {rng.randint(2, 8) * 10} pack-year smoking history. ")
    if case.home_meds:
        w.add("Home medications include ")
        w.join([w.drug(d, dose=False) for d in case.home_meds], last=" and ")
        w.add(". ")
    if case.allergies:
        w.add("No known drug allergies. ")
    v = case.vitals
    if rng.random() < 0.85:
        w.add(
            f"On arrival {his} temperature was {w.temperature(v['temp'], True)}, heart rate "
            f"{v['hr']:.0f}, blood pressure {v['sbp']:.0f}/{v['dbp']:.0f}, respiratory rate "
            f"{v['rr']:.0f} and oxygen saturation {v['spo2']:.0f}% on room air. "
        )
    if case.appearance is not None:
        w.add(f"{he} was {w.neutral(_APPEARANCES[case.appearance])}. ")
    if case.findings:
        w.add(rng.choice(("Workup showed ", "Notable findings were ", "Findings included ")))
        w.join([w.finding(k, x) for k, x in case.findings], last=" and ")
        w.add(". ")
    if case.labs:
        w.add(rng.choice(("Labs showed a ", "Laboratory studies were notable for a ")))
        w.join([w.lab(k, x, verbose=True) for k, x in case.labs], last=" and ")
        w.add(". ")
    _write_assessment(w, case, terse=False)
    if case.drugs or case.plan:
        w.add(rng.choice(("We will start ", "Plan: ", "Management includes ")))
        w.join(
            [w.drug(d, dose=True) for d in case.drugs] + [w.plan_item(p) for p in case.plan],
            last=" and ",
        )
        w.add(". ")
    if case.full_code:
        w.add(f"{he} is full code.")


def _write_soap(w: _Writer, case: _Case) -> None:
    rng = w.rng
    s_header, o_header, a_header, p_header = w.style.headers
    w.add(f"{s_header} {case.age} y/o {'male' if case.male else 'female'} c/o ")
    w.join([w.symptom(s) for s in case.symptoms])
    w.add(f" x {case.days} days. ")
    if case.arrival is not None:
        w.add(w.neutral(_ARRIVALS[case.arrival]).capitalize() + ". ")
    if case.negatives:
        w.add("Denies ")
        w.join([w.symptom(s) for s in case.negatives])
        w.add(". ")
    if case.history:
        w.add("PMH: ")
        w.join([w.disease(h) for h in case.history])
        w.add(". ")
    if case.smoker:
        w.add("Current smoker. " if rng.random() < 0.5 else "Former smoker. ")
    if case.home_meds:
        w.add("Meds: ")
        w.join([w.drug(d, dose=False) for d in case.home_meds])
        w.add(". ")
    if case.allergies:
        w.add("Allergies: NKDA. ")
    v = case.vitals
    w.add(f"\n{o_header} ")
    sep = w.style.vitals_separator
    w.add(
        sep.join(
            (
                f"Temp {w.temperature(v['temp'], True)}",
                f"HR {v['hr']:.0f}",
                f"BP {v['sbp']:.0f}/{v['dbp']:.0f}",
                f"RR {v['rr']:.0f}",
                f"SpO2 {v['spo2']:.0f}%",
            )
        )
        + ". "
    )
    if case.appearance is not None:
        w.add("Gen: " + w.neutral(_APPEARANCES[case.appearance]) + ". ")
    if case.findings:
        w.add("Exam/studies: ")
        w.join([w.finding(k, x) for k, x in case.findings])
        w.add(". ")
    if case.labs:
        w.add("Labs: ")
        w.join([w.lab(k, x, verbose=False) for k, x in case.labs])
        w.add(". ")
    w.add(f"\n{a_header} ")
    if case.assessment == "none":
        w.add(rng.choice(("Workup in progress.", "See plan.", "Admit for further evaluation.")))
    else:
        _write_assessment(w, case, terse=True, header=False)
    if case.drugs or case.plan:
        w.add(f"\n{p_header} ")
        w.join(
            [w.drug(d, dose=True) for d in case.drugs] + [w.plan_item(p) for p in case.plan],
            sep="; ",
        )
        w.add(". ")
    if case.full_code:
        w.add("Full code.")


def _write_assessment(w: _Writer, case: _Case, terse: bool, header: bool = True) -> None:
    """The assessment: the diagnosis named, a differential, a rule-out, or nothing."""
    rng = w.rng
    names = [w.diagnosis(label) for label in case.differential]
    if case.assessment == "none":
        return
    if terse:
        if header:
            w.add("A: ")
        if case.assessment == "name":
            w.join(names)
        elif case.assessment == "ddx":
            w.join(names, sep=rng.choice((" vs ", " versus ", " or ")))
        else:
            w.add(rng.choice(("r/o ", "eval for ", "?")))
            w.join(names)
        w.add(". ")
        return
    if case.assessment == "name":
        w.add(
            rng.choice(("Presentation is most consistent with ", "Admitted for ", "Impression: "))
        )
        w.join(names)
    elif case.assessment == "ddx":
        w.add("The differential includes ")
        w.join(names, last=" and ")
    else:
        w.add("We need to rule out ")
        w.join(names)
    w.add(". ")


_WRITERS = {"terse": _write_terse, "prose": _write_prose, "soap": _write_soap}

_WORD = re.compile(r"[A-Za-z]{4,}")


def _misspell(rng: random.Random, word: str) -> str:
    """One typing slip: swap two neighbouring letters, drop one, or double one."""
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]


def _finish(rng: random.Random, style: HospitalStyle, parts: list[Fragment]) -> list[Fragment]:
    """Apply the hospital's typo and casing habits to the fragments of one note."""
    if style.typo_rate > 0 and parts:
        # About two words a fragment: draw the number of slips, then place each one.
        slips = sum(rng.random() < style.typo_rate for _ in range(2 * len(parts)))
        for _ in range(slips):
            i = rng.randrange(len(parts))
            text, entity = parts[i]
            words = list(_WORD.finditer(text))
            if words:
                m = rng.choice(words)
                parts[i] = (text[: m.start()] + _misspell(rng, m.group()) + text[m.end() :], entity)
    if style.lowercase:
        parts = [(text.lower(), entity) for text, entity in parts]
    while parts and parts[-1][1] is None and not parts[-1][0].strip():
        parts.pop()
    if parts and parts[-1][1] is None:
        parts[-1] = (parts[-1][0].rstrip(), None)
    return parts


def _write_case(rng: random.Random, style: HospitalStyle, case: _Case) -> list[Fragment]:
    forms, weights = zip(*style.forms)
    form = forms[0] if len(forms) == 1 else rng.choices(forms, weights)[0]
    writer = _Writer(rng, style)
    _WRITERS[form](writer, case)
    return _finish(rng, style, writer.parts)


# --------------------------------------------------------------------------------------------
# Per-hospital label mix and the public generators
# --------------------------------------------------------------------------------------------


def _stable_seed(*values: object) -> int:
    """A seed from `values` that is the same in every process (unlike the salted `hash`)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def label_weights(hospital: int, seed: int, num_hospitals: int = 3) -> list[float]:
    """The label distribution of `hospital`, aligned with `DIAGNOSES`; sums to 1.

    A mix of three parts: a floor shared by every label (35%, so each label is present), the
    hospital's own block of specialities (40%; the blocks of all hospitals tile the label set,
    so hospitals complement each other) and a Dirichlet(1) draw from the seed (25%).

    Args:
        hospital: The hospital's index, from 0.
        seed: The run's seed.
        num_hospitals: The number of simulated hospitals. With more hospitals than labels, each
            hospital's block is one label, shared with other hospitals.

    Returns:
        One probability per label of `DIAGNOSES`, in its order; each above 0, together 1.

    Raises:
        ConfigError: `num_hospitals` below 1, or `hospital` outside 0..num_hospitals - 1.
    """
    _check_hospital(hospital, num_hospitals)
    k = len(DIAGNOSES)
    rng = random.Random(_stable_seed("labels", seed, hospital, num_hospitals))
    order = list(range(k))
    random.Random(_stable_seed("speciality-order", seed)).shuffle(order)
    if num_hospitals <= k:
        special = [order[j] for j in range(k) if j * num_hospitals // k == hospital]
    else:
        special = [order[hospital % k]]
    gammas = [rng.gammavariate(1.0, 1.0) for _ in range(k)]
    total = sum(gammas)
    return [
        0.35 / k + (0.40 / len(special) if i in special else 0.0) + 0.25 * g / total
        for i, g in enumerate(gammas)
    ]


def _label_counts(weights: list[float], num_notes: int) -> list[int]:
    """Note counts per label, proportional to `weights` (largest remainder), each label at
    least one note when there are at least as many notes as labels."""
    exact = [w * num_notes for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: num_notes - sum(counts)]:
        counts[i] += 1
    if num_notes >= len(weights):
        for i in range(len(counts)):
            if counts[i] == 0:
                counts[max(range(len(counts)), key=counts.__getitem__)] -= 1
                counts[i] = 1
    return counts


def _check_hospital(hospital: int, num_hospitals: int) -> None:
    if num_hospitals < 1:
        raise ConfigError(f"hospitals: {num_hospitals} simulated hospitals; use at least 1")
    if not 0 <= hospital < num_hospitals:
        raise ConfigError(
            f"hospital index {hospital} is outside 0..{num_hospitals - 1}; hospitals are "
            "numbered from 0 to hospitals - 1"
        )


def generate_notes(
    hospital: int, num_notes: int, seed: int, num_hospitals: int = 3
) -> list[dict[str, str]]:
    """`num_notes` synthetic clinical notes of `hospital` (0-based) for diagnosis classification.

    Each note is {"text": ..., "label": one of DIAGNOSES, "hospital": "hospital-<index>"}. The
    same arguments always give the same notes. The hospital's writing style is
    `hospital_style(hospital)`; its label mix is `label_weights(hospital, seed, num_hospitals)`.

    Args:
        hospital: The hospital's index, from 0.
        num_notes: How many notes to write.
        seed: The run's seed.
        num_hospitals: The number of simulated hospitals.

    Returns:
        The notes in shuffled order, as dicts with "text", "label" and "hospital". Label counts
        follow the label mix (rounded), with every label present once there are at least as
        many notes as labels.

    Raises:
        ConfigError: `num_hospitals` below 1, `hospital` outside 0..num_hospitals - 1, or a
            negative `num_notes`.
    """
    _check_hospital(hospital, num_hospitals)
    if num_notes < 0:
        raise ConfigError(f"notes_per_hospital: {num_notes} notes requested; use 0 or more")
    counts = _label_counts(label_weights(hospital, seed, num_hospitals), num_notes)
    labels = [label for label, n in zip(DIAGNOSES, counts) for _ in range(n)]
    rng = random.Random(_stable_seed("notes", hospital, num_notes, seed, num_hospitals))
    rng.shuffle(labels)
    style = hospital_style(hospital)
    notes = []
    for label in labels:
        parts = _write_case(rng, style, _sample_case(rng, label))
        notes.append(
            {
                "text": "".join(text for text, _ in parts),
                "label": label,
                "hospital": f"hospital-{hospital}",
            }
        )
    logger.debug("generated %d synthetic notes for hospital %d", len(notes), hospital)
    return notes


# --------------------------------------------------------------------------------------------
# Named-entity recognition
# --------------------------------------------------------------------------------------------

#: Tokens: decimal numbers whole, otherwise runs of word characters, and each punctuation mark.
_TOKEN = re.compile(r"\d+(?:\.\d+)+|\w+|[^\w\s]")
_SENTENCE_END = re.compile(r"(?<=\.)\s+|\n")


def tokenize(text: str) -> list[str]:
    """Split text the way the NER notes are split: on whitespace, punctuation as own tokens.

    Args:
        text: Any text.

    Returns:
        The tokens in order: decimal numbers whole ("7.32"), runs of letters, digits and
        underscores, and each other non-space character on its own; whitespace is dropped.
    """
    return _TOKEN.findall(text)


def _tagged_sentences(parts: list[Fragment]) -> list[list[tuple[str, str]]]:
    """Cut one note into sentences of (token, IOB2 tag); entities never span sentences."""
    sentences: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for text, entity in parts:
        if entity is not None:
            tokens = _TOKEN.findall(text)
            current.extend((t, ("B-" if i == 0 else "I-") + entity) for i, t in enumerate(tokens))
            continue
        pieces = _SENTENCE_END.split(text)
        for i, piece in enumerate(pieces):
            current.extend((t, "O") for t in _TOKEN.findall(piece))
            if i < len(pieces) - 1 and current:  # a sentence boundary follows this piece
                sentences.append(current)
                current = []
    if current:
        sentences.append(current)
    return sentences


def generate_ner_notes(
    hospital: int, num_notes: int, seed: int, num_hospitals: int = 3, with_cases: bool = False
) -> Any:
    """`num_notes` tagged sentences from synthetic notes of `hospital` (0-based) for NER.

    Each item is one sentence (or SOAP section line) as (token, tag) pairs with IOB2 tags over
    `ENTITY_TYPES`: diseases (diagnoses and chronic conditions, "type 2 diabetes mellitus"),
    symptoms (also when negated: "denies fever"), and drugs (the name only: in
    "metformin 500 mg" only "metformin" is a DRUG). Sentences come from notes written in the
    hospital's style with its label mix; most carry at least one entity, a few carry none.
    The same arguments always give the same sentences. `with_cases`: (sentences, the index of
    each sentence's note, the diagnosis of each note), to give the notes patients.

    Args:
        hospital: The hospital's index, from 0.
        num_notes: How many sentences to return (not notes: notes are written until there are
            this many).
        seed: The run's seed.
        num_hospitals: The number of simulated hospitals.
        with_cases: Also return which note each sentence comes from, and each note's diagnosis.

    Returns:
        The sentences, each a list of (token, IOB2 tag) pairs. With `with_cases`: (sentences,
        the index of each sentence's note, the diagnosis of every note written, in order;
        a note may have no sentence kept).

    Raises:
        ConfigError: `num_hospitals` below 1, `hospital` outside 0..num_hospitals - 1, or a
            negative `num_notes`.
    """
    _check_hospital(hospital, num_hospitals)
    if num_notes < 0:
        raise ConfigError(f"notes_per_hospital: {num_notes} notes requested; use 0 or more")
    weights = label_weights(hospital, seed, num_hospitals)
    rng = random.Random(_stable_seed("ner", hospital, num_notes, seed, num_hospitals))
    style = hospital_style(hospital)
    sentences: list[list[tuple[str, str]]] = []
    cases: list[int] = []
    case_labels: list[str] = []
    while len(sentences) < num_notes:
        label = rng.choices(DIAGNOSES, weights)[0]
        case_labels.append(label)
        for sentence in _tagged_sentences(_write_case(rng, style, _sample_case(rng, label))):
            has_entity = any(tag != "O" for _, tag in sentence)
            if len(sentences) < num_notes and (has_entity or rng.random() < 0.15):
                sentences.append(sentence)
                cases.append(len(case_labels) - 1)
    logger.debug("generated %d synthetic NER sentences for hospital %d", len(sentences), hospital)
    return (sentences, cases, case_labels) if with_cases else sentences
