"""The hospitals' SuperNodes the SuperLink knows: registered, online or offline.

`fedward server start --database fedward-superlink.db` keeps Flower's state in SQLite; its
`node` table (flwr 1.41, `flwr/supercore/state/schema/linkstate_models.py`) lists every
registered SuperNode with its status and heartbeat deadline. The dashboard opens the file
read-only (SQLite's `mode=ro`) and reads only that table; a file it cannot read, or a schema it
does not know, is a message on the page.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Node:
    """One SuperNode as the SuperLink records it."""

    node_id: int
    name: str
    status: str  # registered | online | offline | unregistered (Flower's NodeStatus)
    registered_at: str
    last_seen: str
    online: bool


def read_nodes(database: Path, now: float | None = None) -> tuple[list[Node], str]:
    """The SuperLink's nodes, and '' or a line saying why they could not be read."""
    if not database.is_file():
        return [], f"{database}: no SuperLink state database there"
    now = time.time() if now is None else now
    try:
        connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = connection.execute(
                "SELECT node_id, name, status, registered_at, last_activated_at, online_until "
                "FROM node ORDER BY node_id"
            ).fetchall()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        return [], f"{database}: the SuperLink's node table cannot be read ({exc})"
    nodes = []
    for node_id, name, status, registered_at, last_activated_at, online_until in rows:
        online = status == "online" and online_until is not None and float(online_until) > now
        nodes.append(
            Node(
                node_id=int(node_id or 0),
                name=str(name or ""),
                status=str(status or ""),
                registered_at=str(registered_at or ""),
                last_seen=str(last_activated_at or ""),
                online=online,
            )
        )
    return nodes, ""
