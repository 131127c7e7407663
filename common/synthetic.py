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

Hospitals are numbered from 0. Everything is deterministic: seeds come from a stable hash of the
arguments, never from Python's salted `hash`.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from dataclasses import dataclass

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
# Concept tables: key -> (full forms, abbreviated forms); the table fixes the entity type
# --------------------------------------------------------------------------------------------

_SYMPTOMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "dyspnea": (("shortness of breath", "dyspnea", "breathlessness"), ("SOB", "dyspnea")),
    "exertional_dyspnea": (("dyspnea on exertion", "breathlessness on exertion"), ("DOE",)),
    "orthopnea": (("orthopnea", "difficulty breathing lying flat"), ("orthopnea",)),
    "pnd": (("paroxysmal nocturnal dyspnea",), ("PND",)),
    "cough": (("cough", "dry cough"), ("cough", "dry cough")),
    "productive_cough": (
        ("productive cough", "cough with green sputum"),
        ("prod cough", "productive cough"),
    ),
    "sputum": (("increased sputum production", "change in sputum color"), ("incr sputum",)),
    "wheezing": (("wheezing",), ("wheezing", "wheeze")),
    "chest_tightness": (("chest tightness",), ("chest tightness",)),
    "pleuritic_pain": (("pleuritic chest pain",), ("pleuritic CP", "pleuritic pain")),
    "chest_pain": (("chest pain",), ("CP", "chest pain")),
    "fever": (("fever", "fevers"), ("fever", "fevers")),
    "chills": (("chills", "rigors"), ("chills", "rigors")),
    "leg_swelling": (("leg swelling", "ankle swelling"), ("LE edema", "leg swelling")),
    "weight_gain": (("weight gain",), ("wt gain",)),
    "fatigue": (("fatigue", "generalized weakness"), ("fatigue", "weakness")),
    "polyuria": (("polyuria", "frequent urination"), ("polyuria",)),
    "polydipsia": (("polydipsia", "excessive thirst"), ("polydipsia",)),
    "blurred_vision": (("blurred vision",), ("blurry vision",)),
    "weight_loss": (("weight loss",), ("wt loss",)),
    "foot_numbness": (("numbness in both feet", "tingling in the feet"), ("foot paresthesias",)),
    "dysuria": (("dysuria", "burning on urination"), ("dysuria",)),
    "frequency": (("urinary frequency",), ("urinary freq",)),
    "urgency": (("urinary urgency",), ("urgency",)),
    "suprapubic_pain": (("suprapubic pain",), ("suprapubic pain",)),
    "flank_pain": (("flank pain",), ("flank pain",)),
    "hematuria": (("hematuria", "blood in the urine"), ("hematuria",)),
    "confusion": (("confusion", "altered mental status"), ("AMS", "confusion")),
    "unilateral_weakness": (
        ("right-sided weakness", "left arm weakness", "left-sided weakness"),
        ("R sided weakness", "L arm weakness", "L sided weakness"),
    ),
    "slurred_speech": (("slurred speech", "difficulty speaking"), ("slurred speech", "dysarthria")),
    "facial_droop": (("facial droop", "drooping of the face"), ("facial droop",)),
    "vision_loss": (("double vision", "loss of vision in one eye"), ("diplopia", "vision loss")),
    "headache": (("headache",), ("HA", "headache")),
    "throbbing_headache": (
        ("throbbing one-sided headache", "pulsating headache"),
        ("unilat throbbing HA", "throbbing HA"),
    ),
    "photophobia": (("photophobia", "sensitivity to light"), ("photophobia",)),
    "phonophobia": (("phonophobia", "sensitivity to noise"), ("phonophobia",)),
    "nausea": (("nausea",), ("nausea",)),
    "vomiting": (("vomiting",), ("emesis", "vomiting")),
    "aura": (("visual aura", "flashing lights"), ("visual aura",)),
    "decreased_urine": (("decreased urine output", "passing very little urine"), ("oliguria",)),
    "dizziness": (("dizziness", "lightheadedness"), ("dizziness", "lightheaded")),
    "poor_intake": (("poor oral intake",), ("poor PO intake",)),
    "diarrhea": (("diarrhea",), ("diarrhea",)),
    "palpitations": (("palpitations",), ("palpitations",)),
    "malaise": (("malaise", "body aches"), ("malaise", "body aches")),
}

#: Symptoms that go with almost anything; added to some notes of every diagnosis.
_NONSPECIFIC = ("fatigue", "nausea", "dizziness", "poor_intake", "malaise")

_DISEASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "htn": (("hypertension",), ("HTN",)),
    "dm2": (("type 2 diabetes mellitus", "type 2 diabetes"), ("DM2", "T2DM")),
    "ckd": (("chronic kidney disease",), ("CKD",)),
    "copd": (("chronic obstructive pulmonary disease", "COPD"), ("COPD",)),
    "asthma": (("asthma",), ("asthma",)),
    "afib": (("atrial fibrillation",), ("AFib", "AF")),
    "cad": (("coronary artery disease",), ("CAD",)),
    "chf": (
        ("heart failure with reduced ejection fraction", "congestive heart failure"),
        ("HFrEF", "CHF"),
    ),
    "hld": (("hyperlipidemia",), ("HLD",)),
    "obesity": (("obesity",), ("obesity",)),
    "bph": (("benign prostatic hyperplasia",), ("BPH",)),
    "dementia": (("dementia",), ("dementia",)),
    "prior_stroke": (("stroke",), ("CVA",)),
    "migraines": (("migraines",), ("migraines",)),
    "recurrent_uti": (("recurrent urinary tract infections",), ("recurrent UTIs",)),
    "depression": (("depression",), ("depression",)),
    "anxiety": (("anxiety",), ("anxiety",)),
    "rhinitis": (("allergic rhinitis",), ("allergic rhinitis",)),
}

#: How each diagnosis is named when a note names it (full forms, abbreviated forms).
_DIAGNOSIS_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pneumonia": (
        ("community-acquired pneumonia", "pneumonia", "right lower lobe pneumonia"),
        ("CAP", "PNA", "RLL PNA"),
    ),
    "heart failure": (
        ("acute decompensated heart failure", "heart failure exacerbation"),
        ("ADHF", "CHF exacerbation"),
    ),
    "type 2 diabetes": (
        ("uncontrolled type 2 diabetes mellitus", "poorly controlled type 2 diabetes"),
        ("uncontrolled DM2", "T2DM", "DM2 hyperglycemia"),
    ),
    "asthma exacerbation": (
        ("acute asthma exacerbation", "asthma exacerbation"),
        ("asthma exac", "asthma flare"),
    ),
    "urinary tract infection": (
        ("urinary tract infection", "acute cystitis", "pyelonephritis"),
        ("UTI", "cystitis", "pyelo"),
    ),
    "stroke": (
        ("acute ischemic stroke", "ischemic stroke"),
        ("acute CVA", "CVA", "AIS"),
    ),
    "migraine": (
        ("migraine with aura", "migraine without aura", "acute migraine"),
        ("migraine", "migraine HA"),
    ),
    "acute kidney injury": (
        ("acute kidney injury", "prerenal acute kidney injury"),
        ("AKI", "prerenal AKI"),
    ),
    "sepsis": (
        ("sepsis", "septic shock", "severe sepsis"),
        ("sepsis", "septic shock", "urosepsis"),
    ),
    "COPD exacerbation": (
        ("acute exacerbation of COPD", "COPD exacerbation"),
        ("AECOPD", "COPD exac"),
    ),
}

#: Drugs: full names, abbreviated/brand names, and dose strings that may follow the name.
_DRUGS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "ceftriaxone": (("ceftriaxone",), ("ceftriaxone", "CTX"), ("1 g IV daily", "2 g IV")),
    "azithromycin": (("azithromycin",), ("azithro",), ("500 mg daily", "500 mg IV")),
    "levofloxacin": (("levofloxacin",), ("levo", "levofloxacin"), ("750 mg daily",)),
    "doxycycline": (("doxycycline",), ("doxy",), ("100 mg twice daily",)),
    "pip_tazo": (("piperacillin-tazobactam",), ("pip-tazo", "Zosyn"), ("4.5 g IV q6h",)),
    "vancomycin": (("vancomycin",), ("vanc", "vancomycin"), ("per pharmacy", "1.5 g IV")),
    "nitrofurantoin": (("nitrofurantoin",), ("Macrobid",), ("100 mg twice daily",)),
    "cephalexin": (("cephalexin",), ("Keflex",), ("500 mg four times daily",)),
    "ciprofloxacin": (("ciprofloxacin",), ("cipro",), ("500 mg twice daily",)),
    "furosemide": (("furosemide",), ("Lasix", "furosemide"), ("40 mg IV twice daily", "80 mg IV")),
    "metoprolol": (("metoprolol",), ("metoprolol", "metop"), ("25 mg twice daily",)),
    "lisinopril": (("lisinopril",), ("lisinopril",), ("10 mg daily", "20 mg daily")),
    "spironolactone": (("spironolactone",), ("spironolactone",), ("25 mg daily",)),
    "amlodipine": (("amlodipine",), ("amlodipine",), ("5 mg daily",)),
    "metformin": (("metformin",), ("metformin",), ("1000 mg twice daily", "500 mg twice daily")),
    "insulin_glargine": (("insulin glargine",), ("Lantus", "glargine"), ("20 units nightly",)),
    "insulin_lispro": (("insulin lispro",), ("Humalog", "lispro"), ("sliding scale",)),
    "empagliflozin": (("empagliflozin",), ("Jardiance",), ("10 mg daily",)),
    "albuterol": (("albuterol",), ("albuterol",), ("nebs q4h", "2.5 mg nebulized")),
    "ipratropium": (("ipratropium",), ("ipratropium", "Atrovent"), ("0.5 mg nebulized",)),
    "duoneb": (("ipratropium-albuterol",), ("DuoNeb", "duonebs"), ("q4h", "q6h")),
    "prednisone": (("prednisone",), ("prednisone", "pred"), ("40 mg daily", "40 mg x5 days")),
    "methylprednisolone": (("methylprednisolone",), ("Solu-Medrol",), ("125 mg IV", "60 mg IV")),
    "magnesium": (("magnesium sulfate",), ("magnesium sulfate",), ("2 g IV",)),
    "fluticasone_salmeterol": (("fluticasone-salmeterol",), ("Advair",), ("250/50 twice daily",)),
    "tiotropium": (("tiotropium",), ("Spiriva",), ("18 mcg daily",)),
    "aspirin": (("aspirin",), ("ASA", "aspirin"), ("325 mg", "81 mg daily")),
    "alteplase": (("alteplase",), ("tPA", "alteplase"), ("0.9 mg/kg",)),
    "atorvastatin": (("atorvastatin",), ("atorva", "Lipitor"), ("80 mg nightly", "40 mg daily")),
    "clopidogrel": (("clopidogrel",), ("Plavix",), ("75 mg daily",)),
    "apixaban": (("apixaban",), ("Eliquis",), ("5 mg twice daily",)),
    "sumatriptan": (("sumatriptan",), ("sumatriptan", "Imitrex"), ("6 mg SC", "100 mg PO")),
    "metoclopramide": (("metoclopramide",), ("Reglan",), ("10 mg IV",)),
    "ketorolac": (("ketorolac",), ("Toradol",), ("15 mg IV", "30 mg IV")),
    "acetaminophen": (("acetaminophen",), ("APAP", "Tylenol"), ("650 mg q6h PRN", "1 g")),
    "ondansetron": (("ondansetron",), ("Zofran",), ("4 mg IV PRN",)),
    "norepinephrine": (("norepinephrine",), ("norepi", "Levophed"), ("titrated to MAP > 65",)),
    "normal_saline": (("normal saline",), ("NS",), ("1 L bolus", "at 125 mL/h")),
    "heparin": (("heparin",), ("heparin",), ("5000 units SC q8h",)),
    "sertraline": (("sertraline",), ("sertraline",), ("50 mg daily",)),
}

#: Home medications that go with a chronic condition in the history.
_HOME_MEDS: dict[str, tuple[str, ...]] = {
    "htn": ("lisinopril", "amlodipine"),
    "dm2": ("metformin", "insulin_glargine"),
    "afib": ("apixaban", "metoprolol"),
    "chf": ("furosemide", "metoprolol", "spironolactone"),
    "copd": ("tiotropium",),
    "asthma": ("fluticasone_salmeterol", "albuterol"),
    "hld": ("atorvastatin",),
    "cad": ("aspirin", "atorvastatin"),
    "depression": ("sertraline",),
}

#: Exam findings, imaging and bedside tests (never entities). `{x}` is filled per note.
_FINDINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "focal_crackles": (
        ("crackles at the right base", "coarse crackles over the left lower lobe"),
        ("crackles R base", "rhonchi LLL"),
    ),
    "bibasilar_crackles": (("bibasilar crackles",), ("bibasilar crackles", "bibasilar rales")),
    "jvd": (("jugular venous distension", "an elevated JVP"), ("JVD", "JVP elevated")),
    "pitting_edema": (
        ("2+ pitting edema to the knees",),
        ("2+ pitting edema", "bilat pitting edema"),
    ),
    "s3": (("an S3 gallop",), ("S3",)),
    "diffuse_wheezes": (("diffuse expiratory wheezes",), ("diffuse exp wheezes",)),
    "prolonged_expiration": (("a prolonged expiratory phase",), ("prolonged exp phase",)),
    "accessory_muscles": (("use of accessory muscles",), ("accessory muscle use",)),
    "decreased_breath_sounds": (
        ("decreased breath sounds bilaterally", "distant breath sounds"),
        ("decr BS bilat", "distant BS"),
    ),
    "barrel_chest": (("a barrel chest",), ("barrel chest",)),
    "pursed_lips": (("pursed-lip breathing",), ("pursed lip breathing",)),
    "cva_tenderness": (("costovertebral angle tenderness",), ("CVA tenderness",)),
    "suprapubic_tenderness": (("suprapubic tenderness",), ("suprapubic TTP",)),
    "dry_mucosa": (("dry mucous membranes",), ("dry MM",)),
    "poor_turgor": (("decreased skin turgor",), ("poor skin turgor",)),
    "facial_asymmetry": (
        ("left-sided facial asymmetry", "right-sided facial asymmetry"),
        ("L facial asymmetry", "R facial asymmetry"),
    ),
    "pronator_drift": (("pronator drift of the right arm",), ("R pronator drift", "L arm drift")),
    "aphasia": (("expressive aphasia",), ("expressive aphasia",)),
    "hemiparesis": (("right hemiparesis", "left hemiparesis"), ("R hemiparesis", "L hemiparesis")),
    "nonfocal_neuro": (("a nonfocal neurologic exam",), ("neuro nonfocal", "neuro exam nonfocal")),
    "no_meningismus": (("no neck stiffness",), ("no meningismus", "neck supple")),
    "mottled": (("mottled extremities", "cool extremities"), ("mottled skin", "cool extremities")),
    "delayed_cap_refill": (("delayed capillary refill",), ("cap refill 4 sec",)),
    "diaphoretic": (("diaphoresis",), ("diaphoretic",)),
    "acanthosis": (("acanthosis nigricans",), ("acanthosis",)),
    "foot_sensation": (
        ("decreased monofilament sensation in both feet",),
        ("decr monofilament sensation",),
    ),
    "lungs_clear": (("clear lungs",), ("lungs CTA", "lungs clear")),
    "abdomen_soft": (("a soft nontender abdomen",), ("abd soft NT",)),
    "cxr_consolidation": (
        ("chest X-ray showing right lower lobe consolidation",),
        ("CXR RLL consolidation", "CXR LLL infiltrate"),
    ),
    "cxr_edema": (
        ("chest X-ray with pulmonary edema and cardiomegaly",),
        ("CXR pulm edema, cardiomegaly",),
    ),
    "cxr_hyperinflation": (
        ("chest X-ray with hyperinflation and no infiltrate",),
        ("CXR hyperinflated, no infiltrate",),
    ),
    "cxr_clear": (("a clear chest X-ray",), ("CXR clear",)),
    "echo": (("echocardiogram with an ejection fraction of {x}%",), ("echo EF {x}%",)),
    "peak_flow": (("peak flow {x}% of predicted",), ("PEF {x}% pred",)),
    "abg": (("arterial blood gas with pH {x}",), ("ABG {x}",)),
    "ua_positive": (
        ("urinalysis positive for nitrites and leukocyte esterase",),
        ("UA +nitrite +LE", "UA >50 WBC, +nitrites"),
    ),
    "urine_culture": (("urine culture pending",), ("UCx pending",)),
    "blood_cultures": (("blood cultures drawn",), ("BCx x2 sent", "BCx pending")),
    "ct_head": (("CT head without hemorrhage",), ("CTH neg for bleed", "CT head no ICH")),
    "mri_dwi": (
        ("MRI with restricted diffusion in the left MCA territory",),
        ("MRI + DWI lesion L MCA",),
    ),
    "nihss": (("NIH stroke scale of {x}",), ("NIHSS {x}",)),
    "renal_us": (("renal ultrasound without hydronephrosis",), ("renal US no hydro",)),
    "fena": (("fractional excretion of sodium {x}%",), ("FENa {x}%",)),
    "ketones_negative": (("urine negative for ketones",), ("no ketones, AG normal",)),
    "ecg_tachy": (("ECG showing sinus tachycardia",), ("EKG sinus tach",)),
}


#: Neutral context that every kind of case may carry: how the patient arrived, how they look.
_ARRIVALS: tuple[tuple[str, str], ...] = (  # (full, abbreviated)
    ("was brought in by ambulance", "BIBA"),
    ("was referred by the primary care physician", "sent by PCP"),
    ("presented to the emergency department", "walk-in to ED"),
    ("was transferred from an outside hospital", "OSH transfer"),
    ("was sent in from a nursing facility", "from SNF"),
)
_APPEARANCES: tuple[tuple[str, str], ...] = (
    ("in no acute distress", "NAD"),
    ("uncomfortable-appearing", "uncomfortable appearing"),
    ("ill-appearing", "ill appearing"),
    ("alert and oriented", "A&Ox3"),
    ("tired-appearing", "tired appearing"),
)


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
_PLAN_ITEMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "oxygen": (("supplemental oxygen",), ("O2 via NC", "supplemental O2")),
    "oxygen_goal": (("oxygen titrated to a saturation of 88-92%",), ("O2 goal 88-92%",)),
    "bipap": (("BiPAP overnight",), ("BiPAP",)),
    "sputum_culture": (("sputum culture",), ("sputum cx",)),
    "incentive_spirometry": (("incentive spirometry",), ("IS",)),
    "daily_weights": (("daily weights",), ("daily wts",)),
    "strict_io": (("strict intake and output",), ("strict I/O",)),
    "fluid_restriction": (("a 1.5 L fluid restriction",), ("fluid restrict 1.5L",)),
    "telemetry": (("telemetry monitoring",), ("tele",)),
    "cardiology": (("a cardiology consult",), ("cards consult",)),
    "diabetes_education": (("diabetes education",), ("DM education",)),
    "fingersticks": (("fingerstick glucose checks before meals",), ("FSBG AC/HS",)),
    "nutrition": (("a nutrition consult",), ("nutrition consult",)),
    "ophthalmology": (("an ophthalmology referral",), ("ophtho referral",)),
    "continuous_nebs": (("continuous nebulizers",), ("cont nebs",)),
    "peak_flow_monitoring": (("serial peak flows",), ("serial PEF",)),
    "action_plan": (("an updated asthma action plan",), ("asthma action plan",)),
    "fluids_po": (("encouraged oral fluids",), ("push PO fluids",)),
    "follow_culture": (("follow-up of the urine culture",), ("f/u UCx",)),
    "neuro_checks": (("hourly neuro checks",), ("neuro checks q1h",)),
    "neurology": (("a neurology consult",), ("neuro consult",)),
    "swallow": (("a swallow evaluation before oral intake",), ("NPO until swallow eval",)),
    "permissive_htn": (("permissive hypertension",), ("permissive HTN",)),
    "dark_room": (("rest in a dark quiet room",), ("dark quiet room",)),
    "headache_diary": (("a headache diary",), ("HA diary",)),
    "avoid_nephrotoxins": (("avoidance of nephrotoxins",), ("avoid nephrotoxins",)),
    "renal_dosing": (("renal dosing of medications",), ("renally dose meds",)),
    "trend_creatinine": (("daily creatinine",), ("trend Cr",)),
    "nephrology": (("a nephrology consult",), ("renal consult",)),
    "fluid_bolus": (("a 30 mL/kg fluid bolus",), ("30cc/kg bolus",)),
    "icu": (("ICU evaluation",), ("ICU consult",)),
    "repeat_lactate": (("a repeat lactate in 2 hours",), ("repeat lactate",)),
    "smoking_cessation": (("smoking cessation counseling",), ("smoking cessation",)),
    "pulm_rehab": (("a pulmonary rehabilitation referral",), ("pulm rehab referral",)),
}

#: Labs: full name, short name, unit, decimals, normal range.
_LABS: dict[str, tuple[str, str, str, int, tuple[float, float]]] = {
    "wbc": ("white count", "WBC", "K/uL", 1, (4.5, 10.5)),
    "creatinine": ("creatinine", "Cr", "mg/dL", 1, (0.7, 1.2)),
    "bun": ("BUN", "BUN", "mg/dL", 0, (8, 20)),
    "potassium": ("potassium", "K", "mmol/L", 1, (3.6, 4.9)),
    "sodium": ("sodium", "Na", "mmol/L", 0, (136, 144)),
    "glucose": ("glucose", "glucose", "mg/dL", 0, (80, 140)),
    "hba1c": ("hemoglobin A1c", "A1c", "%", 1, (5.0, 5.9)),
    "bnp": ("BNP", "BNP", "pg/mL", 0, (20, 95)),
    "lactate": ("lactate", "lactate", "mmol/L", 1, (0.7, 1.8)),
    "procalcitonin": ("procalcitonin", "procal", "ng/mL", 2, (0.02, 0.2)),
    "troponin": ("troponin", "trop", "ng/mL", 2, (0.0, 0.02)),
    "hemoglobin": ("hemoglobin", "Hgb", "g/dL", 1, (12.0, 15.5)),
    "bicarbonate": ("bicarbonate", "HCO3", "mmol/L", 0, (22, 28)),
}

#: Vital signs in health: temperature (C), heart rate, systolic/diastolic BP, resp. rate, SpO2.
_NORMAL_VITALS: dict[str, tuple[float, float]] = {
    "temp": (36.4, 37.4),
    "hr": (64, 96),
    "sbp": (112, 148),
    "dbp": (64, 90),
    "rr": (13, 19),
    "spo2": (94, 99),
}


# --------------------------------------------------------------------------------------------
# Diagnosis profiles: what a case of each diagnosis tends to show, with probabilities
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


_PROFILES: dict[str, _Profile] = {
    "pneumonia": _Profile(
        age=(30, 90),
        male=0.55,
        symptoms=(
            ("productive_cough", 0.6),
            ("cough", 0.25),
            ("fever", 0.55),
            ("chills", 0.3),
            ("dyspnea", 0.5),
            ("pleuritic_pain", 0.25),
            ("fatigue", 0.25),
            ("confusion", 0.06),
        ),
        findings=(
            ("focal_crackles", 0.5),
            ("decreased_breath_sounds", 0.12),
            ("lungs_clear", 0.06),
            ("diaphoretic", 0.08),
            ("cxr_consolidation", 0.5),
            ("blood_cultures", 0.2),
            ("ecg_tachy", 0.05),
        ),
        labs=(
            ("wbc", 12.0, 21.0, 0.5),
            ("procalcitonin", 0.5, 4.0, 0.2),
            ("lactate", 1.2, 2.3, 0.1),
        ),
        vitals={"temp": (37.8, 39.6), "hr": (92, 118), "rr": (20, 28), "spo2": (87, 94)},
        history=(("copd", 0.12), ("dm2", 0.2), ("htn", 0.3), ("chf", 0.06), ("asthma", 0.05)),
        drugs=(
            ("ceftriaxone", 0.5),
            ("azithromycin", 0.45),
            ("levofloxacin", 0.15),
            ("pip_tazo", 0.06),
            ("acetaminophen", 0.15),
        ),
        plan=(("oxygen", 0.35), ("sputum_culture", 0.15), ("incentive_spirometry", 0.12)),
        confusable=("sepsis", "COPD exacerbation", "heart failure"),
    ),
    "heart failure": _Profile(
        age=(55, 93),
        male=0.55,
        symptoms=(
            ("dyspnea", 0.5),
            ("exertional_dyspnea", 0.35),
            ("orthopnea", 0.35),
            ("pnd", 0.15),
            ("leg_swelling", 0.5),
            ("weight_gain", 0.25),
            ("fatigue", 0.3),
            ("cough", 0.1),
            ("chest_pain", 0.05),
        ),
        findings=(
            ("bibasilar_crackles", 0.45),
            ("jvd", 0.4),
            ("pitting_edema", 0.45),
            ("s3", 0.12),
            ("cxr_edema", 0.4),
            ("echo", 0.25),
        ),
        labs=(
            ("bnp", 600.0, 3800.0, 0.5),
            ("creatinine", 1.3, 2.0, 0.2),
            ("troponin", 0.03, 0.09, 0.12),
            ("sodium", 127.0, 134.0, 0.12),
        ),
        vitals={
            "hr": (82, 115),
            "sbp": (135, 185),
            "dbp": (80, 105),
            "rr": (20, 27),
            "spo2": (88, 95),
        },
        history=(
            ("chf", 0.45),
            ("htn", 0.55),
            ("cad", 0.3),
            ("afib", 0.25),
            ("dm2", 0.3),
            ("ckd", 0.15),
            ("copd", 0.1),
        ),
        drugs=(
            ("furosemide", 0.65),
            ("metoprolol", 0.15),
            ("lisinopril", 0.12),
            ("spironolactone", 0.12),
            ("heparin", 0.1),
        ),
        plan=(
            ("daily_weights", 0.3),
            ("strict_io", 0.2),
            ("fluid_restriction", 0.18),
            ("telemetry", 0.15),
            ("oxygen", 0.15),
            ("cardiology", 0.1),
        ),
        confusable=("COPD exacerbation", "pneumonia", "acute kidney injury"),
    ),
    "type 2 diabetes": _Profile(
        age=(30, 78),
        male=0.5,
        symptoms=(
            ("polyuria", 0.5),
            ("polydipsia", 0.45),
            ("blurred_vision", 0.25),
            ("weight_loss", 0.2),
            ("fatigue", 0.35),
            ("foot_numbness", 0.22),
            ("dizziness", 0.1),
            ("nausea", 0.08),
        ),
        findings=(
            ("dry_mucosa", 0.22),
            ("acanthosis", 0.18),
            ("foot_sensation", 0.2),
            ("ketones_negative", 0.2),
            ("abdomen_soft", 0.08),
        ),
        labs=(
            ("glucose", 240.0, 520.0, 0.6),
            ("hba1c", 8.4, 13.5, 0.45),
            ("sodium", 130.0, 135.0, 0.08),
        ),
        vitals={"hr": (74, 102)},
        history=(("dm2", 0.55), ("htn", 0.4), ("hld", 0.35), ("obesity", 0.3), ("ckd", 0.08)),
        drugs=(
            ("metformin", 0.45),
            ("insulin_glargine", 0.4),
            ("insulin_lispro", 0.25),
            ("empagliflozin", 0.18),
        ),
        plan=(
            ("diabetes_education", 0.25),
            ("fingersticks", 0.3),
            ("nutrition", 0.12),
            ("ophthalmology", 0.08),
        ),
        confusable=("acute kidney injury", "urinary tract infection", "sepsis"),
    ),
    "asthma exacerbation": _Profile(
        age=(16, 55),
        male=0.45,
        symptoms=(
            ("wheezing", 0.6),
            ("dyspnea", 0.5),
            ("chest_tightness", 0.4),
            ("cough", 0.35),
            ("fatigue", 0.05),
        ),
        findings=(
            ("diffuse_wheezes", 0.5),
            ("prolonged_expiration", 0.3),
            ("accessory_muscles", 0.22),
            ("lungs_clear", 0.05),
            ("peak_flow", 0.35),
            ("cxr_hyperinflation", 0.12),
            ("cxr_clear", 0.15),
        ),
        labs=(("bicarbonate", 20.0, 23.0, 0.05),),
        vitals={"hr": (98, 125), "rr": (22, 32), "spo2": (89, 95)},
        history=(("asthma", 0.6), ("rhinitis", 0.2), ("obesity", 0.1), ("anxiety", 0.06)),
        drugs=(
            ("albuterol", 0.55),
            ("duoneb", 0.25),
            ("ipratropium", 0.08),
            ("prednisone", 0.35),
            ("methylprednisolone", 0.2),
            ("magnesium", 0.12),
            ("fluticasone_salmeterol", 0.12),
        ),
        plan=(
            ("continuous_nebs", 0.18),
            ("peak_flow_monitoring", 0.18),
            ("action_plan", 0.12),
            ("oxygen", 0.12),
        ),
        confusable=("COPD exacerbation", "pneumonia"),
        smoker=0.1,
    ),
    "urinary tract infection": _Profile(
        age=(18, 92),
        male=0.2,
        symptoms=(
            ("dysuria", 0.55),
            ("frequency", 0.4),
            ("urgency", 0.3),
            ("suprapubic_pain", 0.3),
            ("flank_pain", 0.18),
            ("hematuria", 0.12),
            ("fever", 0.22),
            ("confusion", 0.1),
            ("nausea", 0.1),
        ),
        findings=(
            ("suprapubic_tenderness", 0.35),
            ("cva_tenderness", 0.2),
            ("abdomen_soft", 0.12),
            ("ua_positive", 0.55),
            ("urine_culture", 0.3),
        ),
        labs=(("wbc", 10.5, 15.5, 0.3), ("creatinine", 1.2, 1.5, 0.08)),
        vitals={"temp": (37.0, 38.7), "hr": (80, 108)},
        history=(
            ("recurrent_uti", 0.22),
            ("dm2", 0.2),
            ("bph", 0.06),
            ("dementia", 0.1),
            ("htn", 0.3),
        ),
        drugs=(
            ("nitrofurantoin", 0.3),
            ("cephalexin", 0.22),
            ("ciprofloxacin", 0.18),
            ("ceftriaxone", 0.22),
        ),
        plan=(("fluids_po", 0.15), ("follow_culture", 0.2)),
        confusable=("sepsis", "acute kidney injury"),
    ),
    "stroke": _Profile(
        age=(50, 93),
        male=0.55,
        symptoms=(
            ("unilateral_weakness", 0.55),
            ("slurred_speech", 0.45),
            ("facial_droop", 0.35),
            ("vision_loss", 0.18),
            ("confusion", 0.2),
            ("headache", 0.12),
            ("dizziness", 0.18),
        ),
        findings=(
            ("facial_asymmetry", 0.4),
            ("pronator_drift", 0.3),
            ("aphasia", 0.2),
            ("hemiparesis", 0.3),
            ("ct_head", 0.5),
            ("mri_dwi", 0.22),
            ("nihss", 0.3),
        ),
        labs=(("glucose", 110.0, 190.0, 0.1),),
        vitals={"sbp": (155, 210), "dbp": (88, 112), "hr": (66, 100)},
        history=(
            ("htn", 0.55),
            ("afib", 0.3),
            ("hld", 0.3),
            ("dm2", 0.25),
            ("prior_stroke", 0.12),
            ("cad", 0.18),
        ),
        drugs=(("alteplase", 0.25), ("aspirin", 0.4), ("atorvastatin", 0.3), ("clopidogrel", 0.12)),
        plan=(
            ("neuro_checks", 0.25),
            ("neurology", 0.3),
            ("swallow", 0.22),
            ("permissive_htn", 0.15),
            ("telemetry", 0.12),
        ),
        confusable=("migraine", "sepsis"),
    ),
    "migraine": _Profile(
        age=(17, 55),
        male=0.25,
        symptoms=(
            ("throbbing_headache", 0.45),
            ("headache", 0.45),
            ("photophobia", 0.45),
            ("phonophobia", 0.25),
            ("nausea", 0.4),
            ("vomiting", 0.22),
            ("aura", 0.25),
            ("dizziness", 0.1),
            ("vision_loss", 0.05),
        ),
        findings=(("nonfocal_neuro", 0.4), ("no_meningismus", 0.25), ("ct_head", 0.18)),
        labs=(),
        vitals={"sbp": (115, 150)},
        history=(("migraines", 0.5), ("depression", 0.15), ("anxiety", 0.1)),
        drugs=(
            ("sumatriptan", 0.4),
            ("metoclopramide", 0.3),
            ("ketorolac", 0.3),
            ("acetaminophen", 0.12),
            ("normal_saline", 0.12),
        ),
        plan=(("dark_room", 0.2), ("headache_diary", 0.12), ("neurology", 0.06)),
        confusable=("stroke",),
        smoker=0.1,
    ),
    "acute kidney injury": _Profile(
        age=(45, 92),
        male=0.55,
        symptoms=(
            ("decreased_urine", 0.45),
            ("fatigue", 0.35),
            ("nausea", 0.3),
            ("poor_intake", 0.3),
            ("dizziness", 0.22),
            ("vomiting", 0.18),
            ("diarrhea", 0.18),
            ("leg_swelling", 0.08),
            ("confusion", 0.06),
        ),
        findings=(
            ("dry_mucosa", 0.35),
            ("poor_turgor", 0.22),
            ("abdomen_soft", 0.1),
            ("renal_us", 0.3),
            ("fena", 0.18),
        ),
        labs=(
            ("creatinine", 2.0, 5.2, 0.65),
            ("bun", 38.0, 95.0, 0.45),
            ("potassium", 5.2, 6.4, 0.3),
            ("bicarbonate", 15.0, 20.0, 0.18),
        ),
        vitals={"sbp": (95, 130), "hr": (80, 108)},
        history=(("ckd", 0.3), ("htn", 0.5), ("dm2", 0.3), ("chf", 0.12)),
        drugs=(("normal_saline", 0.45), ("-lisinopril", 0.25), ("-metformin", 0.15)),
        plan=(
            ("avoid_nephrotoxins", 0.3),
            ("renal_dosing", 0.2),
            ("strict_io", 0.25),
            ("nephrology", 0.18),
            ("trend_creatinine", 0.25),
        ),
        confusable=("sepsis", "heart failure", "type 2 diabetes"),
    ),
    "sepsis": _Profile(
        age=(35, 94),
        male=0.5,
        symptoms=(
            ("fever", 0.5),
            ("chills", 0.35),
            ("confusion", 0.35),
            ("fatigue", 0.22),
            ("dyspnea", 0.18),
            ("productive_cough", 0.12),
            ("dysuria", 0.12),
            ("dizziness", 0.12),
            ("poor_intake", 0.12),
        ),
        findings=(
            ("mottled", 0.25),
            ("delayed_cap_refill", 0.25),
            ("diaphoretic", 0.18),
            ("focal_crackles", 0.08),
            ("cva_tenderness", 0.06),
            ("blood_cultures", 0.5),
            ("ua_positive", 0.12),
            ("cxr_consolidation", 0.08),
            ("ecg_tachy", 0.1),
        ),
        labs=(
            ("lactate", 2.6, 7.5, 0.6),
            ("wbc", 15.0, 27.0, 0.45),
            ("creatinine", 1.4, 2.8, 0.2),
            ("procalcitonin", 2.0, 25.0, 0.18),
        ),
        vitals={
            "temp": (38.3, 40.2),
            "hr": (108, 138),
            "sbp": (72, 98),
            "dbp": (38, 58),
            "rr": (22, 32),
            "spo2": (89, 96),
        },
        history=(("dm2", 0.28), ("ckd", 0.12), ("htn", 0.3), ("dementia", 0.1), ("copd", 0.08)),
        drugs=(
            ("vancomycin", 0.4),
            ("pip_tazo", 0.4),
            ("ceftriaxone", 0.18),
            ("norepinephrine", 0.25),
            ("normal_saline", 0.4),
        ),
        plan=(("fluid_bolus", 0.3), ("icu", 0.2), ("repeat_lactate", 0.25)),
        confusable=("pneumonia", "urinary tract infection", "acute kidney injury"),
    ),
    "COPD exacerbation": _Profile(
        age=(50, 88),
        male=0.55,
        symptoms=(
            ("dyspnea", 0.55),
            ("sputum", 0.35),
            ("productive_cough", 0.25),
            ("wheezing", 0.3),
            ("cough", 0.22),
            ("exertional_dyspnea", 0.22),
            ("chest_tightness", 0.08),
            ("fatigue", 0.08),
        ),
        findings=(
            ("decreased_breath_sounds", 0.3),
            ("diffuse_wheezes", 0.28),
            ("pursed_lips", 0.22),
            ("barrel_chest", 0.18),
            ("accessory_muscles", 0.12),
            ("abg", 0.3),
            ("cxr_hyperinflation", 0.3),
        ),
        labs=(("bicarbonate", 29.0, 36.0, 0.22), ("wbc", 9.0, 13.0, 0.12)),
        vitals={"hr": (90, 115), "rr": (22, 30), "spo2": (83, 91)},
        history=(("copd", 0.55), ("htn", 0.3), ("cad", 0.15), ("chf", 0.08)),
        drugs=(
            ("duoneb", 0.4),
            ("albuterol", 0.22),
            ("ipratropium", 0.08),
            ("prednisone", 0.4),
            ("methylprednisolone", 0.12),
            ("azithromycin", 0.3),
            ("doxycycline", 0.12),
            ("tiotropium", 0.08),
        ),
        plan=(
            ("bipap", 0.18),
            ("oxygen_goal", 0.3),
            ("smoking_cessation", 0.18),
            ("pulm_rehab", 0.08),
        ),
        confusable=("asthma exacerbation", "heart failure", "pneumonia"),
        smoker=0.6,
    ),
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


def _sample_case(rng: random.Random, label: str) -> _Case:
    """Draw one case of `label`: demographics, symptoms, vitals, findings, labs, plan."""
    profile = _PROFILES[label]
    # Some notes carry strong evidence, some little: the task should not be uniformly easy.
    strength = rng.choice((0.4, 0.7, 1.0, 1.2))

    symptoms = _take(rng, profile.symptoms, strength, 4)
    if not symptoms:  # every note has a presenting complaint
        keys, weights = zip(*profile.symptoms)
        symptoms = [rng.choices(keys, weights)[0]]

    if len(symptoms) < 4 and rng.random() < 0.4:
        extra = rng.choice(_NONSPECIFIC)
        if extra not in symptoms:
            symptoms.append(extra)

    negatives: list[str] = []
    if rng.random() < 0.45:
        other = rng.choice(profile.confusable)
        pool = [k for k in _HALLMARKS[other] if k not in symptoms and k not in _HALLMARKS[label]]
        negatives = rng.sample(pool, min(len(pool), rng.randint(1, 2)))

    history = _take(rng, profile.history, 1.0, 3)
    home_meds = [rng.choice(_HOME_MEDS[h]) for h in history if h in _HOME_MEDS]
    home_meds = list(dict.fromkeys(home_meds))[:2] if rng.random() < 0.45 else []

    vitals = {}
    for name, (low, high) in _NORMAL_VITALS.items():
        if name in profile.vitals and rng.random() < min(0.9, 0.7 * strength):
            low, high = profile.vitals[name]
        vitals[name] = rng.uniform(low, high)
    vitals["dbp"] = min(vitals["dbp"], vitals["sbp"] - rng.uniform(25, 45))

    findings = [(k, _finding_value(rng, k)) for k in _take(rng, profile.findings, strength, 3)]

    labs: list[tuple[str, float]] = []
    for key, low, high, p in profile.labs:
        if rng.random() < min(0.95, p * strength):
            labs.append((key, rng.uniform(low, high)))
    if rng.random() < 0.35:  # an unremarkable routine lab
        key = rng.choice(("hemoglobin", "sodium", "potassium", "glucose", "wbc", "creatinine"))
        if all(key != k for k, _ in labs):
            labs.append((key, rng.uniform(*_LABS[key][4])))
    rng.shuffle(labs)
    labs = labs[:4]

    appearance = rng.randrange(len(_APPEARANCES)) if rng.random() < 0.6 else None
    if appearance == 3 and "confusion" in symptoms:
        appearance = 2

    roll = rng.random()
    if roll < 0.28:
        assessment, differential = "name", [label]
    elif roll < 0.43:
        assessment = "ddx"
        differential = [label, rng.choice(profile.confusable)]
        rng.shuffle(differential)
    elif roll < 0.6:
        assessment, differential = "rule_out", [rng.choice(profile.confusable)]
    else:
        assessment, differential = "none", []

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
    """Split text the way the NER notes are split: on whitespace, punctuation as own tokens."""
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
    hospital: int, num_notes: int, seed: int, num_hospitals: int = 3
) -> list[list[tuple[str, str]]]:
    """`num_notes` tagged sentences from synthetic notes of `hospital` (0-based) for NER.

    Each item is one sentence (or SOAP section line) as (token, tag) pairs with IOB2 tags over
    `ENTITY_TYPES`: diseases (diagnoses and chronic conditions, "type 2 diabetes mellitus"),
    symptoms (also when negated: "denies fever"), and drugs (the name only: in
    "metformin 500 mg" only "metformin" is a DRUG). Sentences come from notes written in the
    hospital's style with its label mix; most carry at least one entity, a few carry none.
    The same arguments always give the same sentences.
    """
    _check_hospital(hospital, num_hospitals)
    if num_notes < 0:
        raise ConfigError(f"notes_per_hospital: {num_notes} notes requested; use 0 or more")
    weights = label_weights(hospital, seed, num_hospitals)
    rng = random.Random(_stable_seed("ner", hospital, num_notes, seed, num_hospitals))
    style = hospital_style(hospital)
    sentences: list[list[tuple[str, str]]] = []
    while len(sentences) < num_notes:
        label = rng.choices(DIAGNOSES, weights)[0]
        for sentence in _tagged_sentences(_write_case(rng, style, _sample_case(rng, label))):
            has_entity = any(tag != "O" for _, tag in sentence)
            if len(sentences) < num_notes and (has_entity or rng.random() < 0.15):
                sentences.append(sentence)
    logger.debug("generated %d synthetic NER sentences for hospital %d", len(sentences), hospital)
    return sentences
