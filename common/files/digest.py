"""Content hashes of what a hospital trusts by its bytes: a data set, a model's weights.

One function, so that the ledger key of a data set (`client.ledger.dataset_fingerprint`) and the
pinned hash of a base model (`client.policy.model_content_hash`) are computed the same way and
cannot drift apart: SHA-256 over the files in sorted order of their relative paths, each file
contributing its relative path, its size and its bytes. Renaming, moving, adding, removing or
editing any hashed file therefore changes the hash; the folder's own name and the files' times
do not.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

_BLOCK = 1 << 20


def content_sha256(path: str | Path, suffixes: Iterable[str] | None = None) -> str:
    """SHA-256 (hex) of a file, or of the files in a folder (any depth) in sorted order, over
    each file's name (relative to the folder), size and bytes: a content fingerprint that a
    rename changes too, not what `sha256sum` prints for a single file.

    `suffixes` limits a folder's files to those whose names end in one of them (e.g. weight
    files); a single file is hashed whatever its name. Raises `FileNotFoundError` when `path`
    does not exist and `ValueError` when a folder holds no file to hash; callers turn these into
    the error of their domain.
    """
    path = Path(path)
    endings = None if suffixes is None else tuple(suffixes)
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = []
        for root, _dirs, names in os.walk(path):
            for name in names:
                if endings is not None and not name.endswith(endings):
                    continue
                file_path = Path(root) / name
                if file_path.is_file():
                    files.append((file_path.relative_to(path).as_posix(), file_path))
        files.sort()
    else:
        raise FileNotFoundError(f"{path}: not found")
    if not files:
        raise ValueError(f"{path}: no file to hash")
    digest = hashlib.sha256()
    for relative, file_path in files:
        digest.update(relative.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(str(file_path.stat().st_size).encode("ascii") + b"\0")
        with open(file_path, "rb") as handle:
            for block in iter(lambda: handle.read(_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()
