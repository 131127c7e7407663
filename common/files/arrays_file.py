"""One file format for "some named arrays plus a JSON header", written atomically.

The coordinator's checkpoint (`<out>/checkpoint.npz`, the commit point of a round) and a
hospital's released updates (`<ledger>/releases/*.npz`, kept so that a repeated round resends
the very same update instead of training and spending privacy again) are both tensors with a
little metadata. Both are NumPy `.npz` archives (a zip file; no pickle is ever written or
loaded): the header is one JSON string stored under `HEADER_KEY`, and each array under
`<prefix><name>`, the prefix naming what the arrays are (`adapter:`, `delta:`).

Writes go through `common.atomic`, so a crash leaves the old file or the new one; a file that is
damaged anyway (a truncated copy, a full disk on another system, an edit) is refused with a
`DataError` naming it, never half read.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedward.common.errors import DataError
from fedward.common.files.atomic import write_bytes_atomic

#: Name of the JSON header inside the archive.
HEADER_KEY = "__fedward__"


@dataclass(frozen=True)
class ArraysFile:
    """What `read_arrays_file` found: the header, the arrays, and the SHA-256 of the file."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray]
    sha256: str


def write_arrays_file(
    path: str | Path,
    header: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    *,
    prefix: str,
    mode: int | None = None,
) -> str:
    """Write `arrays` (stored as `<prefix><name>`) and `header` to `path` atomically.

    The header must be JSON without NaN or infinity (`ValueError` otherwise, before the file
    is touched). The folder is created if needed; `mode` sets the file's permissions (see
    `write_bytes_atomic`). Returns the SHA-256 (hex) of the bytes written.
    """
    text = json.dumps(dict(header), allow_nan=False)
    tensors = {prefix + name: np.ascontiguousarray(value) for name, value in arrays.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **{HEADER_KEY: np.array(text)}, **tensors)
    data = buffer.getvalue()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data, mode=mode)
    return hashlib.sha256(data).hexdigest()


def read_arrays_file(path: str | Path, *, prefix: str, what: str, advice: str = "") -> ArraysFile:
    """Read a file written by `write_arrays_file`: its header and its `<prefix>` arrays.

    `what` names the file for the user ("checkpoint"), `advice` says what to do about a damaged
    one. A missing file raises `FileNotFoundError` (the caller knows what that means); an
    unreadable, truncated or malformed one raises `DataError` naming the file.
    """
    path = Path(path)
    tail = f"; {advice}" if advice else ""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what} ({exc}){tail}") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            header = json.loads(str(archive[HEADER_KEY]))
            arrays = {
                name[len(prefix) :]: archive[name]
                for name in archive.files
                if name.startswith(prefix)
            }
    except (
        OSError,
        EOFError,
        ValueError,
        KeyError,
        zipfile.BadZipFile,
        json.JSONDecodeError,
    ) as exc:
        raise DataError(f"{path}: {what} is damaged ({exc}){tail}") from None
    if not isinstance(header, dict):
        raise DataError(f"{path}: {what} is damaged (its header is not a JSON object){tail}")
    return ArraysFile(header=header, arrays=arrays, sha256=hashlib.sha256(data).hexdigest())
