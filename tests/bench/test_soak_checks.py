"""The soak's invariants (bench/soak_checks.py): a healthy run passes every check, and each
invariant, broken by hand the way a fault could break it, is caught."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bench.soak_checks import (
    adapter_findings,
    audit_findings,
    ledger_findings,
    round_findings,
    sentinel_findings,
    torn_file_findings,
)
from fedward.client.privacy.accounting import DPPlan
from fedward.client.privacy.ledger import PrivacyLedger
from fedward.common.config import RunConfig
from fedward.common.files.arrays_file import write_arrays_file
from fedward.common.files.audit_log import AuditLog
from fedward.common.model import build_model, save_adapter

LABELS = ["cardiac", "respiratory"]
RUN = "run-1"
SENTINEL = "ZQX-SENTINEL-7781"
PLAN = DPPlan(noise_multiplier=1.1, sample_rate=0.2, steps=15)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    config = RunConfig(model=tiny_model_dir, labels=LABELS, hospitals=2)
    model = build_model(config.spec, len(LABELS))
    return save_adapter(
        model,
        tmp_path_factory.mktemp("adapter") / "adapter",
        LABELS,
        config.spec.task,
        config.spec.model,
    )


@pytest.fixture
def run(tmp_path, adapter_dir):
    """A healthy 2-round run: coordinator output, one hospital's ledger, audit log and kept
    update, and a process log; every check passes on it."""
    out = tmp_path / "coordinator" / "out"
    shutil.copytree(adapter_dir, out / "adapter")
    rows = [
        {"round": 1, "status": "ok", "hospitals": {"north": {"trained": True}}},
        {"round": 2, "status": "failed: 1 usable update(s), fewer than min_hospitals 2"},
    ]
    (out / "history.json").write_text(json.dumps({"run_id": RUN, "rounds": rows}))
    write_arrays_file(
        out / "checkpoint.npz", {"round": 2}, {"w": np.ones(3, np.float32)}, prefix="adapter:"
    )
    coordinator = AuditLog(out / "audit.jsonl")
    coordinator.append("run.start", run_id=RUN)
    for row in rows:
        coordinator.append("round", round=row["round"], status=row["status"])
    coordinator.append("run.end", run_id=RUN)

    site = tmp_path / "hospitals" / "north"
    ledger = PrivacyLedger.open(site / "ledger", "north-notes")
    hospital = AuditLog(site / "ledger" / "audit.jsonl")
    for number in (1, 2):  # north trained round 2 too; the round failed at the coordinator
        ledger.reserve(RUN, number, 2, PLAN, 1e-5, 50.0, unit="patient")
        ledger.confirm(RUN, number, PLAN, 1e-5, unit="patient")
        hospital.append("train", run_id=RUN, round=number, hospital="north")
    write_arrays_file(
        site / "ledger" / "releases" / f"north-notes.{RUN}.npz",
        {"round": 2},
        {"w": np.zeros(3, np.float32)},
        prefix="delta:",
    )
    (site / "notes.csv").write_text(f"text,label\n{SENTINEL} chest pain,cardiac\n")
    (site / "supernode-1.log").write_text("INFO: Receiving: train message\n")

    class Run:
        pass

    found = Run()
    found.out, found.site, found.tmp = out, site, tmp_path
    found.ledger = site / "ledger" / "north-notes.json"
    found.hospital_audit = site / "ledger" / "audit.jsonl"
    return found


def _history(run) -> dict:
    return json.loads((run.out / "history.json").read_text())


def _ledger(run) -> list[str]:
    return [
        str(f)
        for f in ledger_findings(run.ledger, run.hospital_audit, "north", history=_history(run))
    ]


def _edit_ledger(run, change) -> None:
    document = json.loads(run.ledger.read_text())
    change(document["entries"])
    run.ledger.write_text(json.dumps(document))


def test_a_healthy_run_passes_every_check(run):
    assert _ledger(run) == []
    assert audit_findings([run.out / "audit.jsonl", run.hospital_audit]) == ([], 2)
    findings, checked = torn_file_findings([run.out, run.site])
    assert findings == [] and checked >= 5  # history, checkpoint, adapter, ledger, kept update
    assert adapter_findings(run.out / "adapter", LABELS, ["chest pain", "cough"]) == []
    assert round_findings(_history(run), 2, _audit(run.out / "audit.jsonl")) == []
    assert sentinel_findings(SENTINEL, [run.tmp], skip=[run.site / "notes.csv"]) == []


def _audit(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_round_charged_twice_is_caught(run):
    _edit_ledger(run, lambda entries: entries.append(dict(entries[0])))
    assert any("round 1 charged 2 times" in f for f in _ledger(run))


def test_a_released_round_missing_from_the_ledger_is_caught(run):
    _edit_ledger(run, lambda entries: entries.pop())
    found = _ledger(run)
    assert any("round 2 was released but is not charged" in f for f in found), found


def test_a_round_the_coordinator_saw_trained_but_not_charged_is_caught(run):
    # the hospital's audit lost nothing, but history names it as trained in a round the
    # ledger does not hold (say, charged under another run id)
    _edit_ledger(run, lambda entries: entries[1].update(run_id="run-other"))
    found = _ledger(run)
    assert any("round 2 was released but is not charged" in f for f in found), found
    assert any("run-other round 2 is charged but was never released" in f for f in found)


def test_a_total_that_is_not_the_composition_of_the_plans_is_caught(run):
    _edit_ledger(run, lambda entries: entries[1].update(epsilon_total=0.01))
    assert any("running total 0.010000 recorded" in f for f in _ledger(run))


def test_a_round_trained_twice_is_caught(run):
    AuditLog(run.hospital_audit).append("train", run_id=RUN, round=2, hospital="north")
    assert any("round 2 trained 2 times" in f for f in _ledger(run))


def test_an_unreadable_ledger_is_a_finding_not_a_crash(run):
    run.ledger.write_text(run.ledger.read_text()[:40])
    (finding,) = _ledger(run)
    assert "cannot be read" in finding


def test_an_edited_audit_record_is_caught(run):
    lines = run.hospital_audit.read_text().splitlines(keepends=True)
    lines[0] = lines[0].replace('"round":1', '"round":3')
    run.hospital_audit.write_text("".join(lines))
    findings, verified = audit_findings([run.out / "audit.jsonl", run.hospital_audit])
    assert verified == 1
    assert "broken at line 1" in str(findings[0])


@pytest.mark.parametrize(
    "path",
    [
        "hospitals/north/ledger/north-notes.json",
        "coordinator/out/history.json",
        "coordinator/out/checkpoint.npz",
        "hospitals/north/ledger/releases/north-notes.run-1.npz",
        "coordinator/out/adapter/adapter_model.safetensors",
        "coordinator/out/adapter/fedward.json",
    ],
)
def test_a_half_written_file_is_caught(run, path):
    target = run.tmp / path
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    findings, _ = torn_file_findings([run.out, run.site])
    assert [f.invariant for f in findings] == ["torn"]
    assert path.split("/")[-1] in str(findings[0]) or "adapter" in str(findings[0])


def test_an_adapter_swap_cut_in_half_is_caught(run):
    (run.out / "adapter").rename(run.out / "adapter.previous")
    findings, _ = torn_file_findings([run.out])
    assert "interrupted swap" in str(findings[0])


def test_an_adapter_that_does_not_load_is_caught(run):
    (run.out / "adapter" / "adapter_model.safetensors").unlink()
    (finding,) = adapter_findings(run.out / "adapter", LABELS, ["chest pain"])
    assert "does not load" in str(finding)


def test_an_adapter_with_other_labels_is_caught(run):
    (finding,) = adapter_findings(run.out / "adapter", ["a", "b", "c"], ["chest pain"])
    assert "labels" in str(finding)


def test_a_round_neither_completed_nor_reported_is_caught(run):
    history = _history(run)
    (finding,) = round_findings(history, 3, _audit(run.out / "audit.jsonl"))
    assert str(finding) == "[rounds] round 3: neither completed nor reported"


def test_a_failed_round_without_a_reason_is_caught(run):
    history = _history(run)
    history["rounds"][1]["status"] = "failed: "
    found = [str(f) for f in round_findings(history, 2, _audit(run.out / "audit.jsonl"))]
    assert "[rounds] round 2: status 'failed: ' is neither ok nor failed" in found


def test_a_round_the_coordinator_audited_otherwise_is_caught(run):
    history = _history(run)
    history["rounds"][0]["status"] = "failed: secure aggregation: too few shares"
    found = [str(f) for f in round_findings(history, 2, _audit(run.out / "audit.jsonl"))]
    assert found == ["[rounds] round 1: audit says 'ok'"]


def test_record_text_in_a_log_or_a_stored_message_is_caught(run):
    (run.site / "supernode-1.log").write_text(f"ERROR: cannot encode {SENTINEL} chest pain\n")
    database = run.tmp / "coordinator" / "superlink.db"
    database.write_bytes(b"SQLite format 3\x00" + SENTINEL.encode("utf-16-le") + b"\x00" * 8)
    found = sentinel_findings(SENTINEL, [run.tmp], skip=[run.site / "notes.csv"])
    assert sorted(f.where for f in found) == [str(database), str(run.site / "supernode-1.log")]
