"""Attacks on a hospital's lifetime privacy budget (issue 14, item 4), as the attacker acts.

A dishonest coordinator (or a careless operator running two jobs on one data set) tries to get
more DP releases out of a data set than its site policy allows: by making the data set look new,
by racing two requests through the budget check, by replaying or inventing round numbers, by
smuggling a path through the run id, or by getting a hospital to spend epsilon on a round it
must then refuse. Each test drives the real ClientApp handler (or, for the race, two real
processes on the ledger) and checks that nothing is spent that should not be.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from pathlib import Path

import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from site_fixtures import LABELS, run_config, write_notes, write_policy, write_secagg_policy
from typer.testing import CliRunner

from fedward.client import app as app_module
from fedward.client.app import handle_train, load_site_data, open_site
from fedward.client.cli import client_app
from fedward.client.deploy import supernode
from fedward.client.privacy.accounting import DPPlan, compose_epsilon
from fedward.client.privacy.ledger import PrivacyLedger, dataset_fingerprint
from fedward.common.config import RunConfig
from fedward.common.errors import ConfigError, PolicyError, PrivacyBudgetExceeded
from fedward.common.model import build_model, get_adapter_arrays
from fedward.common.protocol import wire

DELTA = 1e-5
HOSPITAL = "st-mary"


#: Every test runs as inside a Flower app: messages are stamped with the task's identity.
pytestmark = pytest.mark.usefixtures("inside_a_flower_app")


@pytest.fixture
def hospital(tmp_path, tiny_model_dir):
    """A hospital's files under tmp_path/site (40 notes, policy, ledger folder), its node config
    as `fedward client start` writes it, and a one-round run spending epsilon 5 of its 6."""
    site = tmp_path / "site"
    site.mkdir()
    data = site / "notes.csv"
    write_notes(data)
    write_policy(site / "policy.toml")
    settings = supernode.HospitalSettings(
        server="127.0.0.1:9092",
        data=data,
        policy=site / "policy.toml",
        ledger=site / "ledger",
        name=HOSPITAL,
        dataset_id=HOSPITAL,
        device="cpu",
        insecure=True,
    )
    supernode.check_settings(settings)
    node_config = supernode.node_config(settings)
    config = run_config(tiny_model_dir, rounds=1)
    return config, node_config, site


def _train(config, node_config, arrays, run_id="run-a", server_round=1, secagg=None) -> Message:
    content = RecordDict(
        {
            wire.ARRAYS: wire.arrays_to_record(arrays),
            wire.CONFIG: wire.round_config(config.spec, server_round, run_id),
        }
    )
    if secagg is not None:
        content[wire.SECAGG] = secagg
    message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)
    context = Context(
        run_id=11, node_id=7, node_config=node_config, state=RecordDict(), run_config={}
    )
    return handle_train(message, context, load_site_data, open_site)


def _arrays(config: RunConfig) -> dict:
    return get_adapter_arrays(build_model(config.spec, len(LABELS)))


def _ledger(node_config) -> PrivacyLedger:
    return PrivacyLedger.open(node_config["ledger"], node_config["dataset-id"])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- reset: the data set is made to look new -----------------------------------------------------


def test_appending_a_record_does_not_reset_the_budget(hospital):
    config, node_config, _ = hospital
    reply = _train(config, node_config, _arrays(config), run_id="run-a")
    assert wire.REFUSAL not in reply.content
    assert (
        reply.content[wire.METRICS]["epsilon"] == config.spec.privacy.target_epsilon
    )  # the run's bound
    spent = _ledger(node_config).epsilon_spent(DELTA)
    assert 4.0 < spent <= 5.0 + 1e-3  # of the site's 6: no second run fits

    # The attacker gets one more note into the hospital's file (or the hospital adds one) and
    # asks again, hoping the changed bytes start a fresh budget.
    before = dataset_fingerprint(node_config["data-path"])
    with open(node_config["data-path"], "a", encoding="utf-8") as handle:
        handle.write("patient 99: productive cough with fever,respiratory\n")
    assert dataset_fingerprint(node_config["data-path"]) != before
    reply = _train(config, node_config, _arrays(config), run_id="run-b")

    refusal = reply.content[wire.REFUSAL]
    assert refusal["code"] == "budget.exceeded"
    assert wire.ARRAYS not in reply.content
    ledger = _ledger(node_config)
    assert ledger.epsilon_spent(DELTA) == pytest.approx(spent)
    assert ledger.rounds_recorded("run-b") == []
    assert [e.data_sha256 for e in ledger.entries] == [before]  # the hash, kept for the audit


def test_a_ledger_kept_under_the_old_hash_key_is_carried_over(hospital):
    config, node_config, _ = hospital
    # An older fedward kept this data set's ledger as <sha256 of the file>.json, nearly spent.
    sha = dataset_fingerprint(node_config["data-path"])
    old_path = Path(node_config["ledger"]) / f"{sha}.json"
    old_path.parent.mkdir(parents=True)
    step = (0.9, 0.2, 200)
    old_spent = compose_epsilon([step], DELTA)
    entry = {
        "run_id": "old-run",
        "round": 1,
        "noise_multiplier": step[0],
        "sample_rate": step[1],
        "steps": step[2],
        "delta": DELTA,
        "epsilon_round": old_spent,
        "epsilon_total": old_spent,
        "recorded_at": "2025-01-01T00:00:00+00:00",
    }
    version_1 = {"format": "fedward-privacy-ledger", "version": 1, "dataset": sha}
    old_path.write_text(json.dumps({**version_1, "entries": [entry]}), encoding="utf-8")

    reply = _train(config, node_config, _arrays(config), run_id="run-b")
    assert reply.content[wire.REFUSAL]["code"] == "budget.exceeded"
    ledger = _ledger(node_config)
    assert ledger.rounds_recorded("old-run") == [1]
    assert ledger.epsilon_spent(DELTA) == pytest.approx(old_spent)
    assert ledger.entries[0].data_sha256 == sha
    assert not old_path.exists()  # renamed, so it is neither listed nor carried over twice
    assert old_path.with_name(old_path.name + ".migrated").exists()


# --- race: two requests through the budget check at once ------------------------------------


def _reserve_in_another_process(folder, run_id, plan, barrier, results, slow_write) -> None:
    """One request, in its own process: wait for the other, then reserve a round."""
    from fedward.client.privacy import ledger as ledger_module

    if slow_write:  # a slow disk: the window between reading and writing the ledger is wide
        write = ledger_module.write_json_atomic

        def slow(path, document):
            import time

            time.sleep(0.5)
            write(path, document)

        ledger_module.write_json_atomic = slow
    ledger = ledger_module.PrivacyLedger.open(folder, "notes")
    barrier.wait()
    try:
        ledger.reserve(run_id, 1, 1, plan, DELTA, lifetime_epsilon=8.0)
        results.put((run_id, "passed"))
    except PrivacyBudgetExceeded:
        results.put((run_id, "refused"))


def test_two_processes_racing_the_budget_cannot_both_pass(tmp_path):
    plan = DPPlan(noise_multiplier=1.0, sample_rate=0.1, steps=100)  # epsilon ~7.9: one fits 8
    step = (plan.noise_multiplier, plan.sample_rate, plan.steps)
    alone = compose_epsilon([step], DELTA)
    together = compose_epsilon([step, step], DELTA)
    assert alone <= 8.0 < together

    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(2), spawn.Queue()
    workers = [
        spawn.Process(
            target=_reserve_in_another_process,
            args=(tmp_path, run_id, plan, barrier, results, True),
        )
        for run_id in ("run-a", "run-b")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    outcomes = sorted(results.get(timeout=5)[1] for _ in workers)

    assert outcomes == ["passed", "refused"]
    ledger = PrivacyLedger.open(tmp_path, "notes")
    assert len(ledger.entries) == 1
    assert ledger.epsilon_spent(DELTA) <= 8.0


def _reserve_then_die(folder, plan) -> None:
    from fedward.client.privacy.ledger import PrivacyLedger as Ledger

    Ledger.open(folder, "notes").reserve("run-a", 1, 3, plan, DELTA, lifetime_epsilon=8.0)
    os._exit(9)  # killed mid-training: neither confirmed nor released


def test_a_reservation_left_by_a_dead_process_counts_as_spent_and_is_shown(tmp_path):
    plan = DPPlan(noise_multiplier=1.0, sample_rate=0.1, steps=100)
    worker = multiprocessing.get_context("spawn").Process(
        target=_reserve_then_die, args=(tmp_path, plan)
    )
    worker.start()
    worker.join(timeout=120)
    assert worker.exitcode == 9

    ledger = PrivacyLedger.open(tmp_path, "notes")
    assert [e.status for e in ledger.reservations()] == ["reserved"]
    step = (plan.noise_multiplier, plan.sample_rate, plan.steps)
    assert ledger.epsilon_spent(DELTA) == pytest.approx(compose_epsilon([step], DELTA))
    with pytest.raises(PrivacyBudgetExceeded, match="1 reserved"):
        ledger.reserve("run-b", 1, 3, plan, DELTA, lifetime_epsilon=8.0)
    with pytest.raises(PolicyError, match="at most once"):  # the same round, asked again
        ledger.reserve("run-a", 1, 3, plan, DELTA, lifetime_epsilon=100.0)

    shown = CliRunner().invoke(client_app, ["ledger", "--ledger", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert "reserved" in shown.output and "1 reserved" in shown.output


def test_a_round_refused_after_the_budget_gate_keeps_its_reservation(hospital, monkeypatch):
    """Past the budget gate the hospital has read its data, and whether it refuses may depend on
    the records: the refusal is charged (issue 28), the reservation stays, counted as spent."""
    from fedward.client import app as app_module
    from fedward.common.errors import ModelError

    config, node_config, _ = hospital

    def broken(*args, **kwargs):
        raise ModelError("adapter tensors do not match the model")

    monkeypatch.setattr(app_module, "train_locally", broken)
    reply = _train(config, node_config, _arrays(config))
    assert reply.content[wire.REFUSAL]["code"] == "model.unusable"
    ledger = _ledger(node_config)
    assert [(e.run_id, e.round, e.status) for e in ledger.entries] == [("run-a", 1, "reserved")]
    assert ledger.epsilon_spent(DELTA) > 0
    refusal = json.loads(Path(node_config["audit-log"]).read_text().splitlines()[-1])["fields"]
    assert refusal["charged"] is True


# --- crafted rounds -----------------------------------------------------------------------------


@pytest.mark.parametrize("server_round", [0, -1, 2, 10_000])
def test_a_round_outside_the_run_is_refused_and_spends_nothing(hospital, server_round):
    config, node_config, _ = hospital  # the run has rounds = 1
    reply = _train(config, node_config, _arrays(config), server_round=server_round)
    refusal = reply.content[wire.REFUSAL]
    assert refusal["code"] == "round.out_of_range"
    assert _ledger(node_config).entries == []


def test_a_round_below_one_already_trained_is_refused(hospital):
    config, node_config, _ = hospital
    config = config.updated(**{"rounds": 3})
    write_policy(Path(node_config["policy"]), lifetime_epsilon=20.0)
    arrays = _arrays(config)
    assert wire.REFUSAL not in _train(config, node_config, arrays, server_round=2).content
    spent = _ledger(node_config).epsilon_spent(DELTA)

    reply = _train(config, node_config, arrays, server_round=1)  # the coordinator goes back
    refusal = reply.content[wire.REFUSAL]
    assert refusal["code"] == "round.backwards"
    ledger = _ledger(node_config)
    assert ledger.rounds_recorded("run-a") == [2]
    assert ledger.epsilon_spent(DELTA) == pytest.approx(spent)


# --- crafted run ids ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "run_id",
    ["x/../../..", "../escape", "a/b", "/etc/passwd", "run\x00id", "..", "r" * 300, ""],
)
def test_a_run_id_that_is_not_a_plain_name_touches_no_file(hospital, run_id):
    config, node_config, site = hospital
    before = _files(site.parent)
    reply = _train(config, node_config, _arrays(config), run_id=run_id)

    refusal = reply.content[wire.REFUSAL]
    assert refusal["code"] == "identifier.invalid"
    assert "\x00" not in str(dict(refusal)) and len(str(dict(refusal))) < 400
    after = _files(site.parent)
    audit_log = str(Path(node_config["audit-log"]).relative_to(site.parent))
    assert set(after) - {audit_log} == set(before)  # only the audit log's refusal record
    assert all(after[name] == before[name] for name in before)
    assert not Path(node_config["ledger"], f"{HOSPITAL}.json").exists()
    assert not Path(node_config["ledger"], "releases").exists()


# --- a refusal known before training comes before training --------------------------------------


def test_more_examples_than_secagg_max_weight_are_capped_not_refused(hospital):
    """Issue 28, 2(b): the refusal "more examples than secagg_max_weight" carried the limit and
    came before the budget gate, so sixteen requests found the exact training count for free.
    Now the weight is capped at the limit and the round trains as any other. (Since issue 40
    the weight is the one the policy declares, not the count; the cap holds for it too.)"""
    from fedward.server.secagg import SecAggServerSession

    config, node_config, _ = hospital
    write_secagg_policy(
        Path(node_config["policy"]), HOSPITAL, lifetime_epsilon=20.0, aggregation_weight=32
    )
    context = Context(
        run_id=11, node_id=7, node_config=node_config, state=RecordDict(), run_config={}
    )
    # a declared weight of 32; the run's secure aggregation can carry a weight of at most 20
    for run_id, max_weight in (("run-a", 20), ("run-b", 65_536)):
        config = config.updated(**{"secure_aggregation": True, "secagg_max_weight": max_weight})
        arrays = _arrays(config)
        size = sum(a.size for a in arrays.values())
        session = SecAggServerSession(run_id, 1, [7, 8], size, bits=16, max_weight=max_weight)
        content = RecordDict(
            {
                wire.ARRAYS: wire.arrays_to_record(arrays),
                wire.CONFIG: wire.round_config(config.spec, 1, run_id),
                wire.SECAGG: wire.payload_to_records(session.advertise_keys_requests()[7])[0],
            }
        )
        message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)
        reply = handle_train(message, context, load_site_data, open_site)
        assert wire.REFUSAL not in reply.content
        assert set(reply.content[wire.METRICS]) == {"epsilon"}
        weight = int(context.state[app_module.SECAGG_UPDATE]["weight"].numpy()[0])
        assert weight == min(32, max_weight)
    assert _ledger(node_config).rounds_recorded("run-a") == [1]


def test_a_deployed_site_without_a_data_set_id_refuses_everything(hospital):
    """Issue 28, 3(a): the id defaulted to the node key file's name; renaming the file (same key,
    same data) started a fresh lifetime budget. Now there is no default."""
    config, node_config, _ = hospital
    node_config = {key: value for key, value in node_config.items() if key != "dataset-id"}
    reply = _train(config, node_config, _arrays(config))
    assert reply.content[wire.REFUSAL]["code"] == "policy.not_configured"
    assert not Path(node_config["ledger"], f"{HOSPITAL}.json").exists()


def test_the_same_data_under_a_new_data_set_id_is_refused_until_the_operator_says(hospital):
    """An operator who restarts the hospital with another --dataset-id (or copies a node
    config) for the very same data file is refused before anything is spent."""
    config, node_config, _ = hospital  # a lifetime budget of 6, a run of 5
    assert wire.REFUSAL not in _train(config, node_config, _arrays(config)).content
    spent = _ledger(node_config).epsilon_spent(DELTA)

    renamed = {**node_config, "dataset-id": "st-mary-renamed"}
    reply = _train(config, renamed, _arrays(config), run_id="run-b")
    assert reply.content[wire.REFUSAL]["code"] == "dataset.recorded_elsewhere"
    assert PrivacyLedger.open(node_config["ledger"], "st-mary-renamed").entries == []
    assert _ledger(node_config).epsilon_spent(DELTA) == pytest.approx(spent)
    # under its own id the data set goes on, within its one lifetime budget
    reply = _train(config, node_config, _arrays(config), run_id="run-b")
    assert reply.content[wire.REFUSAL]["code"] == "budget.exceeded"  # 5 and 5 do not fit 6


def test_a_data_set_id_must_be_plain(hospital):
    _, node_config, site = hospital
    settings = supernode.HospitalSettings(
        server="127.0.0.1:9092",
        data=Path(node_config["data-path"]),
        policy=Path(node_config["policy"]),
        ledger=site / "ledger",
        name=HOSPITAL,
        dataset_id="../other",
        insecure=True,
    )
    with pytest.raises(ConfigError, match="--dataset-id '../other'"):
        supernode.check_settings(settings)
    renamed = dataclasses.replace(settings, dataset_id="icu-notes")
    assert supernode.node_config(renamed)["dataset-id"] == "icu-notes"
