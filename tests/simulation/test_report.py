"""Tests for the end-of-run report: the round table and `metrics.png` (simulation/report.py)."""

from __future__ import annotations

from rich.console import Console

from fedward.common.tasks import CLASSIFICATION, NER
from fedward.simulation.report import round_table, save_plot


def _rounds() -> list[dict]:
    """Three rounds as `server/app.py` writes them: one with a refusal, one failed."""
    return [
        {
            "round": 1,
            "status": "ok",
            "train_loss": 2.1,
            "global": {"loss": 2.0, "accuracy": 0.31, "macro_f1": 0.22},
            "hospitals": {
                "hospital-0": {"trained": True, "epsilon": 2.5, "loss": 2.0},
                "hospital-1": {"trained": True, "epsilon": 2.7, "loss": 2.1},
                "hospital-10": {"trained": True, "epsilon": None, "loss": 1.9},
            },
            "refused": {},
            "rejected": {},
            "dropped": [],
        },
        {
            "round": 2,
            "status": "ok",
            "train_loss": 1.6,
            "global": {"loss": 1.5, "accuracy": 0.52, "macro_f1": 0.44},
            "hospitals": {
                "hospital-0": {"trained": True, "epsilon": 4.1},
                "hospital-1": {"refused": "epsilon would exceed 5"},
                "hospital-10": {"trained": True, "epsilon": None},
            },
            "refused": {"hospital-1": "epsilon would exceed 5"},
            "rejected": {},
            "dropped": ["node-99"],
        },
        {
            "round": 3,
            "status": "failed: 1 usable update(s), fewer than min_hospitals (2); "
            "global adapter unchanged",
            "train_loss": None,
            "global": {"loss": 1.5, "accuracy": None, "macro_f1": None},
            "hospitals": {"hospital-0": {"trained": True, "epsilon": 5.0}},
            "refused": {},
            "rejected": {"hospital-10": "rejected update: NaN"},
            "dropped": [],
        },
    ]


def _one_round(hospitals: dict[str, dict]) -> list[dict]:
    """One successful round whose hospitals report `hospitals`."""
    return [
        {
            "round": 1,
            "status": "ok",
            "train_loss": 1.0,
            "global": {"loss": 1.0, "accuracy": 0.5, "macro_f1": 0.4},
            "hospitals": hospitals,
            "refused": {},
            "dropped": [],
        }
    ]


def _render(table) -> list[str]:
    console = Console(record=True, width=240, color_system=None)
    console.print(table)
    return console.export_text().splitlines()


def _row(lines: list[str], round_number: int) -> list[str]:
    for line in lines:
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if cells and cells[0] == str(round_number):
            return cells
    raise AssertionError(f"no row for round {round_number} in {lines}")


def test_round_table_shows_metrics_epsilon_refusals_and_failures():
    lines = _render(round_table(_rounds(), title="fedward: rounds"))
    text = "\n".join(lines)
    assert "fedward: rounds" in text
    # Hospitals in natural order: hospital-10 after hospital-1.
    assert text.index("ε hospital-0") < text.index("ε hospital-1") < text.index("ε hospital-10")

    first = _row(lines, 1)
    assert first[:6] == ["1", "ok", "2.100", "2.000", "0.310", "0.220"]
    assert first[6:] == ["2.50", "2.70", "no DP"]

    second = _row(lines, 2)
    assert second[1] == "ok (1 dropped, 1 refused)"
    assert second[6:] == ["4.10", "refused", "no DP"]

    third = _row(lines, 3)
    assert third[1] == "failed"
    assert third[2] == "—" and third[4] == "—"
    assert third[6:] == ["5.00", "·", "·"]  # absent hospitals are a dot, not an error


def test_round_table_for_ner_shows_entity_scores():
    rounds = [
        {
            "round": 1,
            "status": "ok",
            "train_loss": 0.9,
            "global": {"loss": 0.8, "precision": 0.5, "recall": 0.25, "f1": 1 / 3},
            "hospitals": {"hospital-0": {"trained": True, "epsilon": 1.0}},
        }
    ]
    lines = _render(round_table(rounds, task=NER))
    assert "entity F1" in "\n".join(lines)
    assert _row(lines, 1)[4:7] == ["0.500", "0.250", "0.333"]


def test_save_plot_writes_a_png_and_no_temporary_file(tmp_path):
    path = save_plot(_rounds(), tmp_path / "metrics.png")
    assert path == tmp_path / "metrics.png"
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.png"]


def test_save_plot_replaces_an_earlier_plot(tmp_path):
    path = tmp_path / "metrics.png"
    path.write_bytes(b"old")
    save_plot(_rounds()[:1], path, task=CLASSIFICATION)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_round_table_says_the_global_scores_are_over_all_hospitals_rows_pooled():
    text = " ".join(" ".join(_render(round_table(_rounds()))).split())
    assert "macro-F1: the global model's over all hospitals' validation notes pooled" in text
    ner = " ".join(" ".join(_render(round_table(_rounds(), task=NER))).split())
    assert "entity P/R/F1: the global model's over all hospitals' validation sentences" in ner


def test_the_table_names_the_unit_and_what_a_record_epsilon_means_per_patient():
    rounds = _one_round(
        {
            "hospital-0": {"trained": True, "epsilon": 8.0, "largest_patient": 12},
            "hospital-1": {"trained": True, "epsilon": 8.0, "largest_patient": 3},
        }
    )
    patient = "\n".join(_render(round_table(rounds, dp_unit="patient")))
    assert "patient-level DP, unit one patient" in patient
    assert "group privacy" not in patient  # nothing to qualify: the unit is the patient
    record = "\n".join(_render(round_table(rounds, dp_unit="record")))
    assert "record-level DP, unit one record (a note)" in record
    # the worst patient: 12 records at epsilon 8 per record, 96 per patient, delta no bound
    assert "largest patient has 12 training records" in record and "ε 96.0" in record
    assert "no bound at all" in record


def test_a_run_without_dp_does_not_claim_a_privacy_unit():
    rounds = _one_round({"hospital-0": {"trained": True, "epsilon": None}})
    text = " ".join(" ".join(_render(round_table(rounds, dp_unit="patient"))).split())
    assert "DP was OFF" in text and "patient-level DP" not in text


def test_a_run_in_which_no_hospital_trained_does_not_claim_dp_was_off():
    rounds = _one_round({"hospital-0": {"refused": "data.unreadable"}})
    rounds[0]["status"] = "failed: 0 usable update(s), fewer than min_hospitals (1)"
    text = " ".join(" ".join(_render(round_table(rounds, dp_unit="patient"))).split())
    assert "DP was OFF" not in text
    assert "no hospital trained in any round" in text


def test_metrics_png_names_its_axes_fits_its_unit_and_merges_identical_hospitals():
    from fedward.simulation.report import plot_figure

    rounds = _one_round(
        {
            "hospital-0": {"trained": True, "epsilon": 2.0},
            "hospital-1": {"trained": True, "epsilon": 2.0},
            "$\\notacommand$": {"trained": True, "epsilon": 1.0},
        }
    )
    figure = plot_figure(rounds, CLASSIFICATION, "patient")
    left, right = figure.axes
    assert left.get_ylabel()
    label = right.yaxis.label
    assert "all of a patient's records" in label.get_text().replace("\n", " ")
    figure.canvas.draw()  # a hospital name in math syntax does not fail the drawing
    extent = label.get_window_extent(figure.canvas.get_renderer())
    assert extent.y0 >= 0 and extent.y1 <= figure.bbox.height, "the ε label is cut off"
    legend = [text.get_text() for text in right.get_legend().get_texts()]
    assert legend == ["hospital-0, hospital-1", r"\$\notacommand\$"]


def test_the_vocabulary_line_of_a_hundred_hospitals_is_summarised():
    from fedward.simulation.report import coverage_line

    def rounds(shares: dict[str, float]) -> list[dict]:
        return _one_round({name: {"unknown_rate": share} for name, share in shares.items()})

    names = [f"hospital-{i}" for i in range(100)]
    line = coverage_line(rounds(dict.fromkeys(names, 0.0)))
    assert line == "unknown to the model's vocabulary: 0.0% at each of the 100 hospitals"
    shares = {name: 0.001 for name in names} | {"hospital-7": 0.05, "hospital-42": 0.02}
    line = coverage_line(rounds(shares))
    assert line.count("hospital-") == 3 and line.startswith(
        "unknown to the model's vocabulary: hospital-7 5.0%, hospital-42 2.0%, hospital-"
    )
    assert line.endswith("; the other 97 hospitals at most 0.1%")
