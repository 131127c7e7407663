"""The contract between `fedward client start` (client/deploy/supernode.py), the SuperNode it starts
and the hospital's own ClientApp process (client/deploy/runtime.py, client/site/): the node-config
keys that carry the hospital's paths and settings, and the environment every hospital process runs
in. Its own module, so that the three read one definition and none imports another for it.
"""

#: The environment of every hospital process: no model hub, no hub dataset, no telemetry.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}

#: Node-config keys the deployed ClientApp reads (client/site/node.py).
DATA_KEY = "data-path"
POLICY_KEY = "policy"
LEDGER_KEY = "ledger"
AUDIT_KEY = "audit-log"
DATASET_KEY = "dataset-id"
DEVICE_KEY = "device"
#: The hospital's own local settings (`LocalSettings`: the frozen-prefix cache, and whether it
#: fits its own model at a run's last round), never the run's.
CACHE_KEYS = ("prefix-cache", "prefix-cache-mb", "own-model")
NAME_KEY = "hospital-name"
