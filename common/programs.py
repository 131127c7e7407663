"""Flower's command-line programs (flower-superlink, flower-supernode, flwr): where and how to run.

Both the coordinator and the hospitals start Flower programs, which in turn start further
programs by name (flower-superexec, flwr-serverapp, flwr-clientapp), so this Python's scripts
must come first on PATH.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from fedward.common.errors import ConfigError


def flower_program(name: str) -> str:
    """Path of a Flower console script: the one installed next to this Python, else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"`{name}` not found; install fedward (it brings flwr) in this Python")
    return found


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower programs: this Python's scripts first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env
