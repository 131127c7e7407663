"""fedward: federated, differentially private fine-tuning of transformers (a task head or LoRA
adapters) for medical text.

The installed distribution has this one import name. Its parts live in the repository's
top-level folders (mapped here by pyproject.toml's `package-dir`): `fedward.common` (what both
sides agree on), `fedward.client` (a hospital), `fedward.server` (the coordinator),
`fedward.simulation` (local multi-hospital runs); `fedward.cli` is the `fedward` command.
"""

__version__ = "0.1.0"
