"""What the tests of a real hospital's gates share: its site policy, its secure-aggregation
identity and the run spec it is asked to train (tests/client/test_site.py and the attack tests)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fedward.client.secagg import write_signing_key
from fedward.common.config import RunConfig

LABELS = ["cardiac", "respiratory"]
WORDS = {
    "cardiac": "chest pain radiating to the left arm with sweating and troponin rise",
    "respiratory": "productive cough with fever and crackles at the right lung base",
}


def write_notes(
    path: Path, columns: tuple[str, ...] = ("text", "label"), marker: str = "", relabel: str = ""
) -> None:
    """40 notes alternating the two labels, as a CSV with `columns` (a third column holds the
    row number). `marker` is written into every note; `relabel` replaces every tenth label."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for i in range(40):
            label = relabel if relabel and i % 10 == 0 else LABELS[i % 2]
            text = f"patient {marker}{i}: {WORDS[LABELS[i % 2]]}"
            writer.writerow([text, label, i][: len(columns)])


#: Content hashes of the models the tests' site policies pin (tests/client/conftest.py puts the
#: tiny model's here): a deployed hospital trains only a pinned model or the packaged default.
PINNED_MODEL_HASHES: list[str] = []


def write_policy(path: Path, **rules) -> None:
    """A site policy with `rules` over these defaults (updates travel unmasked unless a test
    asks for secure aggregation; the tiny test model pinned)."""
    values = {
        "lifetime_epsilon": 6.0,
        "min_examples": 10,
        "require_secure_aggregation": False,
        **({"allowed_model_hashes": PINNED_MODEL_HASHES} if PINNED_MODEL_HASHES else {}),
        **rules,
    }
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))


def write_secagg_policy(path: Path, hospital: str, **rules) -> None:
    """A policy with a signing key for `hospital` and a roster of it and one peer, so that a
    two-hospital secure round is accepted."""
    own = write_signing_key(path.parent / "own.pem")
    peer = write_signing_key(path.parent / "peer.pem")
    write_policy(
        path,
        secagg_signing_key=str(path.parent / "own.pem"),
        min_secure_aggregation_hospitals=2,
        **rules,
    )
    with path.open("a", encoding="utf-8") as policy:
        policy.write(f'[secagg_roster]\n{hospital} = "{own}"\npeer = "{peer}"\n')


def run_config(model_dir: str, rounds: int) -> RunConfig:
    """A small run spending epsilon 5 over `rounds` rounds (of a site's 6), updates unmasked."""
    return RunConfig(
        model=model_dir,
        labels=LABELS,
        rounds=rounds,
        target_epsilon=5.0,
        batch_size=8,
        max_length=24,
        secure_aggregation=False,
        device="cpu",
    )


def hospital_node_config(data: Path, policy: Path, folder: Path) -> dict[str, str]:
    """Hospital st-mary's node config: its data, its policy, its ledger and audit log in
    `folder`, on the CPU."""
    return {
        "data-path": str(data),
        "policy": str(policy),
        "ledger": str(folder / "ledger"),
        "audit-log": str(folder / "ledger" / "audit.jsonl"),
        "hospital-name": "st-mary",
        "dataset-id": "st-mary",
        "device": "cpu",
    }


def deployed_secure_round(
    config: RunConfig,
    hospitals: dict[int, dict],
    run_id: str,
    server_round: int,
    **session_options,
):
    """One SecAgg+ round over deployed hospitals' real handlers (`handle_train`, then
    `handle_secagg_stage` for each later stage), the coordinator's side played by a real
    `SecAggServerSession` (`session_options`: bits, max_weight, encoding...); `hospitals` maps
    node ids to node configs. Every hospital starts from the run's initial adapter. Returns what
    the coordinator unmasks (`SecAggResult`); a refusal fails the test, naming its reason."""
    from flwr.app import Context, Message, MessageType, RecordDict

    from fedward.client.app import handle_secagg_stage, handle_train, load_site_data, open_site
    from fedward.common.model import build_model, get_adapter_arrays
    from fedward.common.protocol import wire
    from fedward.common.secagg import CONSISTENCY_CHECK, MASKED_UPDATE, SHARE_KEYS, UNMASK
    from fedward.server.secagg import SecAggServerSession

    arrays = get_adapter_arrays(build_model(config.spec, len(config.spec.task.labels)))
    size = sum(a.size for a in arrays.values())
    session = SecAggServerSession(run_id, server_round, list(hospitals), size, **session_options)
    contexts = {
        node: Context(run_id=11, node_id=node, node_config=nc, state=RecordDict(), run_config={})
        for node, nc in hospitals.items()
    }
    payloads = {}
    for node, request in session.advertise_keys_requests().items():
        content = RecordDict(
            {
                wire.ARRAYS: wire.arrays_to_record(arrays),
                wire.CONFIG: wire.round_config(config.spec, server_round, run_id),
                wire.SECAGG: wire.payload_to_records(request)[0],
            }
        )
        message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
        reply = handle_train(message, contexts[node], load_site_data, open_site)
        assert wire.REFUSAL not in reply.content, dict(reply.content[wire.REFUSAL])
        payloads[node] = wire.records_to_payload(reply.content[wire.SECAGG])
    for stage, next_requests in (
        (SHARE_KEYS, session.share_keys_requests),
        (MASKED_UPDATE, session.masked_update_requests),
        (CONSISTENCY_CHECK, session.consistency_requests),
        (UNMASK, session.unmask_requests),
    ):
        requests, payloads = next_requests(payloads), {}
        for node, request in requests.items():
            record, vector = wire.payload_to_records(request)
            content = RecordDict({wire.SECAGG: record})
            if vector is not None:
                content[wire.ARRAYS] = vector
            message = Message(
                content=content, message_type=wire.SECAGG_STAGE_TYPES[stage], dst_node_id=node
            )
            reply = handle_secagg_stage(message, contexts[node], stage)
            assert wire.REFUSAL not in reply.content, dict(reply.content[wire.REFUSAL])
            payloads[node] = wire.records_to_payload(
                reply.content[wire.SECAGG], reply.content.get(wire.ARRAYS)
            )
    return session.aggregate(payloads)
