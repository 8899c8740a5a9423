"""Critical findings: flagged by the reader, acknowledged by site staff, escalated when not.

A critical finding (a bleed on a stroke CT, a tension pneumothorax) cannot
wait for someone to open the report.  Flagging one:

1. stores it (who, when, what) and notifies every active ``site_staff``
   account at once, in the in-app inbox; it also shows on the site's
   critical findings page until acknowledged;
2. an acknowledgement records who and when, once (a trigger refuses a
   change afterwards);
3. if nobody acknowledged it after ``reports.critical_ack_minutes``, the
   sweep escalates: site staff are notified again together with the
   responders and admins on duty, and with the on-call people named in the
   workflow that routed the study; then again every ``critical_ack_minutes``
   (level 2, 3 …) until someone acknowledges.

The escalation is idempotent: a sweep that dies after notifying and before
committing sends again at the next sweep (a duplicate reminder, never a lost
one); a committed level is never repeated.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from appliance.accounts import users as accounts
from appliance.core import audit, db
from appliance.reading import read_queue
from appliance.reports.model import ReportError, get_report

ESCALATE_ROLES = ("responder", "admin")


def _now(now: float | None) -> float:
    return now if now is not None else time.time()


def _users(conn: sqlite3.Connection, roles: tuple[str, ...]) -> list[str]:
    return accounts.active_usernames(conn, roles)


def notify_users(conn: sqlite3.Connection, usernames: list[str], subject: str, body: str,
                 item_id: int | None, now: float) -> list[str]:
    """Put a message in each user's in-app inbox (``appliance.notifications``); return who.

    Without the inbox module (an appliance built without the read queue) the
    site page and the audit trail still show the finding.
    """
    try:
        from appliance.core import notifications
    except ModuleNotFoundError as e:
        if e.name != "appliance.notifications":
            raise
        return []
    return notifications.notify(conn, list(dict.fromkeys(usernames)), "critical", subject,
                                body, item_id=item_id, now=now)


def flag(conn: sqlite3.Connection, report_id: int, *, actor: str, description: str,
         ack_minutes: float, source: str = "", now: float | None = None) -> int:
    """Flag a critical finding on a report and notify the site staff at once; return its id."""
    t = _now(now)
    description = " ".join((description or "").split())
    if len(description) < 3:
        raise ReportError("describe the critical finding (what, where)")
    if len(description) > 1000:
        raise ReportError("describe the critical finding in at most 1000 characters")
    with db.transaction(conn):
        report = get_report(conn, report_id)
        if report["author"] != actor:
            raise ReportError(f"only the reporting reader ({report['author']}) flags findings "
                              "on this report", 403)
        cur = conn.execute(
            "INSERT INTO critical_findings (report_id, study_uid, read_item_id, description,"
            " flagged_by, flagged_at, next_escalation_at) VALUES (?,?,?,?,?,?,?)",
            (report_id, report["study_uid"], report["read_item_id"], description, actor, t,
             t + ack_minutes * 60.0))
        finding_id = cur.lastrowid
        staff = _users(conn, ("site_staff",))
        notified = notify_users(conn, staff, "Critical finding: acknowledge now on /critical",
                                description, report["read_item_id"], t)
        audit.record(conn, actor, "critical.flag", f"critical:{finding_id}", source=source,
                     detail={"report_id": report_id, "study_uid": report["study_uid"],
                             "notified": notified}, ts=t)
    return finding_id


def acknowledge(conn: sqlite3.Connection, finding_id: int, *, actor: str, note: str = "",
                source: str = "", now: float | None = None) -> None:
    """Record that ``actor`` (site staff) has received the finding; only the first counts."""
    t = _now(now)
    note = " ".join((note or "").split())[:500]
    with db.transaction(conn):
        row = get(conn, finding_id)
        if row["acknowledged_at"] is not None:
            raise ReportError(f"already acknowledged by {row['acknowledged_by']}", 409)
        conn.execute("UPDATE critical_findings SET acknowledged_by=?, acknowledged_at=?,"
                     " ack_note=? WHERE id=?", (actor, t, note, finding_id))
        audit.record(conn, actor, "critical.acknowledge", f"critical:{finding_id}",
                     source=source, detail={"study_uid": row["study_uid"],
                                            "after_s": round(t - row["flagged_at"], 1)}, ts=t)
        notify_users(conn, [row["flagged_by"]], f"Critical finding acknowledged by {actor}",
                     row["description"], row["read_item_id"], t)


def get(conn: sqlite3.Connection, finding_id: int) -> dict[str, Any]:
    r = conn.execute("SELECT * FROM critical_findings WHERE id = ?", (finding_id,)).fetchone()
    if r is None:
        raise ReportError(f"no critical finding {finding_id}", 404)
    return dict(r)


def listing(conn: sqlite3.Connection, open_only: bool = False,
            limit: int = 200) -> list[dict[str, Any]]:
    """Findings newest first, with the study's patient and study identifiers for the site page."""
    where = "WHERE c.acknowledged_at IS NULL" if open_only else ""
    return [dict(r) for r in conn.execute(
        "SELECT c.*, s.patient_id, s.patient_name, s.accession_number, s.study_description,"
        " s.modalities FROM critical_findings c LEFT JOIN studies s ON s.study_uid = c.study_uid"
        f" {where} ORDER BY c.acknowledged_at IS NOT NULL, c.flagged_at DESC LIMIT ?", (limit,))]


def for_report(conn: sqlite3.Connection, report_id: int) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(
        "SELECT * FROM critical_findings WHERE report_id = ? ORDER BY id", (report_id,))]


def on_call_people(conn: sqlite3.Connection, read_item_id: int | None) -> list[str]:
    """The on-call people of the ladder the workflow gave this item (notify_on_call steps).

    Read from the item's ``escalation_steps`` (the read queue's table), so the
    people a responder named in the workflow file are the ones called.
    """
    if read_item_id is None:
        return []
    try:
        targets = read_queue.on_call_targets(conn, read_item_id)
    except sqlite3.OperationalError:  # no read queue tables in this build
        return []
    people: list[str] = []
    for target in targets:
        people += [u for u in target.get("users", []) if u not in people]
    return people


def escalate_due(conn: sqlite3.Connection, cfg: Any, now: float | None = None) -> int:
    """Escalate every unacknowledged finding whose time has come; return how many."""
    t = _now(now)
    ack_s = float(cfg["reports"]["critical_ack_minutes"]) * 60.0
    due = [r[0] for r in conn.execute(
        "SELECT id FROM critical_findings WHERE acknowledged_at IS NULL"
        " AND next_escalation_at <= ? ORDER BY id", (t,))]
    done = 0
    for finding_id in due:
        with db.transaction(conn):
            row = get(conn, finding_id)
            if row["acknowledged_at"] is not None or row["next_escalation_at"] > t:
                continue  # acknowledged or escalated by another sweep meanwhile
            level = row["escalation_level"] + 1
            people = (_users(conn, ("site_staff",)) + _users(conn, ESCALATE_ROLES)
                      + on_call_people(conn, row["read_item_id"]))
            minutes = round((t - row["flagged_at"]) / 60)
            notified = notify_users(conn, people, f"UNACKNOWLEDGED critical finding ({minutes}"
                                    " min): acknowledge on /critical", row["description"],
                                    row["read_item_id"], t)
            conn.execute("UPDATE critical_findings SET escalation_level=?, last_escalated_at=?,"
                         " next_escalation_at=? WHERE id=?", (level, t, t + ack_s, finding_id))
            audit.record(conn, "system", "critical.escalate", f"critical:{finding_id}",
                         detail={"level": level, "notified": notified,
                                 "study_uid": row["study_uid"]}, ts=t)
        done += 1
    return done
