"""Crash-safe file and folder writes.

A file is written to a temporary file in the same folder, flushed and fsynced, then renamed over
the target with `os.replace` (atomic on POSIX and Windows), and the folder entry is fsynced. A
reader therefore sees either the old content or the new content, never half a file, even if the
process or the machine dies in between. The privacy ledger, checkpoints and key files rely on it.

A folder (e.g. a PEFT adapter saved with `save_pretrained`) cannot be renamed over a non-empty
folder, so `replace_dir_atomic` moves the old folder aside to `<name>.previous`, moves the new one
in, and only then deletes the old one. If the process dies between the two renames, the old
folder survives under `<name>.previous`; `recover_dir` (called by `replace_dir_atomic` itself)
puts it back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Permissions of a new file when the caller gives none and no file existed before.
DEFAULT_FILE_MODE = 0o644

#: Suffix of the old folder kept while `replace_dir_atomic` swaps a folder.
PREVIOUS_SUFFIX = ".previous"


def write_bytes_atomic(path: str | Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace the file at `path` with `data` in one atomic step.

    `mode` sets the permissions (e.g. 0o600 for a private key; it is set before any byte is
    written, so the secret is never readable by others). Without it an existing file keeps its
    permissions and a new file gets `DEFAULT_FILE_MODE`. On any failure the old file is left
    exactly as it was and the temporary file is removed.
    """
    path = Path(path)
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = DEFAULT_FILE_MODE
    # mkstemp creates the file with 0600; chmod before writing so a key is never group-readable.
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as temp_file:
            if hasattr(os, "fchmod"):  # POSIX; Windows has no group/other bits to protect.
                os.fchmod(temp_file.fileno(), mode)
            temp_file.write(data)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        _remove_quietly(Path(temp_name))
        raise
    fsync_dir(path.parent)


def write_text_atomic(
    path: str | Path, text: str, *, encoding: str = "utf-8", mode: int | None = None
) -> None:
    """Replace the text file at `path` atomically (see `write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode(encoding), mode=mode)


def write_json_atomic(path: str | Path, obj: Any, *, mode: int | None = None) -> None:
    """Write `obj` as indented JSON (with a final newline) atomically (see `write_bytes_atomic`).

    The object is serialised before the file is touched, so a value JSON cannot hold raises
    `TypeError` and leaves the old file as it was.
    """
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    write_text_atomic(path, text, mode=mode)


def temp_dir_next_to(final_dir: str | Path) -> Path:
    """Create an empty temporary folder beside `final_dir` (same file system, so renames work).

    Save into it, then call `replace_dir_atomic(temp, final_dir)`.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".tmp", dir=final_dir.parent))


def replace_dir_atomic(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Move the finished folder `tmp_dir` to `final_dir`, replacing what was there.

    Every file in `tmp_dir` is fsynced first, so the new folder is complete on disk before it
    becomes visible. The old `final_dir` is kept (as `<final_dir>.previous`) until the new one is
    in place, then deleted. Both folders must be on the same file system (use
    `temp_dir_next_to`). On failure `tmp_dir` is left in place and `final_dir` keeps its content.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if not tmp_dir.is_dir():
        raise FileNotFoundError(f"{tmp_dir}: folder to move into place does not exist")
    recover_dir(final_dir)
    _fsync_tree(tmp_dir)

    previous = final_dir.with_name(final_dir.name + PREVIOUS_SUFFIX)
    if previous.exists():
        # A finished earlier swap whose clean-up did not run: final_dir exists, so this is stale.
        shutil.rmtree(previous)
    had_old = final_dir.exists()
    if had_old:
        os.replace(final_dir, previous)
    try:
        os.replace(tmp_dir, final_dir)
    except BaseException:
        if had_old:
            os.replace(previous, final_dir)
        raise
    fsync_dir(final_dir.parent)
    if had_old:
        shutil.rmtree(previous, ignore_errors=True)


def recover_dir(final_dir: str | Path) -> bool:
    """Undo a folder swap that died half-way: restore `<final_dir>.previous` if `final_dir` is gone.

    Returns True when something was restored. Call it before reading a folder that
    `replace_dir_atomic` writes (e.g. when resuming from a checkpoint).
    """
    final_dir = Path(final_dir)
    previous = final_dir.with_name(final_dir.name + PREVIOUS_SUFFIX)
    if final_dir.exists() or not previous.is_dir():
        return False
    logger.warning("%s: restoring the previous version left by an interrupted swap", final_dir)
    os.replace(previous, final_dir)
    fsync_dir(final_dir.parent)
    return True


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where the OS cannot."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder; renames there are durable anyway.
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            file_path = Path(root) / name
            if file_path.is_symlink():
                continue
            with open(file_path, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(root)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
