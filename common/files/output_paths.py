"""Output paths checked once, up front, before a command writes anything.

A command that writes (`fedward simulate --out`, `fedward run`, `fedward server start`,
`fedward client start`, `fedward certs init`, `fedward keys node`...) calls `check_output_folder`
or `check_output_file` for each path it will write, with the flag the user gave it by. A regular
file where a folder is expected, a folder where a file is expected, or a parent the user cannot
write in is then one `ConfigError` naming the path and the flag (one line, exit 2, from the CLI),
instead of a `FileExistsError` traceback after minutes of work. Nothing is created here: a run
that never starts leaves no folder behind.

    from fedward.common.files.output_paths import check_output_folder

    out = check_output_folder(out, "--out")  # at the top of the command, before any work
"""

from __future__ import annotations

import os
from pathlib import Path

from fedward.common.errors import ConfigError


def check_output_folder(path: str | Path, flag: str) -> Path:
    """`path` (user-expanded) if it is a folder this process can write in, or can create.

    Args:
        path: The folder the command will create (with its parents) or write into.
        flag: How the user gave it, for the message (e.g. "--out").

    Raises:
        ConfigError: naming the path and the flag when it is a file, lies under a file, or
            cannot be written or created for lack of permission.
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            f"{flag} {folder}: is a file, not a folder; give a folder path (it is created if "
            "missing)"
        )
    _check_writable(folder, flag, folder)
    return folder


def check_output_file(path: str | Path, flag: str) -> Path:
    """`path` (user-expanded) if it is a file this process can create or replace.

    Args:
        path: The file the command will write (its folder is created if missing).
        flag: How the user gave it, for the message (e.g. "--log-file").

    Raises:
        ConfigError: naming the path and the flag when it is a folder, lies under a file, or
            cannot be written or created for lack of permission.
    """
    file = Path(path).expanduser()
    if file.is_dir():
        raise ConfigError(f"{flag} {file}: is a folder, not a file; give a file path")
    if file.exists() and not os.access(file, os.W_OK):
        raise ConfigError(f"{flag} {file}: not writable by this user; check its permissions")
    _check_writable(file.parent, flag, file)
    return file


def _check_writable(folder: Path, flag: str, given: Path) -> None:
    """`folder` exists and is writable, or its nearest existing ancestor is a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{flag} {given}: {existing} is a file, not a folder, so {given} cannot be created "
            "there; give another path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = (
            "not writable"
            if existing == given
            else f"cannot be created: {existing} is not writable"
        )
        raise ConfigError(
            f"{flag} {given}: {what} by this user; check permissions or give another path"
        )
