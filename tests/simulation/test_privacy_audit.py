"""The privacy audit can fail: it finds canaries without DP, stays below the accounted epsilon
with DP, and raises a bound above the accounted epsilon when DP is broken on purpose (the
breakage injected here, never a switch in the product).

At test scale (a 1-layer random BERT without position embeddings, 500 canaries, 4 notes, 2
rounds of 20 local epochs) the ceiling of the bound is 4.54. Measured on this set-up
(2026-12-05; the DP noise comes from the operating system, so each run differs): with DP at
epsilon 1, 0.00; the noise multiplier divided by 10, 1.83-2.19 in five runs (caught); clipping
switched off with the noise left as the accountant set it, 0.82-1.21 in five runs (not reliably
caught, so not asserted: see bench/results/privacy_audit.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from privacy_audit_training import LABELS, audit_config, audit_in_process, save_audit_model
from typer.testing import CliRunner

import fedward.client.privacy.dp_sgd as dp_sgd
from fedward.common.config import RunConfig
from fedward.common.errors import ConfigError
from fedward.common.model import load_tokenizer
from fedward.simulation.privacy_audit.audit import run_privacy_audit
from fedward.simulation.privacy_audit.canaries import canary_vocabulary, draw_canaries
from fedward.simulation.privacy_audit.scoring import count_guesses, label_centred


@pytest.fixture(scope="module")
def audit_model_dir(tmp_path_factory) -> str:
    return save_audit_model(tmp_path_factory.mktemp("audit-bert"))


def test_canaries_are_random_text_with_random_labels_half_included(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    drawn = draw_canaries(tokenizer, LABELS, 400, seed=1)
    vocabulary = set(canary_vocabulary(tokenizer))
    assert len(drawn) == 400 and 160 < sum(drawn.included) < 240
    assert len(drawn.inserted()) == sum(drawn.included)
    assert {record.label for record in drawn.records} == set(LABELS)
    assert all(set(record.text.split()) <= vocabulary for record in drawn.records)
    assert len({record.text for record in drawn.records}) == 400
    assert draw_canaries(tokenizer, LABELS, 400, seed=1) == drawn
    # Without a seed the inclusion comes from the operating system, not the run's seed.
    assert draw_canaries(tokenizer, LABELS, 400).included != drawn.included


def test_guesses_count_the_top_as_in_and_the_bottom_as_out():
    scores = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert count_guesses(scores, [True, True, False, True, False, False], 2) == (4, 4)
    assert count_guesses(scores, [False, True, False, True, False, True], 1) == (2, 0)
    with pytest.raises(ValueError):
        count_guesses(scores, [True] * 6, 4)


def test_label_centring_removes_what_a_whole_label_gained():
    centred = label_centred([1.0, 3.0, 10.0, 12.0], [0, 0, 1, 1])
    assert np.allclose(centred, [-1.0, 1.0, -1.0, 1.0])


def test_without_dp_the_audit_finds_the_canaries(audit_model_dir):
    result = audit_in_process(audit_config(audit_model_dir, dp=False))
    assert result.accounted_epsilon is None
    assert result.epsilon_lower_bound > 1.0, result  # clearly above 0: the audit has teeth
    assert result.ceiling == pytest.approx(4.54, abs=0.01)


def test_with_dp_the_bound_stays_below_the_accounted_epsilon(audit_model_dir):
    result = audit_in_process(audit_config(audit_model_dir, dp=True, target_epsilon=1.0))
    assert result.accounted_epsilon == pytest.approx(1.0, abs=0.01)
    assert result.epsilon_lower_bound < result.accounted_epsilon, result
    assert not result.contradicts_accounting


def test_dp_with_a_tenth_of_its_noise_is_caught(audit_model_dir, monkeypatch):
    """The accountant still charges epsilon 1, the trainer adds a tenth of the noise."""
    honest = dp_sgd.make_private

    def too_little_noise(module, optimizer, loader, plan, *args, **kwargs):
        weak = dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier / 10)
        return honest(module, optimizer, loader, weak, *args, **kwargs)

    monkeypatch.setattr(dp_sgd, "make_private", too_little_noise)
    result = audit_in_process(audit_config(audit_model_dir, dp=True, target_epsilon=1.0))
    assert result.accounted_epsilon == pytest.approx(1.0, abs=0.01)
    assert result.epsilon_lower_bound > result.accounted_epsilon, result
    assert result.contradicts_accounting


def test_the_command_is_on_the_audit_group_and_refuses_what_it_cannot_audit(tiny_model_dir):
    from fedward.cli import app

    help_text = CliRunner().invoke(app, ["audit", "privacy", "--help"]).output
    assert "--canaries" in help_text and "--target-epsilon" in help_text
    with pytest.raises(ConfigError, match="task"):
        run_privacy_audit(RunConfig(task="ner", model=tiny_model_dir, labels=["O", "B-X"]))
    with pytest.raises(ConfigError, match="--hospital"):
        run_privacy_audit(RunConfig(model=tiny_model_dir, hospitals=2), hospital=2)
