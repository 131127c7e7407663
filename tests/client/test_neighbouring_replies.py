"""Neighbouring data, neighbouring replies: the strongest form of a hospital's guarantee (issue 28).

For any sequence of coordinator requests, what a hospital sends back must be the same for two
data sets that differ in one record -- a record added, removed or relabelled, a rare label
present or not -- except through a DP-charged, noised release (the update, evaluation metrics)
or the masked sum. This harness plays a catalogue of requests, valid and crafted the way a
dishonest coordinator would craft them (decoy and rare labels, a secagg_max_weight sweep, rounds,
models, schema keys, evaluation probes, replays), through the deployed ClientApp's real handlers
(real data file, policy, ledger, run state, audit log, tiny model, real DP-SGD), against a
base data set and each neighbour, and compares the replies byte for byte. Only these are
compared by shape instead: the update's tensors (DP-noised), evaluation metrics (DP-noised
counts) and secure-aggregation key material (fresh randomness, no data in it).

On 4b2ce70 it fails: the label-mismatch refusal answered "does any record carry this label?"
and the secagg_max_weight refusal answered "are there more than N training records?". On
976da57 (issue 40) it fails too: the weight a hospital keeps for its masked vector (compared here
with the replies: it enters the sum the coordinator unmasks) and a clear update's num-examples
were the training count, and near budget exhaustion "the run no longer fits" came from the
accountant, whose projection depends on the number of units.

Under patient-level DP (issue 29) the unit is the patient, so the neighbours differ in one
patient: a patient added (with several notes, one of a rare label), a patient removed (the one
with the most notes), a patient given many more notes. A hospital whose policy requires
`dp_unit = "patient"` plays its own catalogue (the valid run, the record-level run it refuses,
the evaluation it refuses, the label and weight probes, a batch of one patient, the record
bound, the patient column slipped into the run config).
"""

from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants.analysis import rdp as rdp_analysis
from site_fixtures import LABELS, WORDS, run_config, write_policy, write_secagg_policy

from fedward.client.app import (
    SECAGG_UPDATE,
    handle_evaluate,
    handle_train,
    load_site_data,
    open_site,
)
from fedward.client.privacy.accounting import compose_epsilon, plan_dp
from fedward.common.model import build_model, get_adapter_arrays
from fedward.common.protocol import wire
from fedward.server.secagg import SecAggServerSession

_COMPUTE_RDP = rdp_analysis.compute_rdp

HOSPITAL = "st-mary"
RARE = "hiv-positive"  # the label whose presence the coordinator wants to learn
DECOY = "zzz-decoy"  # a label no hospital holds


def _base_notes() -> list[tuple[str, str]]:
    """40 notes alternating the two common labels (32 train, 8 validation at val_fraction 0.2)."""
    return [(f"patient {i}: {WORDS[LABELS[i % 2]]}", LABELS[i % 2]) for i in range(40)]


def _relabelled(notes: list[tuple[str, str]], index: int, label: str) -> list[tuple[str, str]]:
    return [(text, label if i == index else old) for i, (text, old) in enumerate(notes)]


BASE = _base_notes()
NEIGHBOURS: dict[str, list[tuple[str, str]]] = {
    "a record added": [*BASE, ("patient 99: " + WORDS["cardiac"], "cardiac")],
    "a record removed": BASE[1:],
    "a record relabelled": _relabelled(BASE, 0, "respiratory"),
    "a rare label added": [*BASE, ("patient 99: chest pain, known HIV on therapy", RARE)],
    "a record relabelled to a rare label": _relabelled(BASE, 0, RARE),
}


@dataclass(frozen=True)
class Request:
    """One request of the coordinator: a train or evaluate message for (run, round)."""

    kind: str  # "train" or "evaluate"
    run_id: str
    round: int = 1
    spec: dict[str, Any] = field(default_factory=dict)  # run spec fields changed
    extra: dict[str, Any] = field(default_factory=dict)  # keys slipped into the config record
    crafted_arrays: bool = False  # an arbitrary global adapter instead of the initial one


def _train(run_id: str, round: int = 1, **options) -> Request:
    return Request("train", run_id, round, **options)


def _evaluate(run_id: str, round: int = 1, **options) -> Request:
    return Request("evaluate", run_id, round, **options)


#: What a coordinator asks, in order. Every run uses its own run id; the hospital's state (its
#: ledger, run state, kept releases) carries over from one request to the next.
CATALOGUE: list[Request] = [
    # a valid run, evaluated, a round replayed, a round replayed from another adapter
    _train("valid", 1),
    _train("valid", 2),
    _evaluate("valid", 2),
    _train("valid", 2),
    _train("valid", 2, crafted_arrays=True),
    # "does any record carry label X?": the rare label against a decoy, or a common one left out
    _train("labels-rare", spec={"labels": [*LABELS, RARE]}),
    _train("labels-decoy", spec={"labels": [*LABELS, DECOY]}),
    _train("labels-without-respiratory", spec={"labels": ["cardiac", RARE]}),
    _train("labels-only-decoys", spec={"labels": [RARE, DECOY]}),
    # "are there more than N training records?": a binary search on secagg_max_weight
    *(_train(f"weight-{weight}", spec={"secagg_max_weight": weight}) for weight in (31, 32, 33)),
    # the same run asked again with another spec (fewer rounds: "evaluate the final round")
    _train("rounds", 1),
    _evaluate("rounds", 1, spec={"rounds": 1}),
    _train("rounds", 1, spec={"rounds": 1}),
    # rounds outside the run, and backwards
    _train("crafted-rounds", 3),
    _train("crafted-rounds", 0),
    _train("backwards", 2),
    _train("backwards", 1),
    # the hospital's data schema slipped into the run config, and a vocabulary limit of zero
    _train(
        "columns",
        extra={"label-column": "text", "text-column": "label", "val-fraction": 0.9},
    ),
    _train("vocabulary", spec={"max_unknown_rate": 0.0}),
    # a batch of one: the DP plan then depends on the exact training count
    _train("batch-of-one", spec={"batch_size": 1, "rounds": 1}),
    # evaluation probes: untrained, outside the run, then evaluated twice
    _evaluate("probe", 1),
    _evaluate("probe", 5),
    _train("probe", 1),
    _evaluate("probe", 1),
    _evaluate("probe", 1),
    # a model the coordinator names: a hub id, and the packaged default the policy does not pin
    _train("hub-model", spec={"model": "coordinator-org/bert-with-a-tokenizer"}),
    _train("packaged-model", spec={"model": "all-MiniLM-L6-v2"}),
    # runs the site policy refuses outright
    _train("no-dp", spec={"dp": False}),
    _train("too-much-epsilon", spec={"target_epsilon": 80.0}),
    _train("too-many-rounds", spec={"rounds": 10_000}),
    _train("no-secagg", spec={"secure_aggregation": False}),
]


def _write_notes(path: Path, notes: list[tuple[str, ...]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("text", "label", "patient")[: len(notes[0])])
        writer.writerows(notes)


def _hospital(
    folder: Path, notes: list[tuple[str, ...]], secure: bool = True, patients: bool = False
) -> dict:
    """A hospital's files under `folder` and its node config, as `fedward client start` writes;
    with `patients`, the notes name their patient and the policy requires patient-level DP."""
    folder.mkdir(parents=True)
    _write_notes(folder / "notes.csv", notes)
    rules = {"lifetime_epsilon": 60.0, "max_rounds": 50, "allow_evaluation": True}
    if patients:
        rules["dp_unit"] = "patient"
    if secure:  # the deployed default: no run without secure aggregation
        write_secagg_policy(
            folder / "policy.toml", HOSPITAL, require_secure_aggregation=True, **rules
        )
    else:
        write_policy(folder / "policy.toml", **rules)
    return {
        "data-path": str(folder / "notes.csv"),
        "policy": str(folder / "policy.toml"),
        "ledger": str(folder / "ledger"),
        "audit-log": str(folder / "ledger" / "audit.jsonl"),
        "hospital-name": HOSPITAL,
        "dataset-id": "icu-notes",
        "device": "cpu",
        **({"patient-column": "patient"} if patients else {}),
    }


def _message(request: Request, base_config) -> Message:
    config = base_config.updated(**request.spec)
    # the tiny model's adapter, whatever model the request names
    arrays = _global_adapter(
        base_config.spec.model.name, len(config.spec.task.labels), request.crafted_arrays
    )
    record = wire.round_config(config.spec, request.round, request.run_id)
    for key, value in request.extra.items():
        record[key] = value
    content = RecordDict({wire.ARRAYS: wire.arrays_to_record(arrays), wire.CONFIG: record})
    if request.kind == "train" and config.spec.secagg.secure_aggregation:
        size = sum(a.size for a in arrays.values())
        session = SecAggServerSession(
            request.run_id,
            request.round,
            [7, 8],
            size,
            bits=16,
            max_weight=config.spec.secagg.secagg_max_weight,
        )
        advertise = session.advertise_keys_requests()[7]
        content[wire.SECAGG] = wire.payload_to_records(advertise)[0]
    kind = MessageType.TRAIN if request.kind == "train" else MessageType.EVALUATE
    return Message(content=content, message_type=kind, dst_node_id=7)


_ADAPTERS: dict[tuple[str, int, bool], dict[str, np.ndarray]] = {}


def _global_adapter(model_dir: str, num_labels: int, crafted: bool) -> dict[str, np.ndarray]:
    """The run's initial global adapter for `num_labels` outputs, or an arbitrary one."""
    key = (model_dir, num_labels, crafted)
    if key not in _ADAPTERS:
        config = run_config(model_dir, rounds=2)
        arrays = get_adapter_arrays(build_model(config.spec, num_labels))
        if crafted:
            rng = np.random.default_rng(1)
            arrays = {n: rng.normal(size=a.shape).astype(a.dtype) for n, a in arrays.items()}
        _ADAPTERS[key] = arrays
    return _ADAPTERS[key]


def _as_sent(request: Request, reply: Message, state: RecordDict | None = None) -> str:
    """The reply as the coordinator receives it, canonical; DP-noised values and fresh key
    material by shape only. With secure aggregation, also the weight the hospital keeps for its
    masked vector: it enters the sum the coordinator unmasks (issue 40)."""
    shown: dict[str, Any] = {}
    if state is not None and SECAGG_UPDATE in state:
        shown["masked weight"] = int(state[SECAGG_UPDATE]["weight"].numpy()[0])
    for key, record in sorted(reply.content.items()):
        if isinstance(record, ArrayRecord):  # the DP-noised update (or a masked vector)
            shown[key] = {name: list(array.shape) for name, array in record.items()}
        elif key == wire.SECAGG:  # public keys and signatures: fresh randomness
            shown[key] = {name: _shape(value) for name, value in record.items()}
        elif key == wire.METRICS and request.kind == "evaluate":  # DP-noised counts
            shown[key] = sorted(record)
        else:
            shown[key] = {name: _plain(value) for name, value in sorted(record.items())}
    return json.dumps(shown, sort_keys=True)


def _shape(value: Any) -> str:
    if isinstance(value, bytes | str | list):
        return f"{type(value).__name__}[{len(value)}]"
    return type(value).__name__


def _plain(value: Any) -> Any:
    return value.hex() if isinstance(value, bytes) else value


def _transcript(
    folder: Path,
    notes: list[tuple[str, str]],
    model_dir: str,
    secure: bool = True,
    catalogue: list[Request] | None = None,
    patients: bool = False,
) -> list[tuple[Request, str]]:
    """Play a catalogue against a fresh hospital holding `notes`; the replies, in order."""
    node_config = _hospital(folder, notes, secure, patients)
    config = run_config(model_dir, rounds=2).updated(
        **{"target_epsilon": 2.0, "local_epochs": 1, "secure_aggregation": secure}
    )
    if patients:
        config = config.updated(dp_unit="patient", batch_size=4)
    if catalogue is None:
        catalogue = CATALOGUE if secure else CLEAR_CATALOGUE
    transcript = []
    for request in catalogue:
        message = _message(request, config)
        context = Context(
            run_id=11, node_id=7, node_config=node_config, state=RecordDict(), run_config={}
        )
        handler = handle_train if request.kind == "train" else handle_evaluate
        reply = handler(message, context, load_site_data, open_site)
        transcript.append((request, _as_sent(request, reply, context.state)))
    return transcript


def _inside_a_flower_app(patch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the running task's identity, as its runtime does; and the
    accountant's RDP of one (sample rate, noise, steps) is computed once (the ledger composes
    every entry again for each total, which dominates this harness's time otherwise)."""
    patch.setattr(TaskIdentity, "_run_id", 11)
    patch.setattr(TaskIdentity, "_node_id", 0)
    patch.setattr(TaskIdentity, "_task_id", 1)
    patch.setattr(rdp_analysis, "compute_rdp", _remembered_rdp)


@functools.cache
def _rdp(q: float, noise_multiplier: float, steps: int, orders: tuple) -> np.ndarray:
    rdp = _COMPUTE_RDP(q=q, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    return np.asarray(rdp)


def _remembered_rdp(*, q, noise_multiplier, steps, orders):
    orders_key = tuple(orders) if np.ndim(orders) else orders
    rdp = _rdp(float(q), float(noise_multiplier), int(steps), orders_key)
    return rdp.copy() if np.ndim(rdp) else float(rdp)


@pytest.fixture(scope="module")
def transcripts(tmp_path_factory, tiny_model_dir):
    """The catalogue's replies from the base data set and from each neighbour, played once."""
    with pytest.MonkeyPatch.context() as patch:
        _inside_a_flower_app(patch)
        root = tmp_path_factory.mktemp("neighbours")
        played = {"base": _transcript(root / "base", BASE, tiny_model_dir)}
        for number, (name, notes) in enumerate(NEIGHBOURS.items()):
            played[name] = _transcript(root / f"neighbour-{number}", notes, tiny_model_dir)
    return played


def _differences(base, other) -> list[str]:
    """Every request whose reply tells the two data sets apart, with both replies."""
    return [
        f"{request}:\n  base:      {sent}\n  neighbour: {sent_other}"
        for (request, sent), (_, sent_other) in zip(base, other, strict=True)
        if sent != sent_other
    ]


@pytest.mark.parametrize("neighbour", list(NEIGHBOURS))
def test_a_neighbouring_data_set_gets_the_same_replies(transcripts, neighbour):
    differences = _differences(transcripts["base"], transcripts[neighbour])
    assert not differences, f"the replies tell {neighbour!r} from the base:\n" + "\n".join(
        differences
    )


def test_the_catalogue_reaches_every_gate(transcripts):
    """The harness is only as strong as its catalogue: the crafted requests must reach the
    refusals they aim at, and the valid ones must train and release."""
    codes = []
    for request, sent in transcripts["base"]:
        refusal = json.loads(sent).get(wire.REFUSAL)
        codes.append(refusal["code"] if refusal else f"{request.kind}:ok")
    assert codes.count("train:ok") >= 10 and codes.count("evaluate:ok") == 2
    for code in (
        "run.spec_changed",
        "round.out_of_range",
        "round.backwards",
        "evaluation.round_not_trained",
        "evaluation.round_out_of_range",
        "evaluation.repeated",
        "policy.rules",
    ):
        assert code in codes, code
    assert "data.labels_mismatch" not in codes and "secagg.weight_too_large" not in codes
    weights = [json.loads(sent).get("masked weight") for _, sent in transcripts["base"]]
    assert weights.count(1) >= 10  # what the masked sum carries was compared too


def test_the_replies_were_compared_with_each_hospital_fitting_its_own_model(
    transcripts, tmp_path_factory
):
    """The final-round evaluations of the catalogue ("valid" round 2, "rounds" round 1) ran
    with the own model on (issue 38): every data set, base and neighbours, kept one at home
    for the valid run, so the replies above were compared with personalisation on."""
    root = tmp_path_factory.getbasetemp()
    for folder in ["base", *(f"neighbour-{number}" for number in range(len(NEIGHBOURS)))]:
        found = list(root.glob(f"neighbours*/{folder}/ledger/own/icu-notes/valid/report.json"))
        assert found, folder


# --- without secure aggregation: the same replies too -------------------------------------------

#: A hospital whose policy allows runs without secure aggregation (not the default) sends each
#: clear update with its weight in the average: the one its policy declares, not its training
#: count (issue 40: two runs, one listing a rare label, told the count of that label).
CLEAR_CATALOGUE: list[Request] = [
    _train("valid", 1),
    _train("labels-rare", spec={"labels": [*LABELS, RARE]}),
    _train("labels-decoy", spec={"labels": [*LABELS, DECOY]}),
    _evaluate("valid", 1),
]


def test_without_secure_aggregation_the_replies_are_the_same(tmp_path, tiny_model_dir):
    with pytest.MonkeyPatch.context() as patch:
        _inside_a_flower_app(patch)
        base = _transcript(tmp_path / "base", BASE, tiny_model_dir, secure=False)
        added = _transcript(
            tmp_path / "added", NEIGHBOURS["a rare label added"], tiny_model_dir, secure=False
        )
    assert _differences(base, added) == []
    weights = [json.loads(sent)[wire.METRICS]["weight"] for _, sent in added[:3]]
    assert weights == [1, 1, 1]  # the policy's declared weight, whatever the count


# --- the budget gate near exhaustion ------------------------------------------------------------


def _play(node_config: dict, config, catalogue: list[Request]) -> list[tuple[Request, str]]:
    transcript = []
    for request in catalogue:
        context = Context(
            run_id=11, node_id=7, node_config=node_config, state=RecordDict(), run_config={}
        )
        handler = handle_train if request.kind == "train" else handle_evaluate
        reply = handler(_message(request, config), context, load_site_data, open_site)
        transcript.append((request, _as_sent(request, reply, context.state)))
    return transcript


def _trained_count(node_config: dict) -> int:
    lines = Path(node_config["audit-log"]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines][-1]["fields"]["num_examples"]


@pytest.mark.parametrize("neighbour", ["a record added", "a record removed"])
def test_a_run_that_no_longer_fits_is_refused_the_same_on_neighbouring_data(
    tmp_path, tiny_model_dir, neighbour
):
    """Issue 40, 1: once a data set had trained a run, "the run no longer fits the remaining
    budget" came from the accountant's projection, which depends on the number of units (the
    sample rate is 1 / ceil(n / batch size); a batch of one gives n itself). The coordinator
    knows the code: it computes the projection for each candidate count and asks the target
    epsilon that fits one count and not the next, for free, under fresh run ids. Here the
    target is fixed and the hospitals' lifetime budget placed between the two projections,
    the same crossing without the scan: on 976da57 one data set trained and the other was
    refused. Now a run is charged its target epsilon, whatever the data."""
    one_run = {"batch_size": 1, "rounds": 1}
    first = _train("first", spec={**one_run, "target_epsilon": 2.0})
    probe = _train("probe", spec={**one_run, "target_epsilon": 1.0})
    config = run_config(tiny_model_dir, rounds=2).updated(local_epochs=1, secure_aggregation=False)
    with pytest.MonkeyPatch.context() as patch:
        _inside_a_flower_app(patch)
        hospitals = {
            "base": _hospital(tmp_path / "base", BASE, secure=False),
            neighbour: _hospital(tmp_path / "neighbour", NEIGHBOURS[neighbour], secure=False),
        }
        played = {name: _play(node, config, [first]) for name, node in hospitals.items()}
        projected = {}
        for name, node in hospitals.items():  # the coordinator's arithmetic, on public code
            count = _trained_count(node)
            specs = [config.updated(**r.spec).spec for r in (first, probe)]
            plans = [plan_dp(s.privacy, s.training, s.federation.rounds, count) for s in specs]
            projected[name] = compose_epsilon([p.as_history_entry() for p in plans], 1e-5)
        assert projected["base"] != projected[neighbour]  # the attack has a gap to aim at
        between = (projected["base"] + projected[neighbour]) / 2
        for name, node in hospitals.items():
            write_policy(
                Path(node["policy"]), lifetime_epsilon=between, max_rounds=50, max_delta=1e-5
            )
            played[name] += _play(node, config, [probe])
    answers = {
        name: json.loads(transcript[1][1]).get(wire.REFUSAL, {"code": "trained"})["code"]
        for name, transcript in played.items()
    }
    assert answers == {"base": "budget.exceeded", neighbour: "budget.exceeded"}
    assert not _differences(played["base"], played[neighbour])


# --- patient-level DP: the neighbours differ in one patient ---------------------------------------


def _patient_notes() -> list[tuple[str, str, str]]:
    """The base notes, given to 14 patients of 1 to 5 notes each (the first has 5)."""
    sizes = [5, 1, 2, 3, 1, 4, 2, 1, 3, 5, 2, 1, 4, 6]
    owners = [f"p{n}" for n, size in enumerate(sizes) for _ in range(size)]
    return [(text, label, owner) for (text, label), owner in zip(BASE, owners, strict=True)]


PATIENT_BASE = _patient_notes()
PATIENT_NEIGHBOURS: dict[str, list[tuple[str, str, str]]] = {
    "a patient added": [
        *PATIENT_BASE,
        *((f"patient 99 note {n}: " + WORDS["cardiac"], "cardiac", "p99") for n in range(4)),
        ("patient 99: chest pain, known HIV on therapy", RARE, "p99"),
    ],
    "a patient removed": [note for note in PATIENT_BASE if note[2] != "p13"],
    "a patient given 30 more notes": [
        *PATIENT_BASE,
        *((f"patient 0 note {n}: " + WORDS["cardiac"], "cardiac", "p0") for n in range(30)),
    ],
}

PATIENT = {"dp_unit": "patient"}

PATIENT_CATALOGUE: list[Request] = [
    _train("valid", 1),
    _train("valid", 2),
    _evaluate("valid", 2),  # released counts are per record: refused
    _train("record-level", spec={"dp_unit": "record"}),  # weaker than the policy: refused
    _train("labels-rare", spec={"labels": [*LABELS, RARE]}),
    _train("labels-decoy", spec={"labels": [*LABELS, DECOY]}),
    *(_train(f"weight-{weight}", spec={"secagg_max_weight": weight}) for weight in (31, 32, 33)),
    _train("one-patient-a-batch", spec={"batch_size": 1, "rounds": 1}),
    _train("one-record-a-patient", spec={"max_records_per_patient": 1}),
    _train("two-hundred-records-a-patient", spec={"max_records_per_patient": 200}),
    _train("columns", extra={"patient-column": "label", "label-column": "patient"}),
]


@pytest.fixture(scope="module")
def patient_transcripts(tmp_path_factory, tiny_model_dir):
    """The patient catalogue's replies from the base data set and from each neighbour."""
    with pytest.MonkeyPatch.context() as patch:
        _inside_a_flower_app(patch)
        root = tmp_path_factory.mktemp("patient-neighbours")
        play = functools.partial(
            _transcript, model_dir=tiny_model_dir, catalogue=PATIENT_CATALOGUE, patients=True
        )
        played = {"base": play(root / "base", PATIENT_BASE)}
        for number, (name, notes) in enumerate(PATIENT_NEIGHBOURS.items()):
            played[name] = play(root / f"neighbour-{number}", notes)
    return played


@pytest.mark.parametrize("neighbour", list(PATIENT_NEIGHBOURS))
def test_a_data_set_one_patient_apart_gets_the_same_replies(patient_transcripts, neighbour):
    differences = _differences(patient_transcripts["base"], patient_transcripts[neighbour])
    assert not differences, f"the replies tell {neighbour!r} from the base:\n" + "\n".join(
        differences
    )


def test_the_patient_catalogue_reaches_its_gates(patient_transcripts):
    codes = []
    for request, sent in patient_transcripts["base"]:
        refusal = json.loads(sent).get(wire.REFUSAL)
        codes.append(refusal["code"] if refusal else f"{request.kind}:ok")
    assert codes.count("train:ok") >= 8
    assert codes[2] == "evaluation.patient_unit"
    assert codes[3] == "policy.rules"
    refusal = json.loads(patient_transcripts["base"][3][1])[wire.REFUSAL]
    assert "dp_unit" in refusal["params"]
