"""One cross-process lock for files that several processes update: the ledger, the audit log.

A hospital may run more than one fedward process on the same ledger folder (a deployed client and
`fedward client ledger`, or two runs sharing a data set). Each update is read-modify-write: read
the last audit record to chain to it, re-read the ledger to add a round. Without a lock two
writers read the same state and one of them silently loses the other's record, which for the
privacy ledger would under-count the privacy spent.

`exclusive_lock(path)` opens `path` (creating it, never truncating it) and holds an exclusive
POSIX `flock` on it while the block runs. The lock is tied to the open file, so the kernel
releases it when the process dies: a crash never leaves a stale lock behind. Where the platform
has no `fcntl` (Windows) there is no lock, and one writer per file is the operator's job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[BinaryIO]:
    """Hold an exclusive lock on the file at `path` while the block runs; yields the file.

    The file is opened for reading and appending ("a+b"), so it can be a lock file of its own
    (`<ledger>.lock`) or the very file being appended to (the audit log). Blocks until any
    other process holding the lock releases it.
    """
    with open(path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; see the module docstring.
            yield handle
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
