"""Audit log: hash-chained JSON lines; any edit, deletion, reordering or truncation is found."""

import itertools
import json

import pytest

from fedward.common.errors import DataError
from fedward.common.files.audit_log import GENESIS, REDACTED, AuditLog, verify


@pytest.fixture
def log_path(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("run_start", run="run-1", rounds=3, config_digest="ab" * 32)
    for round_number in (1, 2, 3):
        log.append(
            "round",
            run="run-1",
            round=round_number,
            participants=["hospital-a", "hospital-b"],
            refused={"hospital-c": "site policy refuses the run: task 'ner' is not allowed"},
            epsilon={"hospital-a": 1.5 * round_number},
            checkpoint_sha256="cd" * 32,
        )
    log.append("run_end", run="run-1", status="finished")
    return path


def lines(path):
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def test_clean_log_verifies_and_chains_from_genesis(log_path):
    result = verify(log_path)
    assert result.ok and result.valid_records == 5 and result.problem_line is None
    records = [json.loads(line) for line in lines(log_path)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(records))
    assert result.last_hash == records[-1]["hash"]
    assert verify(log_path, expected_last_hash=records[-1]["hash"]).ok
    assert "5 records" in result.summary()


def test_reopened_log_continues_the_chain(log_path):
    AuditLog(log_path).append("export", run="run-1", adapter_sha256="ef" * 32)
    result = verify(log_path)
    assert result.ok and result.valid_records == 6


def test_edited_record_is_found_with_its_line(log_path):
    content = lines(log_path)
    content[2] = content[2].replace("hospital-b", "hospital-x")
    log_path.write_text("".join(content), encoding="utf-8")
    result = verify(log_path)
    assert not result.ok
    assert result.problem_line == 3 and result.valid_records == 2
    assert "edited" in result.problem
    assert "line 3" in result.summary()


def test_edit_with_recomputed_hash_breaks_the_next_link(log_path):
    from fedward.common.files.audit_log import canonical_json, record_hash

    content = lines(log_path)
    record = json.loads(content[1])
    record["fields"]["participants"] = ["hospital-a"]
    record["hash"] = record_hash(record)
    content[1] = canonical_json(record) + "\n"
    log_path.write_text("".join(content), encoding="utf-8")
    result = verify(log_path)
    assert result.problem_line == 3 and "chain broken" in result.problem


def test_deleted_record_is_found(log_path):
    content = lines(log_path)
    del content[1]
    log_path.write_text("".join(content), encoding="utf-8")
    result = verify(log_path)
    assert result.problem_line == 2 and "1 record(s) missing" in result.problem


def test_reordered_records_are_found(log_path):
    content = lines(log_path)
    content[1], content[2] = content[2], content[1]
    log_path.write_text("".join(content), encoding="utf-8")
    result = verify(log_path)
    assert result.problem_line == 2 and not result.ok


def test_truncated_last_line_is_found_and_blocks_appends(log_path):
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-20])  # crash in the middle of writing the last record
    result = verify(log_path)
    assert result.problem_line == 5 and "truncated" in result.problem
    assert result.valid_records == 4
    with pytest.raises(DataError, match="line 5: last audit record is damaged"):
        AuditLog(log_path).append("round", round=4)
    assert log_path.read_bytes() == data[:-20]  # never modified


def test_records_cut_off_the_end_need_the_anchor(log_path):
    final_hash = verify(log_path).last_hash
    log_path.write_text("".join(lines(log_path)[:3]), encoding="utf-8")
    assert verify(log_path).ok  # a clean prefix is a valid log...
    result = verify(log_path, expected_last_hash=final_hash)
    assert not result.ok and "cut off" in result.problem  # ...unless the last hash is known


def test_secret_looking_fields_are_redacted(tmp_path):
    path = tmp_path / "audit.jsonl"
    AuditLog(path).append(
        "secagg",
        round=1,
        survivors=["a", "b"],
        node={"secret_key": "x25519-private-bytes", "name": "a"},
        shares=[[1, 2]],
        private_key="-----BEGIN",
        seed=42,
    )
    text = path.read_text()
    for leaked in ("x25519-private-bytes", "BEGIN", "[[1,2]]"):
        assert leaked not in text
    record = json.loads(text)
    assert record["fields"]["node"] == {"secret_key": REDACTED, "name": "a"}
    assert record["fields"]["survivors"] == ["a", "b"]
    assert verify(path).ok


def test_bytes_and_bad_kinds_are_rejected(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(TypeError):
        log.append("round", blob=b"\x00\x01")
    with pytest.raises(ValueError):
        log.append("Round Start!")
    assert not (tmp_path / "audit.jsonl").exists()  # nothing half-written


def test_empty_log_is_valid_and_missing_log_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    assert verify(tmp_path / "empty.jsonl").ok
    with pytest.raises(DataError, match="cannot read audit log"):
        verify(tmp_path / "missing.jsonl")
