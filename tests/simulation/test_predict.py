"""`fedward predict` as a user reads it: the note, then the three most likely labels with their
probabilities (or the entities found, with spans), on a real adapter folder of a tiny model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedward.common.config import RunConfig
from fedward.common.model import build_model, save_adapter
from fedward.simulation.predict import predict_texts

FEDWARD = str(Path(sys.executable).parent / "fedward")
LABELS = ["asthma", "heart failure", "pneumonia", "sepsis", "stroke"]
NOTE = "68F with fever, productive cough, RLL crackles"
#: "  <label padded>  <probability>": one line per label, indented under the note.
LABEL_LINE = re.compile(r"^  (\S.*?) {2,}(\d\.\d{3})$")


def _adapter(model_dir: str, folder: Path, task: str, labels: list[str]) -> Path:
    config = RunConfig(task=task, model=model_dir, labels=labels, max_length=32)
    return save_adapter(
        build_model(config.spec, len(labels)), folder, labels, config.spec.task, config.spec.model
    )


@pytest.fixture(scope="module")
def classifier(tiny_model_dir, tmp_path_factory) -> Path:
    return _adapter(
        tiny_model_dir, tmp_path_factory.mktemp("predict") / "adapter", "classification", LABELS
    )


def _labels(block: str) -> list[tuple[str, float]]:
    lines = block.splitlines()
    matches = [LABEL_LINE.match(line) for line in lines[1:]]
    assert all(matches), block
    return [(match.group(1), float(match.group(2))) for match in matches]


def test_predict_shows_the_note_then_three_labels_most_likely_first(classifier):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [FEDWARD, "predict", "--adapter", str(classifier), NOTE, "34F dysuria, no fever"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    first, second = run.stdout.rstrip("\n").split("\n\n")  # a blank line between notes
    assert first.splitlines()[0] == NOTE and second.splitlines()[0] == "34F dysuria, no fever"
    for block in (first, second):
        shown = _labels(block)
        assert len(shown) == 3
        assert {label for label, _ in shown} <= set(LABELS)
        probabilities = [probability for _, probability in shown]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) <= 1.0 + 1e-3
        # the probabilities line up in one column
        assert len({line.rindex(" ") for line in block.splitlines()[1:]}) == 1


def test_top_asks_for_more_or_fewer_labels(classifier):
    (one,) = predict_texts(classifier, [NOTE], top=1)
    (every,) = predict_texts(classifier, [NOTE], top=10)  # more than there are: all of them
    assert len(_labels(one)) == 1
    assert sorted(label for label, _ in _labels(every)) == LABELS
    assert sum(probability for _, probability in _labels(every)) == pytest.approx(1.0, abs=3e-3)
    assert _labels(every)[0] == _labels(one)[0]


def test_top_below_one_is_a_usage_error(classifier):
    run = subprocess.run(
        [FEDWARD, "predict", "--adapter", str(classifier), "--top", "0", NOTE],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 2 and "--top" in run.stderr and "Traceback" not in run.stderr


def test_ner_lists_one_entity_per_line_under_the_note(tiny_model_dir, tmp_path):
    labels = ["O", "B-Disease", "I-Disease"]
    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", "ner", labels)
    text = "Patient with chest pain, started aspirin for coronary artery disease."
    (block,) = predict_texts(adapter, [text])
    note, *lines = block.splitlines()
    assert note == text and lines
    for line in lines:
        # an untrained model may find nothing; what it finds has a span into the note
        entity = re.fullmatch(r"  Disease '(.*)' \[(\d+):(\d+)\]", line)
        assert line == "  (no entities)" or (
            entity and text[int(entity.group(2)) : int(entity.group(3))] == entity.group(1)
        ), line
