"""Training runs over a real federation: `fedward run` against Flower's SuperLink (TLS, node auth)
with two hospitals' SuperNodes (`fedward client start`), all as subprocesses on loopback.

The tests share one federation and run in this order: a 2-round run; a tampered audit log; a
second run that one hospital's policy and the other's ledger refuse; a hospital killed mid-round;
the coordinator killed mid-run and the run resumed. Each takes one to a few minutes on 2 cores,
because Flower starts a fresh ClientApp process (torch, transformers) for every message.
"""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.numpy import load_file

from fedward.server.resume import load_checkpoint

HOSPITALS = ("north", "south")  # the federation fixture's hospitals (tests/deploy/conftest.py)
pytestmark = pytest.mark.slow

RUN_TIMEOUT = 900  # seconds; a 2-round secure run takes about 3 minutes on a busy 2-core machine


def _kinds(records: list[dict]) -> list[str]:
    return [record["kind"] for record in records]


def _fail_with_logs(federation, done) -> str:
    return f"exit {done.returncode}\nstdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"


@pytest.fixture(scope="module")
def first_run(federation):
    """A 2-round run with secure aggregation (the default); 'south' allows a lifetime epsilon
    of 5.5, so this run (epsilon 5) fits, and a second one cannot."""
    federation.set_policy("north")
    federation.set_policy("south", lifetime_epsilon=5.5)
    config = federation.run_config("out-first")
    done = federation.cli(*federation.run_args(config), timeout=RUN_TIMEOUT)
    return done


def test_a_two_round_secure_run_succeeds(federation, first_run):
    done = first_run
    assert done.returncode == 0, _fail_with_logs(federation, done)
    assert "round 1: ok" in done.stdout and "round 2: ok" in done.stdout
    assert "audit log intact" in done.stdout

    history = federation.history("out-first")
    run_id = history["run_id"]
    assert [row["round"] for row in history["rounds"]] == [1, 2]
    for row in history["rounds"]:
        assert row["status"] == "ok" and row["secure_aggregation"]
        assert sorted(n for n, h in row["hospitals"].items() if h.get("trained")) == list(HOSPITALS)
    out = federation.out("out-first")
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "fedward.json").is_file()
    assert (out / "checkpoint.npz").is_file()

    # each hospital's ledger has both rounds, within the run's epsilon
    for name in HOSPITALS:
        ledger = federation.ledger(name)
        assert ledger.rounds_recorded(run_id) == [1, 2]
        assert ledger.epsilon_spent(1e-5) <= 5.0 + 1e-3

    # both sides' audit logs verify, and match: each hospital trained round r from the
    # adapter the coordinator recorded after round r-1
    server_log = federation.audit_records(out / "audit.jsonl")
    assert _kinds(server_log) == ["run.start", "round", "round", "run.end"]
    adapters = {0: server_log[0]["fields"]["initial_adapter_sha256"]}
    for record in server_log[1:3]:
        assert record["fields"]["participants"] == list(HOSPITALS)
        adapters[record["fields"]["round"]] = record["fields"]["adapter_sha256"]
    for name in HOSPITALS:
        trained = [r["fields"] for r in federation.hospital_audit(name) if r["kind"] == "train"]
        assert [(f["run_id"], f["round"]) for f in trained] == [(run_id, 1), (run_id, 2)]
        for fields in trained:
            assert fields["global_sha256"] == adapters[fields["round"] - 1]
    # each hospital kept its own model and its alone / global / own report at home, and no
    # part of either reached the coordinator (its figures, or the adapter's tensor bytes)
    for row in history["rounds"]:
        for stats in row["hospitals"].values():
            assert not any(key.startswith("personal") for key in stats)
    coordinator_files = [
        path for path in federation.root.joinpath("coordinator").rglob("*") if path.is_file()
    ]
    coordinator_bytes = b"".join(path.read_bytes() for path in coordinator_files)
    # the global adapters the coordinator holds (kept round, checkpoint): an own model that is
    # one of them as received is no secret of the hospital's
    global_tensors = {a.tobytes() for a in load_checkpoint(out).arrays.values()}
    for path in coordinator_files:
        if path.suffix == ".safetensors":
            global_tensors |= {a.tobytes() for a in load_file(path).values()}
    for name in HOSPITALS:
        own = federation.site(name) / "ledger" / "own" / f"{name}-notes" / run_id
        report = json.loads((own / "report.json").read_text(encoding="utf-8"))
        assert {"alone", "global", "own", "own_method"} <= set(report)
        tensors = load_file(own / "adapter" / "adapter_model.safetensors")
        if all(t.tobytes() in global_tensors for t in tensors.values()):
            continue  # its own model is a global one as received: the coordinator made it
        weights = (own / "adapter" / "adapter_model.safetensors").read_bytes()
        header = 8 + int.from_bytes(weights[:8], "little")
        assert weights[header + 64 : header + 128] not in coordinator_bytes
    for path in [
        out / "audit.jsonl",
        *(federation.site(n) / "ledger" / "audit.jsonl" for n in HOSPITALS),
    ]:
        verified = federation.cli("audit", "verify", str(path))
        assert verified.returncode == 0 and "intact" in verified.stdout, verified.stderr


def test_a_tampered_audit_line_is_detected(federation, first_run, tmp_path):
    source = federation.out("out-first") / "audit.jsonl"
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)

    edited = tmp_path / "edited.jsonl"
    edited.write_text(
        "".join([lines[0], lines[1].replace('"status":"ok"', '"status":"failed"'), *lines[2:]])
    )
    done = federation.cli("audit", "verify", str(edited))
    assert done.returncode == 1
    assert "broken at line 2" in done.stderr and "record edited" in done.stderr

    removed = tmp_path / "removed.jsonl"
    removed.write_text("".join([lines[0], *lines[2:]]))
    done = federation.cli("audit", "verify", str(removed))
    assert done.returncode == 1
    assert "broken at line 2" in done.stderr and "missing" in done.stderr

    hospital = tmp_path / "hospital.jsonl"
    shutil.copy(federation.site("south") / "ledger" / "audit.jsonl", hospital)
    text = hospital.read_text(encoding="utf-8")
    hospital.write_text(text.replace('"hospital":"south"', '"hospital":"north"', 1))
    done = federation.cli("audit", "verify", str(hospital))
    assert done.returncode == 1 and "broken at line 1" in done.stderr


def test_policy_and_ledger_refusals_reach_the_coordinators_report(federation, first_run):
    assert first_run.returncode == 0
    federation.set_policy("north", allowed_tasks=["ner"])
    federation.set_policy("south", lifetime_epsilon=5.5)  # it spent 5.0 in the first run
    config = federation.run_config("out-refused", rounds=1)
    done = federation.cli(*federation.run_args(config), timeout=RUN_TIMEOUT)
    # refusals are not crashes, but a run in which no round trained is a failure (issue 41)
    assert done.returncode == 1, _fail_with_logs(federation, done)
    assert "finished without training a round" in " ".join(done.stderr.split())
    printed = " ".join(done.stdout.split())
    # reasons are codes the coordinator renders; the details stay in the hospitals' audit logs
    assert (
        "REFUSED by north: the site policy refuses the run (rules broken: allowed_tasks)" in printed
    )
    assert "REFUSED by south:" in printed and "privacy budget would be exceeded" in printed

    history = federation.history("out-refused")
    (row,) = history["rounds"]
    assert row["status"].startswith("failed")
    assert set(row["refused"]) == set(HOSPITALS)
    server_log = federation.audit_records(federation.out("out-refused") / "audit.jsonl")
    refused = {item["hospital"]: item["reason"] for item in server_log[1]["fields"]["refused"]}
    assert "[policy.rules]" in refused["north"] and "[budget.exceeded]" in refused["south"]

    run_id = history["run_id"]
    for name in HOSPITALS:
        assert federation.ledger(name).rounds_recorded(run_id) == []  # nothing spent
        refusals = [r["fields"] for r in federation.hospital_audit(name) if r["kind"] == "refusal"]
        assert any(f["run_id"] == run_id and f["stage"] == "train" for f in refusals)
    south = [r["fields"] for r in federation.hospital_audit("south") if r["kind"] == "refusal"]
    assert any("site limit 5.5" in f["reason"] for f in south)


def test_a_hospital_killed_mid_round_fails_the_round_cleanly(federation):
    for name in HOSPITALS:
        federation.set_policy(name)
    config = federation.run_config("out-killed", rounds=1, round_timeout=25.0, secagg_timeout=25.0)
    south = federation.hospitals["south"]
    before = south.log().count("Receiving: train message")
    runner = federation.spawn("run-killed.log", *federation.run_args(config))
    try:
        federation.wait_until(
            lambda: south.log().count("Receiving: train message") > before,
            300,
            "south to receive its train message",
        )
        south.kill()  # mid-round: it got the global adapter and never answers
        # the only round failed: the run ends, and says it trained nothing (exit 1, issue 41)
        assert runner.wait(timeout=600) == 1, runner.log()[-4000:]
    finally:
        runner.kill()
        federation.start_hospital("south")

    (row,) = federation.history("out-killed")["rounds"]
    assert row["status"].startswith("failed")
    assert not row["hospitals"].get("south", {}).get("trained")
    assert row["dropped"]  # the killed hospital is named as missing
    server_log = federation.audit_records(federation.out("out-killed") / "audit.jsonl")
    start, round_record = server_log[0]["fields"], server_log[1]["fields"]
    assert round_record["adapter_sha256"] == start["initial_adapter_sha256"]  # adapter unchanged
    assert (
        federation.cli(
            "audit", "verify", str(federation.out("out-killed") / "audit.jsonl")
        ).returncode
        == 0
    )


def test_a_run_resumes_after_the_coordinator_is_killed(federation):
    for name in HOSPITALS:
        federation.set_policy(name, require_secure_aggregation=False)
    config = federation.run_config("out-resume", rounds=2, secure_aggregation=False)
    runner = federation.spawn("run-resume.log", *federation.run_args(config))
    history_path = federation.out("out-resume") / "history.json"

    def round_two_trained() -> tuple[str, list[str]] | None:
        if not history_path.exists():
            return None
        history = federation.history("out-resume")
        if len(history["rounds"]) >= 2:
            pytest.fail("round 2 completed before the coordinator could be killed in it")
        if len(history["rounds"]) < 1:
            return None
        run_id = history["run_id"]
        recorded = [n for n in HOSPITALS if 2 in federation.ledger(n).rounds_recorded(run_id)]
        return (run_id, recorded) if recorded else None

    try:
        run_id, released = federation.wait_until(
            round_two_trained, 600, "a hospital to release round 2", every=0.2
        )
        federation.kill_server()  # the SuperLink, its SuperExec and the ServerApp, like a crash
    finally:
        runner.kill()
    history = federation.history("out-resume")
    assert [row["round"] for row in history["rounds"]] == [1]

    federation.start_server()  # same port and database: registrations survive, hospitals reconnect
    done = federation.cli(*federation.run_args(config, "--resume"), timeout=RUN_TIMEOUT)
    assert done.returncode == 0, _fail_with_logs(federation, done)
    assert "round 2: ok" in done.stdout and "round 1:" not in done.stdout

    resumed = federation.history("out-resume")
    assert resumed["run_id"] == run_id
    assert resumed["flower_run_id"] != history["flower_run_id"]
    assert [(row["round"], row["status"]) for row in resumed["rounds"]] == [(1, "ok"), (2, "ok")]
    for name in HOSPITALS:  # no round counted twice in any ledger
        assert federation.ledger(name).rounds_recorded(run_id) == [1, 2]
    for name in released:  # round 2 was resent as released, not trained again
        records = [
            r for r in federation.hospital_audit(name) if r["fields"].get("run_id") == run_id
        ]
        train = [r["fields"] for r in records if r["kind"] == "train" and r["fields"]["round"] == 2]
        replay = [
            r["fields"] for r in records if r["kind"] == "replay" and r["fields"]["round"] == 2
        ]
        assert len(train) == 1 and len(replay) == 1
        assert replay[0]["update_sha256"] == train[0]["update_sha256"]
        assert replay[0]["global_sha256"] == train[0]["global_sha256"]

    server_log = federation.audit_records(federation.out("out-resume") / "audit.jsonl")
    assert _kinds(server_log) == ["run.start", "round", "run.resume", "round", "run.end"]
    assert server_log[2]["fields"]["completed_round"] == 1
    assert server_log[2]["fields"]["adapter_sha256"] == server_log[1]["fields"]["adapter_sha256"]
    verified = federation.cli("audit", "verify", str(federation.out("out-resume") / "audit.jsonl"))
    assert verified.returncode == 0
