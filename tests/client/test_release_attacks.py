"""Attacks of a dishonest coordinator on what a hospital releases (issue 14, items 1, 3, 5).

Each test acts as the coordinator would: it crafts run specs and evaluate requests, sends them to
the deployed ClientApp's handlers (real data file, policy, ledger, audit log, tiny model), then
stores the replies the way the coordinator does (strategy, history.json, audit.jsonl). Sentinel
strings planted in the hospital's notes, labels, column names and file path must never appear in
anything the coordinator receives or stores; the hospital's own audit log may hold them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from site_fixtures import (
    LABELS,
    WORDS,
    hospital_node_config,
    run_config,
    write_notes,
    write_policy,
    write_secagg_policy,
)

from fedward.client.app import handle_evaluate, handle_train, load_site_data, open_site
from fedward.client.privacy.ledger import PrivacyLedger
from fedward.client.site import EVALUATION_KEY
from fedward.common.files.audit_log import AuditLog
from fedward.common.model import adapter_spec, build_model, get_adapter_arrays
from fedward.common.protocol import wire
from fedward.common.protocol.reasons import Reason
from fedward.server.app import history_row, round_audit_fields, write_history
from fedward.server.secagg import SecAggServerSession
from fedward.server.strategy import FedwardStrategy

SENTINEL = "SENTINEL7Q"  # planted in notes, labels, column names and the file's path


#: Every test runs as inside a Flower app: messages are stamped with the task's identity.
pytestmark = pytest.mark.usefixtures("inside_a_flower_app")


@pytest.fixture
def hospital(tmp_path, tiny_model_dir):
    """40 notes, each carrying a sentinel, in a folder whose name carries one too."""
    folder = tmp_path / f"records-{SENTINEL}-path"
    folder.mkdir()
    data = folder / "notes.csv"
    _write_notes(data, ("text", "label", f"mrn_{SENTINEL}_col"))
    node_config = hospital_node_config(data, tmp_path / "policy.toml", tmp_path)
    write_policy(tmp_path / "policy.toml")
    config = run_config(tiny_model_dir, rounds=2)
    return config, node_config, tmp_path


def _write_notes(path: Path, columns: tuple[str, ...], relabel: str = "") -> None:
    write_notes(path, columns, marker=f"{SENTINEL}-", relabel=relabel)


def _context(node_config: dict) -> Context:
    return Context(run_id=11, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _message(config, arrays, kind=MessageType.TRAIN, server_round=1, run_id="run-a", extra=None):
    record = wire.round_config(config.spec, server_round, run_id)
    for key, value in (extra or {}).items():
        record[key] = value
    content = RecordDict({wire.ARRAYS: wire.arrays_to_record(arrays), wire.CONFIG: record})
    return Message(content=content, message_type=kind, dst_node_id=7)


def _arrays(config) -> dict:
    return get_adapter_arrays(build_model(config.spec, len(LABELS)))


def _train(config, node_config, arrays, **options) -> Message:
    message = _message(config, arrays, MessageType.TRAIN, **options)
    return handle_train(message, _context(node_config), load_site_data, open_site)


def _evaluate(config, node_config, arrays, **options) -> Message:
    message = _message(config, arrays, MessageType.EVALUATE, **options)
    return handle_evaluate(message, _context(node_config), load_site_data, open_site)


def _received(reply: Message) -> str:
    """Everything in a reply except the update's tensor values, as text."""
    parts = []
    for key, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            parts.append(f"{key}: {list(record)}")
        else:
            parts.append(f"{key}: {dict(record)!r}")
    return "\n".join(parts)


def _reason(reply: Message) -> Reason:
    assert wire.REFUSAL in reply.content, _received(reply)
    return Reason.from_record(reply.content[wire.REFUSAL])


def _store_as_the_coordinator(config, train_replies, evaluate_replies, out: Path) -> str:
    """What the coordinator keeps from a round's replies: history.json and audit.jsonl."""
    spec = adapter_spec(build_model(config.spec, len(LABELS)))
    strategy = FedwardStrategy(config, spec, "run-a")
    outcome = strategy.aggregate_train(1, _arrays(config), train_replies, len(train_replies))
    evaluation = strategy.aggregate_evaluate(1, evaluate_replies)
    row = history_row(
        1, outcome, evaluation, config.spec.privacy, config.spec.secagg.secure_aggregation, 1.0
    )
    write_history(out, config.flat(), "run-a", [row])
    AuditLog(out / "audit.jsonl").append("round", **round_audit_fields(row, "run-a", "c", "a"))
    return (out / "history.json").read_text() + (out / "audit.jsonl").read_text()


def _hospital_audit(node_config) -> str:
    return Path(node_config["audit-log"]).read_text(encoding="utf-8")


# --- item 1: reasons carry no data ---------------------------------------------------------------


def test_label_column_set_to_the_notes_sends_back_a_code_not_notes(hospital):
    """The old attack: with the notes as labels, the reason listed five notes a request. Now no
    note has a label the run lists, none is used, and what comes back is the policy's minimum."""
    config, node_config, tmp_path = hospital
    node_config = {**node_config, "label-column": "text"}  # misconfigured: notes as labels
    arrays = _arrays(config)
    train = _train(config, node_config, arrays)
    evaluate = _evaluate(config, node_config, arrays)

    assert _reason(train) == Reason("policy.too_few_examples", {"min_examples": 10})
    stored = _store_as_the_coordinator(config, [train], [evaluate], tmp_path / "coordinator")
    for text in (_received(train), _received(evaluate), stored):
        assert SENTINEL not in text
        assert not any(words in text for words in WORDS.values())  # no note, nor its body
    assert "fewer local training examples" in stored  # the coordinator's own rendering


def test_an_unknown_column_reveals_no_column_name_and_no_path(hospital):
    config, node_config, tmp_path = hospital
    node_config = {**node_config, "text-column": "note_body"}  # not a column of the file
    arrays = _arrays(config)
    train = _train(config, node_config, arrays)
    assert _reason(train).code == "data.unreadable"
    stored = _store_as_the_coordinator(config, [train], [], tmp_path / "coordinator")
    for text in (_received(train), stored):
        assert SENTINEL not in text and str(tmp_path) not in text and "note_body" not in text
    assert f"mrn_{SENTINEL}_col" in _hospital_audit(node_config)


def test_records_with_labels_outside_the_run_are_left_out_not_refused(hospital):
    """Issue 28, 2(a): the refusal told whether any record carried a label the run did not list
    (asking [cardiac, HIV-positive] against [cardiac, zzz-decoy]), as often as asked, for free.
    Now such records are left out of training, and the reply is an update either way."""
    config, node_config, _ = hospital
    _write_notes(
        Path(node_config["data-path"]), ("text", "label", "mrn"), relabel=f"hiv-{SENTINEL}"
    )
    reply = _train(config, node_config, _arrays(config))
    assert wire.REFUSAL not in reply.content, _received(reply)
    trained = [json.loads(line) for line in _hospital_audit(node_config).splitlines()]
    assert 0 < trained[-1]["fields"]["num_examples"] < 32  # the relabelled left out (its log)
    assert "num-examples" not in reply.content[wire.METRICS]  # the count stays home (issue 40)
    assert SENTINEL not in _received(reply)


def test_the_coordinator_cannot_choose_the_hospitals_columns(hospital):
    """Data schema keys slipped into the run spec are ignored: the schema is the hospital's."""
    config, node_config, _ = hospital
    crafted = {"label-column": "text", "text-column": f"mrn_{SENTINEL}_col", "val-fraction": 0.9}
    reply = _train(config, node_config, _arrays(config), extra=crafted)
    assert wire.REFUSAL not in reply.content, _received(reply)
    assert wire.ARRAYS in reply.content


def test_an_unexpected_error_leaves_as_a_generic_code(hospital):
    config, node_config, _ = hospital

    def broken_loader(run_config, context):
        raise KeyError(f"patient {SENTINEL} record 12")  # a bug whose text holds a record

    message = _message(config, _arrays(config))
    reply = handle_train(message, _context(node_config), broken_loader, open_site)
    assert _reason(reply).code == "error.internal"
    assert SENTINEL not in _received(reply)


# --- item 3: evaluation is an accounted release --------------------------------------------------


def _ledger(node_config) -> PrivacyLedger:
    return PrivacyLedger.open(node_config["ledger"], node_config["hospital-name"])


def test_evaluation_is_refused_by_default(hospital):
    config, node_config, _ = hospital
    arrays = _arrays(config)
    assert wire.REFUSAL not in _train(config, node_config, arrays).content
    reply = _evaluate(config, node_config, arrays)
    assert _reason(reply).code == "evaluation.not_allowed"
    assert wire.METRICS not in reply.content


def test_evaluate_requests_are_refused_or_charged_as_the_policy_says(hospital):
    config, node_config, tmp_path = hospital
    write_policy(tmp_path / "policy.toml", allow_evaluation=True, evaluation_epsilon=0.5)
    arrays = _arrays(config)
    # a round this hospital did not train, and rounds that do not exist
    assert _reason(_evaluate(config, node_config, arrays)).code == "evaluation.round_not_trained"
    reply = _evaluate(config, node_config, arrays, server_round=3)
    assert _reason(reply).code == "evaluation.round_out_of_range"
    # round 0 is an evaluate-only run's, which this policy does not answer (issue 41)
    reply = _evaluate(config, node_config, arrays, server_round=0)
    assert _reason(reply).code == "evaluation.start_not_allowed"
    assert _ledger(node_config).rounds_recorded("run-a" + EVALUATION_KEY) == []

    assert wire.REFUSAL not in _train(config, node_config, arrays).content
    spent_before = _ledger(node_config).epsilon_spent(1e-5)
    reply = _evaluate(config, node_config, arrays)
    released = dict(reply.content[wire.METRICS])
    # no loss (unbounded); the noised counts per label the scores come from, for pooling
    counts = {
        f"{kind}:{k}" for kind in ("tp", "fp", "fn") for k in range(len(config.spec.task.labels))
    }
    assert set(released) == {"num-examples", "accuracy", "macro_f1"} | counts
    assert _ledger(node_config).rounds_recorded("run-a" + EVALUATION_KEY) == [1]
    assert _ledger(node_config).epsilon_spent(1e-5) > spent_before  # charged
    record = [
        json.loads(line)["fields"]
        for line in _hospital_audit(node_config).splitlines()
        if json.loads(line)["kind"] == "evaluation"
    ][-1]
    assert record["exact"]["num-examples"] == 8  # the validation split, exactly
    assert released["num-examples"] != 8  # what left was noised

    # twice a round, with an arbitrary adapter: refused, nothing more charged
    crafted = {name: np.random.default_rng(1).normal(size=a.shape) for name, a in arrays.items()}
    spent = _ledger(node_config).epsilon_spent(1e-5)
    reply = _evaluate(config, node_config, crafted)
    assert _reason(reply) == Reason("evaluation.repeated", {"round": 1})
    assert _ledger(node_config).epsilon_spent(1e-5) == spent


def test_evaluation_after_the_budget_is_spent_is_refused(hospital):
    config, node_config, tmp_path = hospital
    arrays = _arrays(config)
    assert wire.REFUSAL not in _train(config, node_config, arrays).content
    assert _ledger(node_config).epsilon_spent(1e-5) < config.spec.privacy.target_epsilon
    # the run still fits the policy, but a release of epsilon 10 does not fit what is left
    write_policy(
        tmp_path / "policy.toml",
        allow_evaluation=True,
        evaluation_epsilon=10.0,
        lifetime_epsilon=config.spec.privacy.target_epsilon,
    )
    reply = _evaluate(config, node_config, arrays)
    assert _reason(reply).code == "evaluation.budget"
    assert wire.METRICS not in reply.content
    assert _ledger(node_config).rounds_recorded("run-a" + EVALUATION_KEY) == []


def test_a_final_only_policy_refuses_earlier_rounds(hospital):
    config, node_config, tmp_path = hospital
    write_policy(tmp_path / "policy.toml", allow_evaluation=True, evaluate_rounds="final")
    arrays = _arrays(config)
    assert wire.REFUSAL not in _train(config, node_config, arrays).content
    reply = _evaluate(config, node_config, arrays)
    assert _reason(reply) == Reason("evaluation.not_final", {"rounds": 2})


# --- item 5: only what the README lists goes out in the clear -----------------------------------


def test_with_secure_aggregation_no_example_count_or_loss_leaves_in_the_clear(hospital):
    config, node_config, tmp_path = hospital
    write_secagg_policy(tmp_path / "policy.toml", "st-mary")
    config = config.updated(**{"secure_aggregation": True})
    arrays = _arrays(config)
    vector_length = sum(a.size for a in arrays.values())
    session = SecAggServerSession("run-a", 1, [7, 8], vector_length, bits=16, max_weight=65_536)
    message = _message(config, arrays)
    message.content[wire.SECAGG] = wire.payload_to_records(session.advertise_keys_requests()[7])[0]
    reply = handle_train(message, _context(node_config), load_site_data, open_site)
    assert wire.REFUSAL not in reply.content, _received(reply)
    assert set(reply.content[wire.METRICS]) == {"epsilon"}
    assert wire.ARRAYS not in reply.content  # the update leaves only masked, in a later stage


# --- issue 28: a run's spec is fixed on first contact; checks against the policy come first -----


def test_the_final_round_cannot_be_asked_again_with_fewer_rounds(hospital):
    """Issue 28, 3(c): "evaluation only after the final round" trusted each message's rounds;
    the same run asked with rounds = 1 got round 1's metrics. The run's spec is now fixed at the
    hospital on first contact, on disk, and another spec for the run is refused and logged."""
    config, node_config, tmp_path = hospital
    write_policy(tmp_path / "policy.toml", allow_evaluation=True, evaluate_rounds="final")
    arrays = _arrays(config)
    assert wire.REFUSAL not in _train(config, node_config, arrays).content  # round 1 of 2
    fixed = Path(node_config["ledger"], "runs", "st-mary.run-a.json")
    assert json.loads(fixed.read_text())["spec_sha256"] == config.digest()

    shorter = config.updated(**{"rounds": 1})  # "round 1 is the final one"
    reply = _evaluate(shorter, node_config, arrays)
    assert _reason(reply) == Reason("run.spec_changed")
    assert wire.METRICS not in reply.content
    assert _ledger(node_config).rounds_recorded("run-a" + EVALUATION_KEY) == []
    reply = _train(shorter, node_config, arrays)  # nor trained again as a one-round run
    assert _reason(reply) == Reason("run.spec_changed")
    refusals = [
        json.loads(line)["fields"]
        for line in _hospital_audit(node_config).splitlines()
        if json.loads(line)["kind"] == "refusal"
    ]
    assert [r["code"] for r in refusals] == ["run.spec_changed"] * 2  # logged, with the digests
    assert config.digest()[:12] in refusals[0]["reason"]
    # the spec agreed to still holds: only its final round, 2, is evaluated
    reply = _evaluate(config, node_config, arrays)
    assert _reason(reply) == Reason("evaluation.not_final", {"rounds": 2})


def test_a_spec_the_policy_refuses_is_not_fixed(hospital):
    config, node_config, _ = hospital
    reply = _train(config.updated(**{"dp": False}), node_config, _arrays(config))
    assert _reason(reply).code == "policy.rules"
    assert not Path(node_config["ledger"], "runs").exists()
    assert wire.REFUSAL not in _train(config, node_config, _arrays(config)).content


def test_the_hospitals_declared_labels_are_checked_before_any_record_is_read(hospital):
    """A hospital that declares its labels has a run lacking one refused from its policy alone:
    the answer is the same whatever its records hold (the data file is not even there)."""
    config, node_config, tmp_path = hospital
    write_policy(tmp_path / "policy.toml", labels=[*LABELS, "hiv-positive"])
    Path(node_config["data-path"]).unlink()
    reply = _train(config, node_config, _arrays(config))
    assert _reason(reply) == Reason("policy.rules", {"rules": "labels"})
    assert not Path(node_config["ledger"], "st-mary.json").exists()  # nothing read, nothing spent


def test_the_vocabulary_limit_is_the_hospitals_and_its_refusal_carries_no_share(hospital):
    """The vocabulary refusal carried the share of unknown text (two decimals) against a limit
    the coordinator chose: a binary search on max_unknown_rate measured the text, for free."""
    config, node_config, tmp_path = hospital
    data = Path(node_config["data-path"])
    rows = data.read_text(encoding="utf-8").splitlines()
    data.write_text(
        "\n".join([rows[0], *(row.replace(": ", ": \U0001fac0 ", 1) for row in rows[1:])]) + "\n",
        encoding="utf-8",
    )
    write_policy(tmp_path / "policy.toml", max_unknown_rate=0.01)
    lenient = config.updated(**{"max_unknown_rate": 1.0})  # the coordinator's limit
    reply = _train(lenient, node_config, _arrays(config))
    assert _reason(reply) == Reason("data.vocabulary", {"max_unknown_rate": 0.01})
    # it depends on the text, so it came after the budget gate and was paid for
    assert [(e.run_id, e.status) for e in _ledger(node_config).entries] == [("run-a", "reserved")]


def test_a_hub_model_is_refused_without_reaching_any_hub(hospital, monkeypatch):
    """Issue 28, 3(b): with allowed_model_hashes unset, a hospital given a hub model id went to
    fetch it. Now a model must be a local folder whose content the policy pins (or the packaged
    default); a hub id is refused from the policy alone, before anything is downloaded or read."""
    import huggingface_hub

    config, node_config, _ = hospital

    def no_hub(*args, **kwargs):
        raise AssertionError("a hospital reached for a model hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    Path(node_config["data-path"]).unlink()  # not read either
    crafted = config.updated(**{"model": "coordinator-org/bert-with-a-tokenizer"})
    reply = _train(crafted, node_config, _arrays(config))
    assert _reason(reply) == Reason("policy.rules", {"rules": "allowed_model_hashes"})


def test_a_policy_that_pins_no_model_trains_only_the_packaged_default(hospital):
    from fedward.client.policy import SitePolicy
    from fedward.client.site import Site
    from fedward.common.config import PACKAGED_MODEL

    config, node_config, _ = hospital
    policy = "lifetime_epsilon = 6.0\nrequire_secure_aggregation = false\n"  # no model pinned
    Path(node_config["policy"]).write_text(policy, encoding="utf-8")
    assert SitePolicy.load(node_config["policy"]).allowed_model_hashes is None
    reply = _train(config, node_config, _arrays(config))  # a local folder, but not pinned
    assert _reason(reply) == Reason("policy.rules", {"rules": "allowed_model_hashes"})
    site = Site.open(node_config, "st-mary")
    site.check_policy(config.updated(model=PACKAGED_MODEL).spec)  # accepted
