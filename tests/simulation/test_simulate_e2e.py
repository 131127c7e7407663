"""End to end: whole federated simulations on Flower's simulation runtime, with the tiny model.

Each simulation starts Ray (5-10 s) and trains 2 hospitals for 1-2 rounds on 40 synthetic notes
each; the runs are shared between tests through module-scoped fixtures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedward.client.privacy.accounting import compose_epsilon, plan_distributed
from fedward.common.config import RunConfig
from fedward.common.model import adapter_spec, build_base, build_model, get_adapter_arrays
from fedward.common.secagg import quantization_bound
from fedward.common.tasks import CLASSIFICATION
from fedward.server.app import kept_round
from fedward.simulation.hospitals import prepare_config
from fedward.simulation.runner import simulate

HOSPITALS = ["hospital-0", "hospital-1"]


def _config(tiny_model_dir: str, out: Path, **options) -> RunConfig:
    values = {
        "model": tiny_model_dir,
        "hospitals": 2,
        "min_hospitals": 2,
        "rounds": 2,
        "notes_per_hospital": 40,
        "max_length": 64,
        "device": "cpu",
        "out": str(out),
    }
    return RunConfig(**{**values, **options})


def _initial_adapter(config: RunConfig) -> dict[str, np.ndarray]:
    config = prepare_config(config)
    return get_adapter_arrays(build_model(config.spec, len(config.spec.task.labels)))


def _load_with_peft(config: RunConfig, adapter_dir: Path) -> dict[str, np.ndarray]:
    """The adapter as a user loads it: a fresh base model + `PeftModel.from_pretrained`."""
    from peft import PeftModel

    labels = json.loads((adapter_dir / "fedward.json").read_text(encoding="utf-8"))["labels"]
    base = build_base(CLASSIFICATION, config.spec.model.name, len(labels))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    spec = adapter_spec(build_model(prepare_config(config).spec, len(labels)))
    parameters = dict(model.named_parameters())
    return {item.name: parameters[item.name].detach().numpy().copy() for item in spec}


@pytest.fixture(scope="module")
def plain_run(tiny_model_dir, tmp_path_factory):
    config = _config(
        tiny_model_dir, tmp_path_factory.mktemp("plain") / "out", secure_aggregation=False
    )
    return config, simulate(config)


@pytest.fixture(scope="module")
def secure_run(tiny_model_dir, tmp_path_factory):
    config = _config(
        tiny_model_dir, tmp_path_factory.mktemp("secure") / "out", secure_aggregation=True
    )
    return config, simulate(config)


def _check_run(config: RunConfig, result) -> list[dict]:
    """What a user of any DP run must find in the output folder."""
    out = Path(config.local.out)
    assert result.out == out
    assert (out / "adapter" / "adapter_config.json").is_file()

    initial = _initial_adapter(config)
    loaded = _load_with_peft(config, out / "adapter")
    assert loaded.keys() == initial.keys()
    assert any(not np.allclose(loaded[name], initial[name]) for name in initial), (
        "adapter never moved"
    )
    # the saved adapter is the kept round's (keep_adapter = best): the last round's global
    # adapter when that round scored best, an earlier one's otherwise
    assert result.kept_round == kept_round(result.rounds, "macro_f1")
    if result.kept_round == result.rounds[-1]["round"]:
        for name in loaded:
            np.testing.assert_array_equal(loaded[name], result.arrays[name])
    else:
        assert any(not np.array_equal(loaded[name], result.arrays[name]) for name in loaded)

    history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    rows = history["rounds"]
    assert [row["round"] for row in rows] == [1, 2]
    assert rows == result.rounds
    previous = {name: 0.0 for name in HOSPITALS}
    for row in rows:
        assert row["status"] == "ok", row["status"]
        assert row["secure_aggregation"] is config.spec.secagg.secure_aggregation
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["global"]["loss"])
        assert sorted(row["hospitals"]) == HOSPITALS
        for name in HOSPITALS:
            epsilon = row["hospitals"][name]["epsilon"]
            assert previous[name] < epsilon <= config.spec.privacy.target_epsilon * (1 + 1e-3)
            previous[name] = epsilon
    # The noise is planned for the whole run: the last round spends (nearly) all of it.
    assert all(epsilon > 0.9 * config.spec.privacy.target_epsilon for epsilon in previous.values())
    return rows


def test_plain_fedavg_run_trains_saves_and_records_epsilon(plain_run):
    config, result = plain_run
    _check_run(config, result)


def test_secure_aggregation_run_trains_saves_and_records_epsilon(secure_run):
    config, result = secure_run
    rows = _check_run(config, result)
    assert all(not row["dropped"] and not row["refused"] for row in rows)


def test_the_saved_adapter_predicts_with_fedward_predict(plain_run):
    from fedward.simulation.predict import predict_texts

    config, result = plain_run
    lines = predict_texts(
        result.adapter_dir, ["fever, productive cough, crackles at the right base"]
    )
    note, *shown = lines[0].splitlines()  # the note, then the 3 likeliest labels
    assert note.startswith("fever, productive cough") and len(shown) == 3
    label = shown[0].strip().rsplit(" ", 1)[0].strip()
    assert label in prepare_config(config).spec.task.labels


def test_every_hospital_ends_with_its_own_model_and_its_alone_global_own_figures(secure_run):
    from fedward.simulation.predict import predict_texts

    config, result = secure_run
    last = result.rounds[-1]["hospitals"]
    for name in HOSPITALS:
        figures = {key: last[name][f"personal_{key}"] for key in ("alone", "global", "own")}
        assert all(0.0 <= value <= 1.0 for value in figures.values()), figures
        own = Path(config.local.out) / "own" / name
        report = json.loads((own / "report.json").read_text(encoding="utf-8"))
        assert report["hospital"] == name and report["own"] == pytest.approx(figures["own"], 1e-3)
        assert predict_texts(own, ["fever, productive cough"])[0].startswith("fever")
    # a hospital's figures are its own: never averaged into the global model's metrics
    assert not any(key.startswith("personal") for key in result.rounds[-1]["global"])
    assert all("personal_own" not in h for h in result.rounds[0]["hospitals"].values())


def test_secure_aggregation_gives_the_plain_fedavg_adapter(tiny_model_dir, tmp_path):
    """Masks cancel: without DP noise (training is then seeded), both give the same average."""
    common = {"dp": False, "rounds": 1, "learning_rate": 0.05}
    plain = simulate(
        _config(tiny_model_dir, tmp_path / "plain", secure_aggregation=False, **common)
    )
    config = _config(tiny_model_dir, tmp_path / "secure", secure_aggregation=True, **common)
    secure = simulate(config)
    initial = _initial_adapter(config)
    # Stochastic rounding moves the average by less than one quantization step (plus float32).
    tolerance = (
        quantization_bound(config.spec.secagg.secagg_clip, config.spec.secagg.secagg_bits) + 1e-6
    )

    moved = max(float(np.abs(plain.arrays[n] - initial[n]).max()) for n in initial)
    assert moved > 50 * tolerance  # the comparison below means something
    for name in initial:
        np.testing.assert_allclose(secure.arrays[name], plain.arrays[name], rtol=0, atol=tolerance)
    assert secure.rounds[0]["global"]["loss"] == pytest.approx(
        plain.rounds[0]["global"]["loss"], abs=1e-4
    )
    torch.testing.assert_close(
        torch.tensor(secure.rounds[0]["hospitals"]["hospital-0"]["train_loss"]),
        torch.tensor(plain.rounds[0]["hospitals"]["hospital-0"]["train_loss"]),
    )


def test_a_head_only_run_sends_and_saves_only_the_task_head(tiny_model_dir, tmp_path):
    """`lora_variant = "head"`: only the classifier travels (securely aggregated, under DP), the
    saved adapter's LoRA factors are the untrained ones (B = 0, so the encoder is the base
    model's), and the head moved."""
    config = _config(tiny_model_dir, tmp_path / "out", lora_variant="head")
    result = simulate(config)
    _check_run(config, result)
    assert result.arrays and all("modules_to_save" in name for name in result.arrays)
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in saved.items() if ".lora_B." in name]
    assert lora_b and all(not tensor.any() for tensor in lora_b)


def test_a_distributed_noise_run_masks_integer_shares_and_steps_on_their_sum(
    tiny_model_dir, tmp_path
):
    """Issue 39 through Flower's runtime: each hospital's noisy gradient sum travels in SecAgg+'s
    integer encoding, the coordinator steps on the unmasked sum, every hospital's accountant
    charges the run's plan (one step a round at the full multiplier) up to the target."""
    config = _config(
        tiny_model_dir,
        tmp_path / "out",
        noise="distributed",
        noise_hospitals=2,
        dp_unit="record",
    )
    result = simulate(config)
    rows = _check_run(config, result)
    assert all(not row["dropped"] and not row["refused"] for row in rows)
    history = json.loads((tmp_path / "out" / "history.json").read_text(encoding="utf-8"))
    assert history["config"]["noise"] == "distributed"
    spec = prepare_config(config).spec
    plan = plan_distributed(spec.privacy, spec.federation.rounds)
    for row in rows:
        # One step a round at the full multiplier: the accountant's figure after round r.
        expected = compose_epsilon([(plan.noise_multiplier, plan.sample_rate, row["round"])], 1e-5)
        for name in HOSPITALS:
            assert row["hospitals"][name]["epsilon"] == pytest.approx(expected, rel=1e-6)
