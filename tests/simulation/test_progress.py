"""Progress within a round: what the simulated hospitals append (simulation/app.py) and the
words `fedward simulate`'s progress bar shows from it."""

from __future__ import annotations

from fedward.simulation.app import PROGRESS_FILE, describe_progress, note_progress


def test_the_bar_says_who_loads_the_model_trains_and_is_done_in_the_latest_round(tmp_path):
    note_progress(str(tmp_path), 1, "hospital-0", "training")
    assert not (tmp_path / PROGRESS_FILE).exists()  # only `fedward simulate` asks for progress
    (tmp_path / PROGRESS_FILE).write_text("")
    for name in ("hospital-0", "hospital-1", "hospital-2"):
        note_progress(str(tmp_path), 1, name, "loading the model")
    note_progress(str(tmp_path), 1, "hospital-0", "trained")
    note_progress(str(tmp_path), 1, "hospital-2", "training")
    lines = (tmp_path / PROGRESS_FILE).read_text(encoding="utf-8").splitlines()
    assert describe_progress(lines) == (
        "round 1: loading the model: hospital-1; training: hospital-2; 1 trained"
    )
    note_progress(str(tmp_path), 2, "hospital-1", "training")
    lines = (tmp_path / PROGRESS_FILE).read_text(encoding="utf-8").splitlines()
    assert describe_progress(lines) == "round 2: training: hospital-1"


def test_many_hospitals_are_counted_not_listed_and_a_half_written_line_is_skipped():
    lines = [f'{{"round": 3, "hospital": "hospital-{i}", "stage": "training"}}' for i in range(50)]
    lines.append('{"round": 3, "hosp')  # being written by another worker
    assert describe_progress(lines) == (
        "round 3: training: hospital-0, hospital-1, hospital-2 and 47 more"
    )
    assert describe_progress([]) == ""
