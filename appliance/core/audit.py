"""The audit trail: append-only, hash-chained rows of who did what, when, from where.

Each row's ``hash`` is SHA-256 over the previous row's hash and this row's
canonical JSON, so an edit or a deletion anywhere breaks every link after it;
:func:`verify` names the first broken row.  Triggers refuse UPDATE and DELETE
through SQL so that an honest mistake cannot rewrite history (a determined
attacker with the file can, and verify then catches it).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

GENESIS = "0" * 64


FIELDS = ("id", "ts", "actor", "action", "object", "source", "outcome", "detail")


def _digest(prev_hash: str, row: dict[str, Any]) -> str:
    body = json.dumps({k: row[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def record(
    conn: sqlite3.Connection, actor: str, action: str, obj: str = "", source: str = "",
    outcome: str = "ok", detail: dict[str, Any] | None = None, ts: float | None = None,
) -> int:
    """Append one audit row durably and return its id.

    Runs in its own IMMEDIATE transaction (a savepoint inside the caller's), so
    the chain is never forked by two writers.
    """
    from appliance.core.db import transaction

    with transaction(conn):
        last = conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        prev = last[1] if last else GENESIS
        row = {
            "id": (last[0] + 1) if last else 1,
            "ts": round(ts if ts is not None else time.time(), 6),
            "actor": actor, "action": action, "object": obj, "source": source,
            "outcome": outcome,
            "detail": json.dumps(detail or {}, sort_keys=True, separators=(",", ":")),
        }
        digest = _digest(prev, row)
        conn.execute(
            "INSERT INTO audit (id, ts, actor, action, object, source, outcome, detail, prev_hash,"
            " hash) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (*[row[k] for k in FIELDS], prev, digest),
        )
    return row["id"]


def verify(conn: sqlite3.Connection) -> tuple[bool, str, int]:
    """Walk the chain; return (ok, message, rows checked)."""
    prev, expected_id, n = GENESIS, 1, 0
    for r in conn.execute(f"SELECT {', '.join(FIELDS)}, prev_hash, hash FROM audit ORDER BY id"):
        row = dict(zip(FIELDS, r[: len(FIELDS)], strict=True))
        if row["id"] != expected_id:
            return False, f"row {expected_id} is missing (next row is {row['id']})", n
        if r["prev_hash"] != prev:
            return False, f"row {row['id']}: link to the previous row is broken", n
        if _digest(prev, row) != r["hash"]:
            return False, f"row {row['id']}: contents do not match its hash (edited)", n
        prev, expected_id, n = r["hash"], expected_id + 1, n + 1
    return True, f"audit chain intact: {n} rows", n


def rows(conn: sqlite3.Connection, since: float = 0.0) -> Iterator[dict[str, Any]]:
    for r in conn.execute(
        f"SELECT {', '.join(FIELDS)}, hash FROM audit WHERE ts >= ? ORDER BY id", (since,)
    ):
        d = dict(r)
        d["detail"] = json.loads(d["detail"])
        yield d


def last_id(conn: sqlite3.Connection) -> int:
    """The id of the newest row (0 for an empty trail)."""
    return conn.execute("SELECT MAX(id) FROM audit").fetchone()[0] or 0


def rows_between(conn: sqlite3.Connection, first: int, last: int) -> list[dict[str, Any]]:
    """Rows ``first``..``last`` as stored, hashes included: an audit slice that sync ships."""
    return [dict(r) for r in conn.execute(
        "SELECT * FROM audit WHERE id BETWEEN ? AND ? ORDER BY id", (first, last))]
