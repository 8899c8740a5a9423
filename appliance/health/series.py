"""Health over time, kept in SQLite: one sample per minute, SLO observations, component starts.

The status page draws its 24-hour plots and computes the month's error budgets
from these tables, so no metrics server is needed on a field appliance.  The
worker's sweep calls :func:`sweep` every few seconds; a sample is written at
most once per minute (the minute is part of the primary key, so a sweep that
runs twice, or two workers, write it once), and old rows are pruned.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from appliance.reading import read_queue

log = logging.getLogger("appliance.health")


SAMPLE_EVERY_S = 60.0
KEEP_S = 40 * 86400  # a whole month of budget, plus margin
SERIES = ("ready", "free_disk_mb", "studies_waiting", "instances_per_min", "sync_lag_s",
          "overdue_reads")


def _minute(ts: float) -> float:
    return float(int(ts // SAMPLE_EVERY_S) * SAMPLE_EVERY_S)


def record(conn: sqlite3.Connection, values: dict[str, float], now: float | None = None) -> bool:
    """Write this minute's samples once; return False when the minute was already written."""
    minute = _minute(now if now is not None else time.time())
    cur = conn.executemany(
        "INSERT OR IGNORE INTO health_samples (name, minute, value) VALUES (?,?,?)",
        [(name, minute, float(v)) for name, v in values.items() if v is not None],
    )
    return cur.rowcount > 0


def series(conn: sqlite3.Connection, name: str, since: float) -> list[tuple[float, float]]:
    rows = conn.execute(
        "SELECT minute, value FROM health_samples WHERE name = ? AND minute >= ? ORDER BY minute",
        (name, since))
    return [(r[0], r[1]) for r in rows]


def observe(conn: sqlite3.Connection, slo: str, value: float, good: bool,
            ts: float | None = None) -> None:
    """Record one SLO observation (the auth views, consult media and the read queue call it)."""
    conn.execute("INSERT INTO slo_observations (slo, ts, value, good) VALUES (?,?,?,?)",
                 (slo, ts if ts is not None else time.time(), float(value), int(bool(good))))


def observations(conn: sqlite3.Connection, slo: str, since: float) -> tuple[int, int]:
    """(total, bad) observations of ``slo`` since ``since``."""
    row = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(1 - good), 0) FROM slo_observations"
        " WHERE slo = ? AND ts >= ?", (slo, since)).fetchone()
    return int(row[0]), int(row[1])


def note_component_starts(conn: sqlite3.Connection) -> int:
    """Remember every start seen in the heartbeat table; return how many were new."""
    cur = conn.execute(
        "INSERT OR IGNORE INTO component_starts (component, started_at, pid)"
        " SELECT name, started_at, pid FROM components WHERE started_at IS NOT NULL")
    return cur.rowcount


def starts_since(conn: sqlite3.Connection, since: float) -> dict[str, int]:
    rows = conn.execute("SELECT component, COUNT(*) FROM component_starts WHERE started_at >= ?"
                        " GROUP BY component", (since,))
    return {r[0]: r[1] for r in rows}


def uptime(conn: sqlite3.Connection, since: float, now: float) -> tuple[int, int]:
    """(minutes observed, minutes down) since ``since``.

    A minute with no sample counts as down once sampling has begun: when the
    whole box is off nobody writes a sample, and that is downtime too.
    """
    first, last = conn.execute("SELECT MIN(minute), MAX(minute) FROM health_samples"
                               " WHERE name = 'ready' AND minute >= ?", (since,)).fetchone()
    if first is None:
        return 0, 0
    # The current minute counts once sampled, or once it is over without a sample.
    end = max(last, _minute(now) - SAMPLE_EVERY_S)
    total = int((end - first) // SAMPLE_EVERY_S) + 1
    up = conn.execute("SELECT COUNT(*) FROM health_samples WHERE name = 'ready' AND minute >= ?"
                      " AND value >= 1", (first,)).fetchone()[0]
    return total, max(0, total - up)


def prune(conn: sqlite3.Connection, now: float) -> None:
    cutoff = now - KEEP_S
    conn.execute("DELETE FROM health_samples WHERE minute < ?", (cutoff,))
    conn.execute("DELETE FROM slo_observations WHERE ts < ?", (cutoff,))
    conn.execute("DELETE FROM component_starts WHERE started_at < ?", (cutoff,))


def sample_values(cfg, conn: sqlite3.Connection, now: float) -> dict[str, float | None]:
    """This minute's figures, from the same checks as /readyz and from the tables."""
    from appliance.health import readiness

    _ok, reasons, checks = readiness.check(cfg, now=now)
    # The worker is sweeping: it is running this. Its heartbeat is written after the
    # sweep, so on its first sweep it would otherwise count itself down.
    reasons = [r for r in reasons if not r.startswith(readiness.WORKER_DOWN)]
    return {
        "ready": 0.0 if reasons else 1.0,
        "free_disk_mb": checks.get("free_disk_mb"),
        "studies_waiting": readiness.studies_waiting(conn),
        "instances_per_min": _scalar(conn, "SELECT COUNT(*) FROM instances WHERE received_at >= ?",
                                     (now - SAMPLE_EVERY_S,)),
        "sync_lag_s": readiness.sync_lag_s(conn, now),
        "overdue_reads": _overdue_reads(conn, now),
    }


def _overdue_reads(conn: sqlite3.Connection, now: float) -> float | None:
    try:
        return sum(r["n"] for r in read_queue.overdue_by_priority(conn, now))
    except sqlite3.OperationalError:  # no read queue in this build
        return None


def _scalar(conn: sqlite3.Connection, sql: str, params: Iterable[Any] = ()) -> float | None:
    try:
        return conn.execute(sql, tuple(params)).fetchone()[0]
    except sqlite3.OperationalError:  # a table of an area this build does not have
        return None


def sweep(cfg) -> None:
    """Called by the worker's sweep: note restarts, write the minute's sample, prune."""
    from appliance.core import db, metrics

    now = time.time()
    metrics.ensure_setup(cfg.data_dir)
    metrics.worker_swept(now)
    conn = db.connect(cfg.db_path)
    try:
        note_component_starts(conn)
        last = conn.execute("SELECT MAX(minute) FROM health_samples WHERE name = 'ready'"
                            ).fetchone()[0]
        if last is not None and last >= _minute(now):
            return
        values = sample_values(cfg, conn, now)
        with db.transaction(conn):
            if record(conn, values, now):
                prune(conn, now)
        log.debug("health sample", extra={"sample": json.dumps(values)})
    finally:
        conn.close()
