"""A small soak of a real deployment (bench/soak.py): three hospitals' SuperNodes and a SuperLink
as separate processes over TLS with node authentication, SecAgg+ on, patient-level DP, a cohort
of two per round. In its one round, one sampled hospital is killed with `kill -9` as its train
message (SecAgg+'s advertise-keys stage) arrives, and restarted after the round; the other's
ledger write after training fails with ENOSPC. Afterwards every invariant of
bench/soak_checks.py must hold. One round, because each round costs about a minute here (every
message runs in a fresh ClientApp process).

The larger soaks (every fault kind: a kill in each SecAgg+ stage, SuperLink kills and resumes,
freezes) are in bench/results/soak.md; a SuperLink killed and the run resumed is also
tests/deploy/test_runs.py's.
"""

from __future__ import annotations

import json

import pytest

from bench.soak import Fault, Settings, Soak

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def soaked(tmp_path_factory):
    settings = Settings(
        hospitals=3,
        rounds=1,
        fraction=0.67,
        stage_timeout=20.0,
        round_timeout=30.0,
        deadline=480.0,
        root=tmp_path_factory.mktemp("soak"),
        schedule=[Fault(1, "supernode_kill@advertise_keys"), Fault(1, "ledger_enospc")],
    )
    soak = Soak(settings)
    try:
        soak.run()
    finally:
        soak.close()
    return soak, soak.check()


def test_every_invariant_holds_after_the_faults(soaked):
    _, result = soaked
    assert [str(finding) for finding in result["findings"]] == []
    # the coordinator's and each hospital's that wrote one (the one killed first may not have)
    assert result["audits_verified"] == result["audits"] >= 3
    assert result["files_checked"] >= 5  # ledgers, kept updates, checkpoint, history, adapter


def test_each_fault_was_injected_in_its_stage_and_logged(soaked):
    soak, _ = soaked
    kill, enospc = soak.schedule
    assert (kill.stage, enospc.stage) == ("advertise_keys", "advertise_keys")
    assert kill.injected_at is not None and enospc.injected_at is not None
    assert kill.hospital and enospc.hospital and kill.hospital != enospc.hospital
    assert any("FAULT supernode_kill@advertise_keys" in line for line in soak.events)
    assert any(f"{kill.hospital} restarted" in line for line in soak.events)
    assert (soak.site(enospc.hospital) / "enospc-armed.fired").exists()  # the write did fail


def test_the_round_is_reported_failed_with_its_reason_and_the_killed_hospital_came_back(soaked):
    soak, result = soaked
    (row,) = result["history"]["rounds"]
    assert row["status"].startswith("failed: ")  # a cohort of two, both hit: no sum to unmask
    assert "secure aggregation" in row["status"] or "min_hospitals" in row["status"]
    kill, _ = soak.schedule
    restarted = soak.nodes[kill.hospital]  # the process started after the kill
    assert restarted is not soak.retired[0] and "SuperNode ID" in restarted.log()


def test_the_hospital_whose_ledger_write_failed_stays_charged_and_sent_nothing(soaked):
    soak, result = soaked
    _, enospc = soak.schedule
    run_id = result["history"]["run_id"]
    ledger = json.loads(
        (soak.site(enospc.hospital) / "ledger" / f"{enospc.hospital}-notes.json").read_text()
    )
    round_one = [e for e in ledger["entries"] if (e["run_id"], e["round"]) == (run_id, 1)]
    assert [e["status"] for e in round_one] == ["reserved"]  # fail safe: counted, not dropped
    audit = [
        json.loads(line)
        for line in (soak.site(enospc.hospital) / "ledger" / "audit.jsonl").read_text().splitlines()
    ]
    assert [
        r["kind"] for r in audit if r["fields"].get("round") == 1 and r["kind"] != "refusal"
    ] == []
    refusal = next(
        r["fields"]
        for r in audit
        if r["kind"] == "refusal"
        and r["fields"].get("round") == 1
        and r["fields"]["stage"] == "train"
    )
    assert refusal["charged"] and refusal["error"] == "OSError"  # no update of round 1 left it
    row = result["history"]["rounds"][0]
    assert not row.get("hospitals", {}).get(enospc.hospital, {}).get("trained")
