"""Health alerts to admins and responders through the same outbox as every notification.

The conditions are the health capability's own: the reasons ``/readyz`` is not ready (free
disk under the reserve, a port down, the worker silent, sync lag) and the status page's
alerts (a component restarting in a loop, the disk reaching its reserve within 24 h, sync
stalled, the certificate expiring, an SLO's error budget burning). Each condition is sent
once when it starts (a not-ready reason only after ``NOT_READY_GRACE_S``, so a blip pages
nobody), again at most hourly while it lasts, and once when it clears. The state is in
``notify_alerts``, so a restart neither repeats nor forgets an alert.
"""

from __future__ import annotations

import logging
import re
import sqlite3

from appliance.core import config, db, notifications
from appliance.health import readiness, status_report

log = logging.getLogger("appliance.notify")

NOT_READY_GRACE_S = 120
REPEAT_S = 3600
CHECK_EVERY_S = 30  # readiness probes ports: not on every 2-second sweep
ADMINS = [{"roles": list(notifications.FALLBACK_ROLES), "tags": []}]
_last_check: dict[str, float] = {}


def _key(title: str) -> str:
    """A condition's identity: its text without the figures that change while it lasts."""
    return re.sub(r"\d+(\.\d+)?", "N", title)


def conditions(cfg: config.Config, conn: sqlite3.Connection,
               now: float) -> dict[str, tuple[str, str, float]]:
    """key → (title, detail, grace seconds) of every health condition present now."""
    _ready, reasons, _checks = readiness.check(cfg, now)
    out = {_key(r): (r, "", NOT_READY_GRACE_S) for r in reasons}
    for a in status_report.alerts(cfg, conn, [], now):
        if "past their SLA" in a.title:
            continue  # late reads escalate through their own ladder
        out.setdefault(_key(a.title), (a.title, a.detail, 0.0))
    return out


def check(conn: sqlite3.Connection, cfg: config.Config, now: float,
          force: bool = False) -> dict[str, int]:
    """Compare the conditions with what was sent; send starts, hourly repeats and clears."""
    counts = {"raised": 0, "repeated": 0, "cleared": 0, "quiet": 0}
    key = str(cfg.db_path)
    if not cfg["notify"]["health_alerts"]:
        return counts
    if not force and now - _last_check.get(key, float("-inf")) < CHECK_EVERY_S:
        return counts
    _last_check[key] = now
    present = conditions(cfg, conn, now)
    with db.transaction(conn):
        for cond, (title, detail, grace) in present.items():
            counts[_present(conn, cond, title, detail, grace, now)] += 1
        for row in conn.execute("SELECT * FROM notify_alerts WHERE active = 1").fetchall():
            if row["condition"] not in present:
                counts["cleared"] += _clear(conn, row, now)
    return {k: v for k, v in counts.items() if k != "quiet"}


def _present(conn: sqlite3.Connection, cond: str, title: str, detail: str, grace: float,
             now: float) -> str:
    row = conn.execute("SELECT * FROM notify_alerts WHERE condition = ?", (cond,)).fetchone()
    if row is None or not row["active"]:
        conn.execute("INSERT INTO notify_alerts (condition, active, since, last_sent_at,"
                     " cleared_at, detail) VALUES (?,1,?,NULL,NULL,?) ON CONFLICT(condition)"
                     " DO UPDATE SET active = 1, since = excluded.since, last_sent_at = NULL,"
                     " cleared_at = NULL, detail = excluded.detail", (cond, now, title))
        since, sent = now, None
    else:
        since, sent = row["since"], row["last_sent_at"]
    if sent is None and now - since >= grace:
        _send(conn, f"Health alert: {title}", detail, now)
        conn.execute("UPDATE notify_alerts SET last_sent_at = ?, detail = ? WHERE condition = ?",
                     (now, title, cond))
        return "raised"
    if sent is not None and now - sent >= REPEAT_S:
        _send(conn, f"Health alert (still): {title}", detail, now)
        conn.execute("UPDATE notify_alerts SET last_sent_at = ? WHERE condition = ?",
                     (now, cond))
        return "repeated"
    return "quiet"


def _clear(conn: sqlite3.Connection, row: sqlite3.Row, now: float) -> int:
    conn.execute("UPDATE notify_alerts SET active = 0, cleared_at = ? WHERE condition = ?",
                 (now, row["condition"]))
    if row["last_sent_at"] is None:
        return 0  # shorter than its grace: nobody was told, nobody is told it cleared
    _send(conn, f"Cleared: {row['detail']}", "", now)
    return 1


def _send(conn: sqlite3.Connection, subject: str, body: str, now: float) -> None:
    notifications.notify(conn, ADMINS, "health.alert", subject, body, now=now)
    log.warning("health alert notified", extra={"alert": subject})
