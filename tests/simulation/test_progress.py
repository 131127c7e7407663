"""Progress within a round: what the simulated hospitals append (simulation/app.py) and the
words `fedward simulate`'s progress bar shows from it."""

from __future__ import annotations

import json

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


def test_the_bar_says_which_epoch_each_hospital_trains_and_who_caches_the_prefix():
    """Issue 41, item 5: within a round of several minutes, the bar moves with every epoch."""
    lines = [
        '{"round": 1, "hospital": "hospital-0", "stage": "epoch 2/3"}',
        '{"round": 1, "hospital": "hospital-1", "stage": "epoch 1/3"}',
        '{"round": 1, "hospital": "hospital-2", "stage": "caching the frozen prefix"}',
        '{"round": 1, "hospital": "hospital-3", "stage": "encoding"}',
        '{"round": 1, "hospital": "hospital-4", "stage": "trained"}',
    ]
    assert describe_progress(lines) == (
        "round 1: encoding: hospital-3; caching the frozen prefix: hospital-2; "
        "epoch 2/3: hospital-0; epoch 1/3: hospital-1; 1 trained"
    )


def test_a_simulated_hospitals_round_records_encoding_the_prefix_cache_and_each_epoch(
    tiny_model_dir, tmp_path, monkeypatch
):
    """One real training request to the simulation's ClientApp (no Ray): the progress file
    gets the hospital's stages in the order they happen, one line per epoch."""
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedward.common.config import RunConfig
    from fedward.common.model import build_model, get_adapter_arrays
    from fedward.common.protocol import wire
    from fedward.simulation.app import build_simulation_client_app
    from fedward.simulation.hospitals import prepare_config

    for name, value in (("_run_id", 11), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)  # as Flower's runtime stamps messages
    config = prepare_config(
        RunConfig(
            model=tiny_model_dir,
            hospitals=2,
            rounds=1,
            local_epochs=3,
            notes_per_hospital=40,
            max_length=32,
            device="cpu",
            secure_aggregation=False,
            out=str(tmp_path),
        )
    )
    (tmp_path / PROGRESS_FILE).write_text("")  # as `fedward simulate` does
    arrays = get_adapter_arrays(build_model(config.spec, len(config.spec.task.labels)))
    content = RecordDict(
        {
            wire.ARRAYS: wire.arrays_to_record(arrays),
            wire.CONFIG: wire.round_config(config.spec, 1, "run-a"),
        }
    )
    message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)
    node_config = {"partition-id": 0, "num-partitions": 2}
    context = Context(
        run_id=11, node_id=1, node_config=node_config, state=RecordDict(), run_config={}
    )
    reply = build_simulation_client_app(config)(message, context)

    assert wire.REFUSAL not in reply.content
    lines = (tmp_path / PROGRESS_FILE).read_text(encoding="utf-8").splitlines()
    stages = [json.loads(line)["stage"] for line in lines]
    assert stages[1:] == [
        "encoding",
        "caching the frozen prefix",
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
        "trained",
    ], stages
    assert describe_progress(lines[:4]) == "round 1: epoch 1/3: hospital-0"
