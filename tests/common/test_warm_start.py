"""Starting a run from an adapter (common/warm_start.py, through `build_model`): what is loaded,
how labels meet, and what a crafted or altered adapter folder cannot do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedward.common.config import RunSpec
from fedward.common.errors import ModelError
from fedward.common.model import build_model, get_adapter_arrays, save_adapter
from fedward.common.warm_start import adapter_content_hash, label_mapping

PUBLIC_LABELS = ["cardiac", "respiratory", "oncology"]


def _spec(model_dir: str, labels: list[str] | None = None, **values) -> RunSpec:
    return RunSpec(
        **{"model": model_dir, "labels": labels, "max_length": 24, "lora_variant": "lora", **values}
    )


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture
def public_adapter(tiny_model_dir, tmp_path) -> Path:
    """An adapter as `fedward pretrain` leaves it: every LoRA factor and head value moved away
    from a fresh build's (so a test can tell loaded values from fresh ones)."""
    spec = _spec(tiny_model_dir, PUBLIC_LABELS, seed=7)
    model = build_model(spec, len(PUBLIC_LABELS))
    with torch.no_grad():
        for index, (_, parameter) in enumerate(model.named_parameters()):
            if parameter.requires_grad:
                parameter.add_(0.5 + index)
    return save_adapter(model, tmp_path / "public", PUBLIC_LABELS, spec.task, spec.model)


def _head(model) -> tuple[torch.Tensor, torch.Tensor]:
    params = _params(model)
    weight = next(
        v for k, v in params.items() if k.endswith("classifier.modules_to_save.default.weight")
    )
    bias = next(
        v for k, v in params.items() if k.endswith("classifier.modules_to_save.default.bias")
    )
    return weight, bias


def test_label_mapping_is_by_name_in_the_runs_order():
    mapping = label_mapping(["a", "b", "c"], ["c", "a", "z"])
    assert mapping.as_dict() == {"kept": ["c", "a"], "new": ["z"], "dropped": ["b"]}
    assert "1 new (fresh head rows) (z)" in mapping.describe()
    # names are matched exactly: a differently cased tag is a new label, not a kept one
    assert label_mapping(["B-Disease"], ["B-disease"]).new == ("B-disease",)


def test_known_labels_keep_their_rows_new_ones_start_as_a_cold_run_and_dropped_leave_nothing(
    tiny_model_dir, public_adapter
):
    run_labels = ["respiratory", "renal", "cardiac"]  # reordered, one new, oncology dropped
    warm = build_model(_spec(tiny_model_dir, run_labels, init_adapter=str(public_adapter)), 3)
    cold = build_model(_spec(tiny_model_dir, run_labels), 3)
    public = build_model(_spec(tiny_model_dir, PUBLIC_LABELS, init_adapter=str(public_adapter)), 3)
    warm_w, warm_b = _head(warm)
    cold_w, cold_b = _head(cold)
    public_w, public_b = _head(public)
    # the head has one row per run label, no more: a dropped label's row is not carried along
    assert warm_w.shape[0] == warm_b.shape[0] == 3
    assert torch.equal(warm_w[0], public_w[1]) and torch.equal(warm_b[0], public_b[1])  # resp.
    assert torch.equal(warm_w[2], public_w[0]) and torch.equal(warm_b[2], public_b[0])  # cardiac
    # the new label's row is exactly the fresh one every hospital builds from the seed
    assert torch.equal(warm_w[1], cold_w[1]) and torch.equal(warm_b[1], cold_b[1])
    # the LoRA factors are the adapter's, not fresh ones
    warm_lora = {k: v for k, v in _params(warm).items() if "lora_" in k}
    cold_lora = {k: v for k, v in _params(cold).items() if "lora_" in k}
    public_lora = {k: v for k, v in _params(public).items() if "lora_" in k}
    assert warm_lora.keys() == public_lora.keys() and warm_lora
    assert all(torch.equal(warm_lora[k], public_lora[k]) for k in warm_lora)
    assert not any(torch.equal(warm_lora[k], cold_lora[k]) for k in warm_lora)


def test_head_only_from_a_lora_adapter_keeps_its_factors_frozen_and_off_the_wire(
    tiny_model_dir, public_adapter
):
    start = str(public_adapter)
    warm_head = build_model(
        _spec(tiny_model_dir, PUBLIC_LABELS, init_adapter=start, lora_variant="head"), 3
    )
    warm_lora = build_model(_spec(tiny_model_dir, PUBLIC_LABELS, init_adapter=start), 3)
    lora_values = {k: v for k, v in _params(warm_lora).items() if "lora_" in k}
    for name, parameter in warm_head.named_parameters():
        if "lora_" in name:
            assert not parameter.requires_grad
            assert torch.equal(parameter, lora_values[name])  # the public encoder adaptation
    assert all("lora_" not in name for name in get_adapter_arrays(warm_head))


def test_same_spec_and_adapter_give_bit_identical_starting_arrays(tiny_model_dir, public_adapter):
    """What a hospital compares the coordinator's first global adapter with (client/app.py)."""
    spec = _spec(tiny_model_dir, ["cardiac", "renal"], init_adapter=str(public_adapter))
    first, second = (get_adapter_arrays(build_model(spec, 2)) for _ in range(2))
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)


def test_an_adapter_with_more_head_rows_than_labels_it_names_is_refused(
    tiny_model_dir, public_adapter
):
    """A crafted fedward.json that hides a row (two labels named, three rows) cannot ride along
    under a name: the adapter is refused."""
    meta_path = public_adapter / "fedward.json"
    meta = json.loads(meta_path.read_text())
    meta["labels"] = ["cardiac", "respiratory"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="3 rows for 2 labels"):
        build_model(
            _spec(tiny_model_dir, ["cardiac", "respiratory"], init_adapter=str(public_adapter)), 2
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora_rank": 4}, "lora_rank"),
        ({"lora_layers": 1}, "lora_layers"),
        ({"lora_alpha": 32.0}, "lora_alpha"),
        ({"task": "ner", "labels": ["O", "B-X", "I-X"]}, "trained for 'classification'"),
    ],
)
def test_an_adapter_that_does_not_fit_the_run_is_one_error_naming_the_field(
    tiny_model_dir, public_adapter, change, message
):
    values = {"labels": PUBLIC_LABELS, **change}
    spec = _spec(tiny_model_dir, init_adapter=str(public_adapter), **values)
    with pytest.raises(ModelError, match="init_adapter") as error:
        build_model(spec, len(spec.task.labels))
    assert message in str(error.value)


def test_an_adapter_of_another_base_model_is_refused(tiny_model_dir, public_adapter):
    meta_path = public_adapter / "fedward.json"
    meta = json.loads(meta_path.read_text())
    meta["model"] = "/models/some-other-bert"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="base model '/models/some-other-bert'"):
        build_model(_spec(tiny_model_dir, PUBLIC_LABELS, init_adapter=str(public_adapter)), 3)


def test_a_pickled_adapter_is_never_loaded(tiny_model_dir, public_adapter):
    """PEFT can also save `adapter_model.bin`, a pickle that can run code when read: a starting
    adapter is read only from safetensors."""
    weights = public_adapter / "adapter_model.safetensors"
    weights.rename(public_adapter / "adapter_model.bin")
    with pytest.raises(ModelError, match="not a fedward adapter folder"):
        build_model(_spec(tiny_model_dir, PUBLIC_LABELS, init_adapter=str(public_adapter)), 3)


def test_the_content_hash_covers_weights_labels_and_settings_but_not_the_folders_name(
    public_adapter, tmp_path
):
    original = adapter_content_hash(public_adapter)
    moved = shutil.copytree(public_adapter, tmp_path / "elsewhere" / "renamed")
    assert adapter_content_hash(moved) == original
    # two labels' names swapped: same bytes of weights, other meaning -> other hash
    meta = json.loads((moved / "fedward.json").read_text())
    meta["labels"][0], meta["labels"][1] = meta["labels"][1], meta["labels"][0]
    (moved / "fedward.json").write_text(json.dumps(meta, indent=2))
    assert adapter_content_hash(moved) != original
    shutil.rmtree(moved)
    moved = shutil.copytree(public_adapter, tmp_path / "again")
    config = json.loads((moved / "adapter_config.json").read_text())
    config["lora_alpha"] = 64  # the same factors scaled 4x
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert adapter_content_hash(moved) != original
    with pytest.raises(ModelError, match="not a fedward adapter folder"):
        adapter_content_hash(tmp_path)


def test_classification_trains_lora_by_default_when_it_starts_from_an_adapter():
    """The default follows bench/results/warm_start.md: head from a fresh adapter, LoRA from a
    starting one; a variant the run names is kept either way."""
    assert RunSpec(labels=["a", "b"]).model.lora_variant == "head"
    assert RunSpec(labels=["a", "b"], init_adapter="/m/a").model.lora_variant == "lora"
    named = RunSpec(labels=["a", "b"], init_adapter="/m/a", lora_variant="head")
    assert named.model.lora_variant == "head"
    assert RunSpec(task="ner", init_adapter="/m/a").model.lora_variant == "lora"
