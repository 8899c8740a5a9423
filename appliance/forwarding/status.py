"""What forwarding looks like per destination: the figures ``forward status``, ``/metrics``
and the status page show (no patient data: counts, times and the last error only)."""

from __future__ import annotations

import sqlite3
from typing import Any

from appliance.forwarding.outbox import STATES


def summary(conn: sqlite3.Connection, now: float, alert_min: float = 15.0) -> list[dict[str, Any]]:
    """Per destination: rows per state, proofs, oldest waiting, last error, failing since."""
    out: dict[str, dict[str, Any]] = {}
    for dest, state, proof, n, oldest in conn.execute(
            "SELECT destination, state, proof, COUNT(*), MIN(created_at) FROM forward_outbox"
            " GROUP BY destination, state, proof ORDER BY destination"):
        d = out.setdefault(dest, {"destination": dest, **dict.fromkeys(STATES, 0),
                                  "proved_by": {}, "oldest_waiting_at": None, "last_error": "",
                                  "failing_since": None, "alert": False})
        d[state] += n
        if state == "delivered":
            d["proved_by"][proof] = d["proved_by"].get(proof, 0) + n
        if state == "waiting" and (d["oldest_waiting_at"] is None or oldest < d["oldest_waiting_at"]):
            d["oldest_waiting_at"] = oldest
    for dest, d in out.items():
        r = conn.execute("SELECT last_error, failing_since FROM forward_outbox WHERE destination = ?"
                         " AND last_error != '' ORDER BY COALESCE(failing_since, 0) DESC LIMIT 1",
                         (dest,)).fetchone()
        since = conn.execute("SELECT MIN(failing_since) FROM forward_outbox WHERE destination = ?"
                             " AND state = 'waiting' AND failing_since IS NOT NULL",
                             (dest,)).fetchone()[0]
        d["last_error"] = r[0] if r else ""
        d["failing_since"] = since
        d["alert"] = since is not None and now - since >= alert_min * 60
    return list(out.values())
