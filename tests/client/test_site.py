"""A real hospital's gates around training (client/site/ through client.app.handle_train).

Each test drives the deployed ClientApp's handler with real Flower messages, a real tiny model,
a real data file, policy file, ledger folder and audit log, as the SuperNode would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from site_fixtures import LABELS, hospital_node_config, run_config, write_notes, write_policy

from fedward.client.app import handle_evaluate, handle_train, load_site_data, open_site
from fedward.client.privacy.accounting import compose_epsilon
from fedward.client.privacy.ledger import PrivacyLedger
from fedward.client.trainer import plan_dp
from fedward.common.config import RunConfig
from fedward.common.files import audit_log
from fedward.common.model import build_model, get_adapter_arrays
from fedward.common.protocol import wire
from fedward.common.protocol.reasons import Reason

#: Every test runs as inside a Flower app: messages are stamped with the task's identity.
pytestmark = pytest.mark.usefixtures("inside_a_flower_app")


@pytest.fixture
def hospital(tmp_path, tiny_model_dir):
    """A hospital's files: 40 notes, a policy, an (empty) ledger folder; and its node config."""
    data = tmp_path / "notes.csv"
    write_notes(data)
    policy = tmp_path / "policy.toml"
    write_policy(policy)
    node_config = hospital_node_config(data, policy, tmp_path)
    config = run_config(tiny_model_dir, rounds=2)
    return config, node_config, tmp_path


def _context(node_config: dict) -> Context:
    return Context(run_id=11, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _train_message(
    config: RunConfig, arrays: dict, run_id: str = "run-a", server_round: int = 1
) -> Message:
    content = RecordDict(
        {
            wire.ARRAYS: wire.arrays_to_record(arrays),
            wire.CONFIG: wire.round_config(config.spec, server_round, run_id),
        }
    )
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)


def _initial_arrays(config: RunConfig) -> dict:
    return get_adapter_arrays(build_model(config.spec, len(LABELS)))


def _train(config, node_config, arrays, run_id="run-a", server_round=1) -> Message:
    message = _train_message(config, arrays, run_id, server_round)
    return handle_train(message, _context(node_config), load_site_data, open_site)


def _ledger(node_config) -> PrivacyLedger:
    return PrivacyLedger.open(node_config["ledger"], node_config["hospital-name"])


def _audit_kinds(node_config) -> list[str]:
    lines = Path(node_config["audit-log"]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["kind"] for line in lines]


def _reason(reply: Message) -> Reason:
    """The refusal as it travels: a code and numbers (the coordinator renders it)."""
    refusal = dict(reply.content[wire.REFUSAL])
    assert set(refusal) == {"code", "params"}
    return Reason.from_record(refusal)


def _audited_refusal(node_config) -> dict:
    lines = Path(node_config["audit-log"]).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return [record["fields"] for record in records if record["kind"] == "refusal"][-1]


def test_policy_refusal_comes_back_as_a_reason_before_any_data_is_read(hospital):
    config, node_config, tmp_path = hospital
    write_policy(tmp_path / "policy.toml", allowed_tasks=["ner"])
    node_config = {**node_config, "data-path": str(tmp_path / "does-not-exist.csv")}
    reply = _train(config, node_config, _initial_arrays(config))
    reason = _reason(reply)
    assert reason.code == "policy.rules" and reason.params["rules"] == "allowed_tasks"
    # the data file does not exist: had it been touched, the refusal would be a DataError
    assert wire.ARRAYS not in reply.content
    assert _audit_kinds(node_config) == ["refusal"]
    assert audit_log.verify(node_config["audit-log"]).ok


def test_policy_also_gates_evaluation(hospital):
    config, node_config, tmp_path = hospital
    write_policy(tmp_path / "policy.toml", max_rounds=1)
    message = _train_message(config, _initial_arrays(config))
    message.metadata.message_type = MessageType.EVALUATE
    reply = handle_evaluate(message, _context(node_config), load_site_data, open_site)
    assert _reason(reply).params == {"rules": "max_rounds", "max_rounds": 1}


def test_a_trained_round_is_in_the_ledger_and_audit_log_before_the_update_leaves(hospital):
    config, node_config, _ = hospital
    reply = _train(config, node_config, _initial_arrays(config))
    assert wire.REFUSAL not in reply.content
    ledger = _ledger(node_config)
    assert ledger.rounds_recorded("run-a") == [1]
    # the coordinator is told the run's epsilon, a bound; the exact figure stays in the ledger
    # (it depends on ceil(training count / batch size))
    assert reply.content[wire.METRICS]["epsilon"] == config.spec.privacy.target_epsilon
    assert 0 < ledger.epsilon_spent(config.spec.privacy.delta) <= config.spec.privacy.target_epsilon
    record = json.loads(Path(node_config["audit-log"]).read_text(encoding="utf-8").splitlines()[-1])
    assert record["kind"] == "train" and record["fields"]["round"] == 1
    assert "notes" not in json.dumps(record)  # no path, no record content in the log


def test_repeating_a_released_round_resends_the_same_update_and_spends_nothing(hospital):
    config, node_config, _ = hospital
    arrays = _initial_arrays(config)
    first = _train(config, node_config, arrays)
    again = _train(config, node_config, arrays)  # a resumed run repeats round 1
    sent_first = wire.record_to_arrays(first.content[wire.ARRAYS])
    sent_again = wire.record_to_arrays(again.content[wire.ARRAYS])
    for name in sent_first:
        np.testing.assert_array_equal(sent_first[name], sent_again[name])
    assert _ledger(node_config).rounds_recorded("run-a") == [1]
    assert _audit_kinds(node_config) == ["train", "replay"]


def test_repeating_a_released_round_from_another_global_adapter_is_refused(hospital):
    config, node_config, _ = hospital
    arrays = _initial_arrays(config)
    _train(config, node_config, arrays)
    other = {name: value + 0.01 for name, value in arrays.items()}
    reply = _train(config, node_config, other)
    assert _reason(reply).code == "budget.exceeded"
    assert "already trained" in _audited_refusal(node_config)["reason"]
    assert _ledger(node_config).rounds_recorded("run-a") == [1]


def test_the_ledger_refuses_a_new_run_that_would_pass_the_lifetime_budget(hospital):
    config, node_config, tmp_path = hospital
    write_policy(tmp_path / "policy.toml", lifetime_epsilon=5.5)
    # an earlier run on the same data set spent its whole epsilon of 5 (2 rounds of 32 examples)
    plan = plan_dp(config.spec.privacy, config.spec.training, config.spec.federation.rounds, 32)
    ledger = _ledger(node_config)
    for server_round in (1, 2):
        ledger.record(
            "earlier-run",
            server_round,
            plan.noise_multiplier,
            plan.sample_rate,
            plan.steps,
            config.spec.privacy.delta,
        )
    assert ledger.epsilon_spent(1e-5) < 5.5  # the earlier run fitted the lifetime budget
    reply = _train(config, node_config, _initial_arrays(config), run_id="run-b")
    assert _reason(reply).code == "budget.exceeded"
    audited = _audited_refusal(node_config)["reason"]  # the details stay with the hospital
    assert "site limit 5.5" in audited and "no step was taken" in audited
    assert _ledger(node_config).rounds_recorded("run-b") == []


def test_the_run_budget_counts_only_this_runs_rounds(hospital):
    config, node_config, tmp_path = hospital
    write_policy(tmp_path / "policy.toml", lifetime_epsilon=30.0)
    # run-a used its whole run epsilon of 5 on this data set
    plan = plan_dp(config.spec.privacy, config.spec.training, config.spec.federation.rounds, 32)
    ledger = _ledger(node_config)
    for server_round in (1, 2):
        ledger.record(
            "run-a",
            server_round,
            plan.noise_multiplier,
            plan.sample_rate,
            plan.steps,
            config.spec.privacy.delta,
        )
    # run-b may spend its own epsilon of 5 again: the lifetime budget of 30 allows it
    reply = _train(config, node_config, _initial_arrays(config), run_id="run-b")
    assert wire.REFUSAL not in reply.content
    assert reply.content[wire.METRICS]["epsilon"] == config.spec.privacy.target_epsilon
    run_b = [(e.noise_multiplier, e.sample_rate, e.steps) for e in _ledger(node_config).entries]
    assert (
        compose_epsilon(run_b[2:], 1e-5) < config.spec.privacy.target_epsilon
    )  # run-b's round 1 of 2
    assert _ledger(node_config).epsilon_spent(1e-5) > config.spec.privacy.target_epsilon


def test_too_few_examples_are_refused(hospital):
    config, node_config, tmp_path = hospital
    write_policy(tmp_path / "policy.toml", min_examples=500)
    reply = _train(config, node_config, _initial_arrays(config))
    assert _reason(reply) == Reason("policy.too_few_examples", {"min_examples": 500})
    assert _ledger(node_config).rounds_recorded("run-a") == []


def test_a_node_without_site_configuration_refuses_instead_of_crashing(hospital):
    config, node_config, _ = hospital
    reply = _train(config, {"data-path": node_config["data-path"]}, _initial_arrays(config))
    assert _reason(reply).code == "policy.not_configured"
    assert "fedward client start" in _reason(reply).render()


def test_a_broken_policy_file_is_refused_without_revealing_its_path(hospital):
    config, node_config, tmp_path = hospital
    (tmp_path / "policy.toml").write_text("lifetime_epsilon = 'lots'\n", encoding="utf-8")
    reply = _train(config, node_config, _initial_arrays(config))
    reason = _reason(reply)
    assert reason.code == "policy.file_invalid" and str(tmp_path) not in reason.render()


# --- patient-level DP (issue 29) and one DP plan per round (issue 34) -------------------------


def _write_patient_notes(path: Path) -> None:
    """40 notes of 10 patients, 4 notes each, alternating the two labels."""
    lines = ["text,label,patient"]
    lines += [f"note {i} {LABELS[i % 2]},{LABELS[i % 2]},p{i // 4}" for i in range(40)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _audited(node_config, kind: str) -> dict:
    lines = Path(node_config["audit-log"]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["fields"] for line in lines if json.loads(line)["kind"] == kind][-1]


def test_the_dp_plan_is_computed_once_a_round_and_is_the_one_reserved(hospital, monkeypatch):
    from fedward.client import trainer
    from fedward.client.privacy import accounting as privacy
    from fedward.client.site import gates as site

    config, node_config, _ = hospital
    planned = []
    original = privacy.plan_dp

    def counting(privacy, training, rounds, num_train):
        planned.append(num_train)
        return original(privacy, training, rounds, num_train)

    for module in (privacy, site, trainer):
        monkeypatch.setattr(module, "plan_dp", counting, raising=False)
    reply = _train(config, node_config, _initial_arrays(config))
    assert wire.REFUSAL not in reply.content
    assert planned == [32]  # once, on the 32 training notes
    entry = _ledger(node_config).entries[-1]
    spec = config.spec
    expected = original(spec.privacy, spec.training, spec.federation.rounds, 32)
    assert (entry.noise_multiplier, entry.sample_rate, entry.steps) == expected.as_history_entry()


def test_a_patient_level_round_samples_patients_and_the_ledger_says_so(hospital):
    config, node_config, tmp_path = hospital
    _write_patient_notes(tmp_path / "notes.csv")
    write_policy(tmp_path / "policy.toml", dp_unit="patient")
    node_config = {**node_config, "patient-column": "patient"}
    config = config.updated(dp_unit="patient", batch_size=4)
    reply = _train(config, node_config, _initial_arrays(config))
    assert wire.REFUSAL not in reply.content
    entry = _ledger(node_config).entries[-1]
    assert entry.unit == "patient"
    # validation keeps 2 of the 10 patients whole: the 32 training notes belong to the other
    # 8, so the sample rate is 1 / ceil(8 / 4)
    assert entry.sample_rate == pytest.approx(1 / 2)
    assert _audited(node_config, "train")["dp_unit"] == "patient"
    # the same data set now refuses a record-level run: units are never mixed in one budget
    write_policy(tmp_path / "policy.toml", dp_unit="record")
    reply = _train(config.updated(dp_unit="record"), node_config, _initial_arrays(config), "run-b")
    assert _reason(reply).code == "ledger.unit_mixed"
    assert len(_ledger(node_config).entries) == 1


def test_a_patient_level_run_without_a_patient_column_is_refused_before_the_data(hospital):
    config, node_config, tmp_path = hospital
    node_config = {**node_config, "data-path": str(tmp_path / "does-not-exist.csv")}
    reply = _train(config.updated(dp_unit="patient"), node_config, _initial_arrays(config))
    assert _reason(reply).code == "policy.no_patient_column"
    assert _audit_kinds(node_config) == ["refusal"]


def test_a_record_level_round_on_patient_data_states_the_epsilon_per_patient(hospital):
    config, node_config, tmp_path = hospital
    _write_patient_notes(tmp_path / "notes.csv")
    write_policy(tmp_path / "policy.toml", dp_unit="record")  # the hospital's own choice
    node_config = {**node_config, "patient-column": "patient"}
    reply = _train(config, node_config, _initial_arrays(config))
    assert wire.REFUSAL not in reply.content
    audited = _audited(node_config, "train")
    assert audited["dp_unit"] == "record"
    records = audited["largest_patient_records"]
    assert 2 <= records <= 4  # a patient's 4 notes, less those kept for validation
    assert audited["epsilon_per_patient"] == pytest.approx(records * audited["epsilon_lifetime"])
