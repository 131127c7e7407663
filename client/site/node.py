"""A deployed hospital's settings, read from its SuperNode's node config.

`fedward client start` writes the node config:

    data-path      the hospital's data file (CSV/JSONL, or CoNLL for NER)
    policy         the site policy TOML (read again for every request, so an edit applies at once)
    ledger         folder of the privacy ledgers (one file per data set) and released updates
    dataset-id     the name of this data set's privacy ledger (required: a file name an operator
                   may change must not start a fresh lifetime budget)
    audit-log      the hospital's own hash-chained audit log (default: <ledger>/audit.jsonl)
    hospital-name  the name this hospital reports
    device         where this hospital trains (auto, cpu, cuda); overrides the run's choice

A setting that cannot be used refuses every request with a reason fit for the coordinator; the
details (paths, values) go to this hospital's log only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from fedward.client.deploy.node_config import (
    AUDIT_KEY,
    CACHE_KEYS,
    DATA_KEY,
    DATASET_KEY,
    DEVICE_KEY,
    LEDGER_KEY,
    POLICY_KEY,
)
from fedward.client.policy import SitePolicy
from fedward.client.privacy.ledger import check_identifier
from fedward.common.config import DataSchema, LocalSettings
from fedward.common.errors import ConfigError, PolicyError
from fedward.common.protocol.reasons import Reason

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Node-config keys of the hospital's data schema (`fedward client start --text-column ...`).
SCHEMA_KEYS = tuple(name.replace("_", "-") for name in DataSchema.model_fields)


def site_settings(node_config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The arguments of `Site` for the hospital a node config describes; the policy is read now.

    Args:
        node_config: The SuperNode's node config.
        name: The hospital's name.

    Returns:
        `Site`'s keyword arguments.

    Raises:
        PolicyError: a missing key or an unusable setting, with a reason fit for the
            coordinator (`policy.not_configured`, `policy.file_invalid`,
            `policy.schema_invalid`); the details go to this hospital's log.
    """
    required = (DATA_KEY, POLICY_KEY, LEDGER_KEY, DATASET_KEY)
    missing = [key for key in required if not node_config.get(key)]
    if missing:
        raise PolicyError(
            f"hospital {name} is not set up for deployment (node config lacks "
            f"{', '.join(missing)}); it must be started with `fedward client start`",
            reason=Reason("policy.not_configured"),
        )
    device = node_config.get(DEVICE_KEY) or None
    if device not in (None, "auto", "cpu", "cuda"):
        raise PolicyError(
            f"hospital {name}: node config 'device' must be auto, cpu or cuda",
            reason=Reason("policy.not_configured"),
        )
    ledger_dir = Path(str(node_config[LEDGER_KEY]))
    audit_path = Path(str(node_config.get(AUDIT_KEY) or ledger_dir / "audit.jsonl"))
    policy = _node_setting(
        name,
        "its site policy file cannot be used",
        "policy.file_invalid",
        lambda: SitePolicy.load(str(node_config[POLICY_KEY])),
    )
    schema = _node_setting(
        name,
        "its data schema in the node config is invalid",
        "policy.schema_invalid",
        lambda: DataSchema.build(
            {key: node_config[key] for key in SCHEMA_KEYS if key in node_config},
            source="node config",
        ),
    )
    dataset_id = _dataset_id(node_config, name)
    cache = {key.replace("-", "_"): node_config[key] for key in CACHE_KEYS if key in node_config}
    _node_setting(
        name,
        "its local settings (prefix cache, own model) in the node config are invalid",
        "policy.not_configured",
        lambda: LocalSettings.build(cache, source="node config"),
    )
    return {
        "name": name,
        "data_path": Path(str(node_config[DATA_KEY])),
        "policy": policy,
        "ledger_dir": ledger_dir,
        "audit_path": audit_path,
        "device": device,
        "schema": schema,
        "dataset_id": dataset_id,
        "cache": cache,
    }


def _dataset_id(node_config: Mapping[str, Any], name: str) -> str:
    dataset_id = str(node_config[DATASET_KEY])
    try:
        check_identifier(dataset_id, "data-set id")
    except PolicyError:
        log.error("%s: node config 'dataset-id' %r is not a plain identifier", name, dataset_id)
        raise PolicyError(
            f"hospital {name}: its data-set id in the node config is invalid (details in "
            "the hospital's log); every request is refused until it is fixed"
        ) from None
    return dataset_id


def _node_setting(name: str, problem: str, reason: str, read: Callable[[], T]) -> T:
    """`read()`, or a `PolicyError` that says only `problem`: the details (paths, values) go to
    this hospital's log, never to the coordinator."""
    try:
        return read()
    except ConfigError as exc:
        log.error("%s: %s", name, exc)
        raise PolicyError(
            f"hospital {name}: {problem} (details in the hospital's log); every request is "
            "refused until it is fixed",
            reason=Reason(reason),
        ) from None
