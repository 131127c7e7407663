"""Tests for the warm-start benchmark's own arithmetic (bench/warm_start.py): the public split
and the table rendered from the run log."""

from __future__ import annotations

import json

from bench import warm_start


def test_the_public_part_is_a_seeded_disjoint_sample_of_the_training_split():
    public, private = warm_start.public_split(1000, 0.2, seed=42)
    assert len(public) == 200 and len(private) == 800
    assert not set(public) & set(private) and sorted(public + private) == list(range(1000))
    assert warm_start.public_split(1000, 0.2, seed=42) == (public, private)
    assert warm_start.public_split(1000, 0.2, seed=7)[0] != public
    # not the first 20%: a corpus in document order would otherwise give one topic away
    assert public != list(range(200))


def test_the_table_shows_the_mean_of_each_cell_and_its_runs(tmp_path):
    log = tmp_path / "runs.jsonl"
    runs = [
        {"cell": "warm", "epsilon": 8.0, "score": 0.5},
        {"cell": "warm", "epsilon": 8.0, "score": 0.6},
        {"cell": "pooled", "epsilon": None, "score": 0.7},
    ]
    common = {"corpus": "ner", "public_fraction": 0.2, "variant": "lora"}
    log.write_text("".join(json.dumps({**common, **run}) + "\n" for run in runs))
    table = warm_start.table(log)
    assert "| ner | 20% | warm | lora | 8 | 0.550 (0.500, 0.600) |" in table
    assert "| ner | 20% | pooled | lora | no DP | 0.700 |" in table
