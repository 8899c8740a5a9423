"""What sync has left to do, in figures: for ``sync status``, /readyz, the status page, /metrics.

Two ages are measured, each defined once here:

- ``upload_lag_s``: how long the oldest bundle has waited to reach the target
  (``building``, ``built`` or ``uploading``): the health limit
  ``health.sync_lag_limit_min`` is about this one (is the uplink down?);
- ``unsent_age_s``: how long the oldest thing not yet safe off the box has waited,
  counting instances not bundled yet and bundles not confirmed yet.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from appliance.sync import outbox
from dicom_node import index as dicom_index

NOT_UPLOADED = ("building", "built", "uploading")


def upload_lag_s(conn: sqlite3.Connection, now: float) -> float | None:
    """Age of the oldest bundle not yet uploaded (0 when all are up); None without sync tables."""
    try:
        row = conn.execute(
            f"SELECT MIN(created_at) FROM bundles WHERE state IN "
            f"({','.join('?' * len(NOT_UPLOADED))})", NOT_UPLOADED).fetchone()
    except sqlite3.OperationalError:
        return None
    return max(0.0, now - row[0]) if row[0] is not None else 0.0


def unsent_age_s(conn: sqlite3.Connection, now: float) -> float:
    """Age of the oldest instance not bundled or bundle not confirmed (0 when none waits)."""
    oldest_bundle = conn.execute(
        "SELECT MIN(created_at) FROM bundles WHERE state != 'confirmed'").fetchone()[0]
    oldest_instance = outbox.unbundled_summary(conn)[1]
    oldest = min([t for t in (oldest_bundle, oldest_instance) if t is not None], default=None)
    return round(now - oldest, 1) if oldest else 0.0


def figures(conn: sqlite3.Connection, now: float | None = None) -> dict[str, Any]:
    """Queued, bytes left, last success, age of the oldest unsent item: for status and /metrics."""
    now = now or time.time()
    by_state = {r[0]: r[1] for r in conn.execute(
        "SELECT state, COUNT(*) FROM bundles GROUP BY state")}
    left = conn.execute(
        "SELECT COALESCE(SUM(CASE WHEN state IN ('built','uploading') THEN size - bytes_sent"
        " ELSE 0 END), 0), MAX(confirmed_at) FROM bundles").fetchone()
    not_bundled, _, not_bundled_bytes = outbox.unbundled_summary(conn)
    link = outbox.link_state(conn)
    errors = [r[0] for r in conn.execute(
        "SELECT last_error FROM bundles WHERE state != 'confirmed' AND last_error != ''"
        " ORDER BY priority, seq LIMIT 1")]
    return {
        "queued": sum(v for k, v in by_state.items() if k != "confirmed"),
        "by_state": by_state,
        "bytes_left": int(left[0]) + int(not_bundled_bytes),
        "instances_not_bundled": not_bundled,
        "last_success": left[1],
        "oldest_unsent_lag_s": unsent_age_s(conn, now),
        "link_up": link.get("up"),
        "link_error": link.get("last_error", ""),
        "next_link_check": link.get("next_check", 0),
        "last_error": errors[0] if errors else "",
    }


def reconcile(conn: sqlite3.Connection) -> dict[str, int]:
    """Instances (current versions) in no confirmed bundle, and any in more than one."""
    outbox.ledger_views(conn)
    unlisted, duplicated, total = dicom_index.listing_counts(conn, outbox.CONFIRMED)
    return {"unconfirmed": unlisted, "duplicated": duplicated, "instances": total}


def bytes_uploaded(conn: sqlite3.Connection) -> int:
    """Bytes sent to the sync target, all bundles together."""
    return conn.execute("SELECT COALESCE(SUM(bytes_sent), 0) FROM bundles").fetchone()[0]


def oldest_error(conn: sqlite3.Connection) -> str | None:
    """The last upload error of the oldest bundle that has one (why sync is stalled)."""
    row = conn.execute("SELECT last_error FROM bundles WHERE last_error != ''"
                       " ORDER BY created_at LIMIT 1").fetchone()
    return row[0] if row else None
