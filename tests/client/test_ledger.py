"""Privacy ledger: the composition of every DP round on a data set survives runs and crashes."""

import json

import pytest
from opacus.accountants import RDPAccountant

from fedward.client.privacy import ledger as ledger_module
from fedward.client.privacy.accounting import compose_epsilon
from fedward.client.privacy.ledger import PrivacyLedger, dataset_fingerprint
from fedward.common.errors import DataError, PrivacyBudgetExceeded
from fedward.common.files import atomic

DELTA = 1e-5
ROUND = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 100}  # epsilon ~7.9 alone


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("text,label\nchest pain,cardio\ncough,pulmo\n")
    return path


def test_fingerprint_follows_content(tmp_path, data_file):
    first = dataset_fingerprint(data_file)
    assert first == dataset_fingerprint(data_file)
    data_file.write_text("text,label\nchest pain,cardio\n")
    assert dataset_fingerprint(data_file) != first

    folder = tmp_path / "conll"
    folder.mkdir()
    (folder / "train.tsv").write_text("a\tO\n")
    (folder / "devel.tsv").write_text("b\tO\n")
    before = dataset_fingerprint(folder)
    (folder / "devel.tsv").rename(folder / "test.tsv")  # same bytes, other name
    assert dataset_fingerprint(folder) != before
    with pytest.raises(DataError, match="not found"):
        dataset_fingerprint(tmp_path / "missing.csv")


def test_composition_is_opacus_rdp():
    assert compose_epsilon([], DELTA) == 0.0
    # Same answer as Opacus's accountant stepped one DP-SGD step at a time.
    accountant = RDPAccountant()
    for noise_multiplier in (1.0, 1.3):
        for _ in range(100):
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=0.1)
    history = [(1.0, 0.1, 60), (1.0, 0.1, 40), (1.3, 0.1, 100)]  # two rounds, then another run
    assert compose_epsilon(history, DELTA) == pytest.approx(accountant.get_epsilon(DELTA))
    one, other = compose_epsilon(history[:2], DELTA), compose_epsilon(history[2:], DELTA)
    assert max(one, other) < compose_epsilon(history, DELTA) < one + other


def test_composition_continues_across_runs_from_disk(tmp_path, data_file):
    folder = tmp_path / "ledgers"
    first_run = PrivacyLedger.open(folder, "notes")
    assert first_run.epsilon_spent(DELTA) == 0.0
    first_run.record("run-1", 1, delta=DELTA, **ROUND)
    after_one = first_run.epsilon_spent(DELTA)

    # A later run in a new process opens the same ledger and continues the composition.
    second_run = PrivacyLedger.open(folder, "notes")
    assert second_run.rounds_recorded("run-1") == [1]
    projected = second_run.projected_epsilon(DELTA, **ROUND)
    second_run.record("run-2", 1, delta=DELTA, **ROUND)
    assert second_run.epsilon_spent(DELTA) == pytest.approx(projected)
    assert second_run.epsilon_spent(DELTA) > after_one
    rows = PrivacyLedger.open(folder, "notes").describe()
    assert [(row.run_id, row.round) for row in rows] == [("run-1", 1), ("run-2", 1)]
    assert rows[-1].epsilon_total == pytest.approx(projected)


def test_budget_refused_before_training_with_clear_numbers(tmp_path, data_file):
    ledger = PrivacyLedger.open(tmp_path, "notes")
    ledger.record("run-1", 1, delta=DELTA, **ROUND)
    assert ledger.check_budget(12.0, DELTA, **ROUND) == pytest.approx(
        ledger.projected_epsilon(DELTA, **ROUND)
    )
    with pytest.raises(PrivacyBudgetExceeded) as caught:
        ledger.check_budget(10.0, DELTA, **ROUND)
    message = str(caught.value)
    assert "data set notes:" in message and str(tmp_path) not in message
    assert "spent epsilon 7.899" in message and "after this round 11.016" in message
    assert "limit 10" in message
    assert ledger.rounds_recorded("run-1") == [1]  # the refusal recorded nothing


def test_record_is_idempotent_per_run_and_round(tmp_path, data_file):
    ledger = PrivacyLedger.open(tmp_path, "notes")
    ledger.record("run-1", 3, delta=DELTA, **ROUND)
    spent = ledger.epsilon_spent(DELTA)
    # A resumed run records round 3 again, from a fresh object: nothing is counted twice.
    again = PrivacyLedger.open(tmp_path, "notes")
    again.record("run-1", 3, delta=DELTA, **ROUND)
    assert again.epsilon_spent(DELTA) == pytest.approx(spent)
    assert len(PrivacyLedger.open(tmp_path, "notes").entries) == 1


def test_record_keeps_rounds_written_by_another_process(tmp_path, data_file):
    a = PrivacyLedger.open(tmp_path, "notes")
    b = PrivacyLedger.open(tmp_path, "notes")  # opened before a wrote anything
    a.record("run-1", 1, delta=DELTA, **ROUND)
    b.record("run-2", 1, delta=DELTA, **ROUND)
    on_disk = PrivacyLedger.open(tmp_path, "notes")
    assert [(e.run_id, e.round) for e in on_disk.entries] == [("run-1", 1), ("run-2", 1)]


def test_failed_write_leaves_previous_ledger_intact(tmp_path, data_file, monkeypatch):
    ledger = PrivacyLedger.open(tmp_path, "notes")
    ledger.record("run-1", 1, delta=DELTA, **ROUND)
    before = ledger.path.read_bytes()

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        ledger.record("run-1", 2, delta=DELTA, **ROUND)
    monkeypatch.undo()

    assert ledger.path.read_bytes() == before
    reloaded = PrivacyLedger.open(tmp_path, "notes")
    assert reloaded.rounds_recorded("run-1") == [1]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [ledger.path.name]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"format": "fedward-privacy-ledger", "version": 1, "entries": [', "corrupt at line 1"),
        (
            json.dumps(
                {
                    "format": "fedward-privacy-ledger",
                    "version": 1,
                    "dataset": "x",
                    "entries": [{"run_id": "r"}],
                }
            ),
            "malformed at 'entries.0",
        ),
        (
            json.dumps({"format": "something-else", "version": 1, "dataset": "x", "entries": []}),
            "not a fedward privacy ledger",
        ),
    ],
)
def test_corrupt_ledger_names_the_file(tmp_path, content, expected):
    path = tmp_path / "abc.json"
    path.write_text(content)
    with pytest.raises(DataError, match=expected) as caught:
        PrivacyLedger.open(tmp_path, "abc")
    assert str(path) in str(caught.value)
    assert "do not delete it" in str(caught.value)


def test_ledger_key_must_be_a_plain_name(tmp_path):
    with pytest.raises(DataError, match="ledger key"):
        PrivacyLedger.open(tmp_path, "../escape")
    assert PrivacyLedger.open(tmp_path, "icu-notes").path == tmp_path / "icu-notes.json"


def test_describe_at_a_common_delta(tmp_path, data_file):
    ledger = PrivacyLedger.open(tmp_path, "notes")
    ledger.record("run-1", 1, delta=1e-5, **ROUND)
    ledger.record("run-1", 2, delta=1e-5, **ROUND)
    looser = ledger.describe(delta=1e-3)
    assert [row.delta for row in looser] == [1e-3, 1e-3]
    assert looser[-1].epsilon_total < ledger.describe()[-1].epsilon_total
    assert looser[-1].epsilon_total == pytest.approx(ledger.epsilon_spent(1e-3))
    assert ledger_module.LedgerRow is type(looser[0])


def test_the_ledger_never_mixes_units_in_one_budget(tmp_path):
    from fedward.client.privacy.accounting import DPPlan
    from fedward.common.errors import PolicyError

    ledger = PrivacyLedger.open(tmp_path, "icu")
    plan = DPPlan(**ROUND)
    ledger.reserve("run-a", 1, 3, plan, DELTA, 50.0, unit="patient")
    ledger.confirm("run-a", 1, plan, DELTA, unit="patient")
    assert [e.unit for e in ledger.entries] == ["patient"] and ledger.unit == "patient"
    for attempt in (
        lambda: ledger.reserve("run-b", 1, 3, plan, DELTA, 50.0, unit="record"),
        lambda: ledger.record("run-c", 1, **ROUND, delta=DELTA, unit="record"),
        lambda: ledger.confirm("run-d", 1, plan, DELTA, unit="record"),
    ):
        with pytest.raises(PolicyError) as refused:
            attempt()
        assert refused.value.reason.code == "ledger.unit_mixed"
    reopened = PrivacyLedger.open(tmp_path, "icu")
    assert [(e.run_id, e.unit) for e in reopened.entries] == [("run-a", "patient")]
    ledger.reserve("run-e", 1, 3, plan, DELTA, 50.0, unit="patient")  # the same unit goes on


def test_entries_of_an_older_ledger_are_records(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "icu")
    ledger.record("run-a", 1, **ROUND, delta=DELTA)
    document = json.loads(ledger.path.read_text())
    for entry in document["entries"]:
        del entry["unit"]  # as written before units existed
    ledger.path.write_text(json.dumps(document))
    assert PrivacyLedger.open(tmp_path, "icu").unit == "record"


def test_the_budget_gate_charges_targets_whatever_the_plan(tmp_path):
    """Issue 40: with a bound, the gate charges each run its target once and each release its
    own epsilon; two data sets whose plans differ (another unit count, another sample rate)
    get the same answers, and a confirmed round keeps its charge."""
    from fedward.client.privacy.accounting import DPPlan, plan_rounds

    answers = []
    for folder, units in (("small", 32), ("large", 33)):
        ledger = PrivacyLedger.open(tmp_path / folder, "icu")
        plan = plan_rounds(2.0, DELTA, 2, 1, 1, units)
        said = []
        for run_id, round_number in (("run-a", 1), ("run-a", 2), ("run-b", 1), ("run-c", 1)):
            try:
                ledger.reserve(run_id, round_number, 2, plan, DELTA, 5.0, epsilon_bound=2.0)
                ledger.confirm(run_id, round_number, plan, DELTA)
                said.append("fits")
            except PrivacyBudgetExceeded:
                said.append("refused")
        release, key = DPPlan(5.0, 1.0, 1), "run-b-evaluation"
        for round_number in (1, 2, 3):
            try:
                ledger.reserve(
                    key, round_number, 3, release, DELTA, 5.0, epsilon_bound=0.5, bound_per="entry"
                )
                said.append("fits")
            except PrivacyBudgetExceeded:
                said.append("refused")
        answers.append(said)
        assert ledger.epsilon_charged(DELTA) == pytest.approx(5.0)  # 2 + 2 + 0.5 + 0.5
        assert ledger.epsilon_spent(DELTA) < ledger.epsilon_charged(DELTA)
    training, evaluations = ["fits", "fits", "fits", "refused"], ["fits", "fits", "refused"]
    assert answers[0] == answers[1] == [*training, *evaluations]
