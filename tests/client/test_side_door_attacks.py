"""The last side doors (issue 40), attacked the way a dishonest coordinator would.

Each test plays the coordinator against the deployed ClientApp's real handlers (real data file,
policy, ledger, audit log, tiny model, real DP-SGD and SecAgg+ sessions) and tries to learn a
hospital's training count, or to weaken its protection, outside DP. On 976da57 each attack
succeeded: the masked weight was the exact training count (rotating cohorts solved for every
hospital's count), a clear update carried its count (two runs gave the count of one label), and
a record-level run on patient data locked the data set into record-level protection for life.

The free budget refusal (door 1) is in the neighbouring-data harness
(tests/client/test_neighbouring_replies.py), the starting-adapter pin (door 5) in
tests/client/test_warm_start_site.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from site_fixtures import (
    LABELS,
    WORDS,
    deployed_secure_round,
    hospital_node_config,
    run_config,
    write_policy,
)

from fedward.client import app as app_module
from fedward.client.app import handle_train, load_site_data, open_site
from fedward.client.privacy.ledger import PrivacyLedger
from fedward.client.secagg import write_signing_key
from fedward.common.model import build_model, get_adapter_arrays
from fedward.common.protocol import wire
from fedward.common.protocol.reasons import Reason
from fedward.server.secagg import SecAggServerSession

pytestmark = pytest.mark.usefixtures("inside_a_flower_app")

RARE = "hiv-positive"


def _write_notes(path: Path, count: int, rare: int = 0, patients: bool = False) -> None:
    """`count` notes alternating the two labels, the first `rare` of them relabelled RARE;
    with `patients`, four notes a patient."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        columns = 3 if patients else 2
        writer.writerow(("text", "label", "patient")[:columns])
        for i in range(count):
            label = RARE if i < rare else LABELS[i % 2]
            note = [f"patient {i}: {WORDS[LABELS[i % 2]]}", label, f"p{i // 4}"]
            writer.writerow(note[:columns])


def _context(node_config: dict, node_id: int = 7) -> Context:
    return Context(
        run_id=11, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={}
    )


def _arrays(config) -> dict[str, np.ndarray]:
    """The run's initial global adapter, as an honest coordinator sends it."""
    return get_adapter_arrays(build_model(config.spec, len(config.spec.task.labels)))


def _message(config, server_round, run_id, node_id=7, secagg=None) -> Message:
    arrays = _arrays(config)
    content = RecordDict(
        {
            wire.ARRAYS: wire.arrays_to_record(arrays),
            wire.CONFIG: wire.round_config(config.spec, server_round, run_id),
        }
    )
    if secagg is not None:
        content[wire.SECAGG] = wire.payload_to_records(secagg)[0]
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)


def _reason(reply: Message) -> Reason:
    assert wire.REFUSAL in reply.content, dict(reply.content)
    return Reason.from_record(reply.content[wire.REFUSAL])


def _trained_counts(node_config: dict) -> list[int]:
    """The training counts of the hospital's own audit log (they never leave it)."""
    lines = Path(node_config["audit-log"]).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return [r["fields"]["num_examples"] for r in records if r["kind"] == "train"]


# --- door 2: the masked weight was the exact training count ------------------------------------


NOTES = {1: 40, 2: 71, 3: 51, 4: 36}  # four hospitals of different sizes, by node id
COHORTS = [(1, 2, 3), (1, 2, 4), (1, 3, 4), (2, 3, 4)]  # each lawful: three, the sites' minimum


@pytest.fixture
def federation(tmp_path, tiny_model_dir):
    """Four deployed hospitals that accept each other's SecAgg+ keys, a minimum cohort of 3."""
    keys = {node: write_signing_key(tmp_path / f"key-{node}.pem") for node in NOTES}
    roster = "".join(f'hospital-{node} = "{key}"\n' for node, key in keys.items())
    hospitals = {}
    for node, count in NOTES.items():
        folder = tmp_path / f"hospital-{node}"
        folder.mkdir()
        _write_notes(folder / "notes.csv", count)
        write_policy(
            folder / "policy.toml",
            lifetime_epsilon=20.0,
            require_secure_aggregation=True,
            secagg_signing_key=str(tmp_path / f"key-{node}.pem"),
            min_secure_aggregation_hospitals=3,
        )
        with (folder / "policy.toml").open("a", encoding="utf-8") as policy:
            policy.write(f"[secagg_roster]\n{roster}")
        node_config = hospital_node_config(folder / "notes.csv", folder / "policy.toml", folder)
        hospitals[node] = {**node_config, "hospital-name": f"hospital-{node}"}
    config = run_config(tiny_model_dir, rounds=len(COHORTS)).updated(
        secure_aggregation=True, target_epsilon=2.0, local_epochs=1
    )
    return config, hospitals


def _secure_round(config, hospitals, server_round: int, cohort) -> int:
    """One SecAgg+ round over `cohort`, the server's side as the coordinator runs it; returns
    the total weight the coordinator unmasks with the sum."""
    members = {node: hospitals[node] for node in cohort}
    result = deployed_secure_round(
        config,
        members,
        "run-cohorts",
        server_round,
        bits=16,
        max_weight=config.spec.secagg.secagg_max_weight,
    )
    return result.total_weight


def test_rotating_cohorts_do_not_solve_for_the_hospitals_training_counts(federation):
    """The attack of issue 40, 2: four rounds, each a lawful cohort of three of the four
    hospitals; each round's unmasked total weight is one equation, four equations give each
    hospital's weight. On 976da57 the weights were the training counts. Now they are the
    weights the hospitals' policies declare (default 1): the same whatever their data."""
    config, hospitals = federation
    totals = [
        _secure_round(config, hospitals, number, cohort)
        for number, cohort in enumerate(COHORTS, start=1)
    ]
    incidence = np.array([[node in cohort for node in NOTES] for cohort in COHORTS], dtype=float)
    solved = np.linalg.solve(incidence, np.array(totals, dtype=float))
    counts = [_trained_counts(hospitals[node])[0] for node in NOTES]
    assert len(set(counts)) == len(NOTES)  # the attack had four different counts to find
    assert solved.round().astype(int).tolist() == [1, 1, 1, 1]  # the declared weights
    assert solved.round().astype(int).tolist() != counts


def test_a_declared_weight_is_what_the_masked_vector_carries(tmp_path, tiny_model_dir):
    """A hospital may declare another weight (a round figure of its size, decided once): the
    masked vector carries it, never the count."""
    from site_fixtures import write_secagg_policy

    data = tmp_path / "notes.csv"
    _write_notes(data, 40)
    node_config = hospital_node_config(data, tmp_path / "policy.toml", tmp_path)
    write_secagg_policy(
        tmp_path / "policy.toml",
        "st-mary",
        require_secure_aggregation=True,
        lifetime_epsilon=20.0,
        aggregation_weight=500,
    )
    config = run_config(tiny_model_dir, rounds=2).updated(secure_aggregation=True)
    size = sum(a.size for a in _arrays(config).values())
    session = SecAggServerSession("run-a", 1, [7, 8], size, bits=16, max_weight=65_536)
    context = _context(node_config)
    message = _message(config, 1, "run-a", secagg=session.advertise_keys_requests()[7])
    reply = handle_train(message, context, load_site_data, open_site)
    assert wire.REFUSAL not in reply.content
    assert int(context.state[app_module.SECAGG_UPDATE]["weight"].numpy()[0]) == 500
    assert _trained_counts(node_config) == [32]


# --- door 3: the clear count --------------------------------------------------------------------


def test_two_clear_runs_do_not_tell_the_count_of_a_label(tmp_path, tiny_model_dir):
    """The attack of issue 40, 3: where the policy allows updates without secure aggregation,
    a run listing a rare label and one listing a decoy sent num-examples 35 and 32 on 976da57:
    three records carry the rare label. Now both replies carry the same declared weight."""
    data = tmp_path / "notes.csv"
    _write_notes(data, 44, rare=4)
    node_config = hospital_node_config(data, tmp_path / "policy.toml", tmp_path)
    write_policy(tmp_path / "policy.toml", lifetime_epsilon=20.0)  # secure aggregation optional
    config = run_config(tiny_model_dir, rounds=1)
    replies = []
    for run_id, extra in (("with-rare", RARE), ("with-decoy", "zzz-decoy")):
        run = config.updated(labels=[*LABELS, extra])
        replies.append(handle_train(_message(run, 1, run_id), _context(node_config), *_loaders()))
    sent = [dict(reply.content[wire.METRICS]) for reply in replies]
    assert sent[0] == sent[1] == {"weight": 1, "epsilon": 5.0}
    counts = _trained_counts(node_config)
    assert counts[0] > counts[1]  # the hospital did train on its rare records: only it knows


def _loaders():
    return load_site_data, open_site


# --- door 4: the downgrade to record-level DP on patient data -------------------------------------


def test_patient_data_under_a_default_policy_is_never_downgraded_to_records(
    tmp_path, tiny_model_dir
):
    """The attack of issue 40, 4: under the default policy a hospital whose data name a
    patient column trained a record-level run; its ledger then refused every patient-level run
    (`ledger.unit_mixed`), so one coordinator run locked its patients into record-level
    protection, where a patient with k notes has k times the epsilon. Now the record-level run
    is refused before any record is read, and the patient-level run trains."""
    data = tmp_path / "notes.csv"
    _write_notes(data, 40, patients=True)
    node_config = {
        **hospital_node_config(data, tmp_path / "policy.toml", tmp_path),
        "patient-column": "patient",
    }
    write_policy(tmp_path / "policy.toml", lifetime_epsilon=20.0)  # no dp_unit: the default
    config = run_config(tiny_model_dir, rounds=1)
    elsewhere = {**node_config, "data-path": str(tmp_path / "not-read.csv")}
    record_level = config.updated(dp_unit="record")
    reply = handle_train(_message(record_level, 1, "run-a"), _context(elsewhere), *_loaders())
    reason = _reason(reply)
    assert reason.code == "policy.rules" and reason.params["rules"] == "dp_unit"
    patient_level = config.updated(dp_unit="patient", batch_size=4)
    reply = handle_train(_message(patient_level, 1, "run-b"), _context(node_config), *_loaders())
    assert wire.REFUSAL not in reply.content, _reason(reply)
    assert [e.unit for e in PrivacyLedger.open(node_config["ledger"], "st-mary").entries] == [
        "patient"
    ]


def test_a_policy_that_says_record_still_trains_patient_data_per_record(tmp_path, tiny_model_dir):
    data = tmp_path / "notes.csv"
    _write_notes(data, 40, patients=True)
    node_config = {
        **hospital_node_config(data, tmp_path / "policy.toml", tmp_path),
        "patient-column": "patient",
    }
    write_policy(tmp_path / "policy.toml", lifetime_epsilon=20.0, dp_unit="record")
    config = run_config(tiny_model_dir, rounds=1).updated(dp_unit="record")
    reply = handle_train(_message(config, 1, "run-a"), _context(node_config), *_loaders())
    assert wire.REFUSAL not in reply.content
