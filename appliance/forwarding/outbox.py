"""The forwarding outbox: one durable row per (destination, SOP Instance), leased while sent.

Why a table of our own: huey's SQLite storage drops a task whose worker is killed, and a
site PACS can be away for weeks.  Rows are queued in the caller's transaction (the read
item's creation, so a decided ``forward:`` action is never lost), taken by the sending
pass under a lease (most urgent priority first, then oldest due), and end ``delivered``
(proved by storage commitment or by a C-FIND) or ``failed`` (a permanent refusal).
A failure that may pass (refusal, timeout, association rejected, host unreachable) sets
the next attempt with a doubling delay capped at ``forwarding.retry_max_s``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from appliance.core import audit, db
from appliance.core.leases import holder_gone
from dicom_node import index as dicom_index

PRIORITY_RANK = {"stat": 0, "urgent": 1, "routine": 2}
ACTOR = "system:forwarding"
STATES = ("waiting", "sending", "stored", "delivered", "failed")


def destinations(actions: Iterable[dict[str, Any]]) -> list[str]:
    """The AE titles a decision's ``forward:`` actions name, in order, once each."""
    out: list[str] = []
    for a in actions:
        name = str(a.get("forward", "")).strip() if isinstance(a, dict) else ""
        if name and name not in out:
            out.append(name)
    return out


def _rank(priority: str | int) -> int:
    return priority if isinstance(priority, int) else PRIORITY_RANK.get(str(priority), 2)


def enqueue(conn: sqlite3.Connection, study_uid: str, sop_uids: Iterable[str],
            destination: str, priority: str | int = "routine", now: float | None = None,
            origin: str = "rule") -> int:
    """Queue instances to one destination; an instance already queued there is left as it is
    (its priority raised if this one is higher).  Runs in the caller's transaction."""
    t = time.time() if now is None else now
    added = 0
    rank = _rank(priority)
    for uid in sop_uids:
        cur = conn.execute(
            "INSERT OR IGNORE INTO forward_outbox (destination, study_uid, sop_uid,"
            " priority_rank, origin, next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?)",
            (destination, study_uid, uid, rank, origin, t, t))
        if cur.rowcount:
            added += 1
        else:
            conn.execute("UPDATE forward_outbox SET priority_rank = ? WHERE destination = ?"
                         " AND sop_uid = ? AND priority_rank > ?", (rank, destination, uid, rank))
    return added


def enqueue_study(conn: sqlite3.Connection, study_uid: str, destinations: Iterable[str],
                  priority: str | int = "routine", now: float | None = None,
                  origin: str = "rule") -> int:
    """Queue every stored instance of a study to each destination (safe to call twice)."""
    uids = [r["sop_uid"] for r in dicom_index.instances_to_send(conn, study_uid=study_uid)]
    return sum(enqueue(conn, study_uid, uids, d, priority, now, origin) for d in destinations)


def follow_late(conn: sqlite3.Connection, study_uid: str, now: float | None = None) -> int:
    """Late instances follow their study: queue what is new to every destination the study
    was already queued to, at the study's priority there."""
    dests = conn.execute("SELECT destination, MIN(priority_rank) FROM forward_outbox"
                         " WHERE study_uid = ? GROUP BY destination", (study_uid,)).fetchall()
    if not dests:
        return 0
    uids = [r["sop_uid"] for r in dicom_index.instances_to_send(conn, study_uid=study_uid)]
    return sum(enqueue(conn, study_uid, uids, d, rank, now, "late") for d, rank in dests)


def resend_instances(conn: sqlite3.Connection, sop_instance_uids: Iterable[str],
                     now: float | None = None) -> int:
    """Queue these instances again to every destination they were queued or sent to before
    (e.g. after a header correction): the rows go back to ``waiting``, due now.  Returns how
    many rows were re-queued."""
    t = time.time() if now is None else now
    uids = list(sop_instance_uids)
    n = 0
    with db.transaction(conn):
        for i in range(0, len(uids), 500):
            chunk = uids[i:i + 500]
            n += conn.execute(
                "UPDATE forward_outbox SET state = 'waiting', next_attempt_at = ?, attempts = 0,"
                " lease_owner = NULL, lease_until = NULL, commit_uid = NULL, proof = '',"
                " last_error = '', delivered_at = NULL, origin = 'resend' WHERE sop_uid IN"
                f" ({','.join('?' * len(chunk))})", (t, *chunk)).rowcount
    return n


def holders(conn: sqlite3.Connection, sop_uids: Iterable[str]) -> dict[str, list[str]]:
    """SOP Instance UID → destinations that may hold a copy of it as it was: once stored
    there, or in flight (a C-STORE whose answer was lost may have stored it).  Read before
    :func:`resend_instances` (which sends the corrected copy) to know whose old copy to
    remove; report documents (origin ``report``) are report delivery's to tell."""
    out: dict[str, list[str]] = {}
    uids = list(sop_uids)
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        for sop, dest in conn.execute(
                "SELECT sop_uid, destination FROM forward_outbox WHERE origin != 'report' AND"
                " (stored_at IS NOT NULL OR state IN ('sending', 'stored', 'delivered'))"
                f" AND sop_uid IN ({','.join('?' * len(chunk))}) ORDER BY id", chunk):
            out.setdefault(sop, []).append(dest)
    return out


def states(conn: sqlite3.Connection, destination: str, sop_uids: list[str]) -> dict[str, str]:
    """SOP Instance UID → its row's state at one destination (``delivered``: the copy sent
    since it was last queued is proved there)."""
    return {uid: r["state"] for uid, r in rows_for(conn, destination, sop_uids).items()}


def commit_documents_again(conn: sqlite3.Connection, sop_uids: Iterable[str]) -> int:
    """Report documents about to be sent again (a corrected header, same SOP Instance UID):
    their commitment is asked again, so the old copy's commitment does not count for the new
    one.  Runs in the caller's transaction; returns the rows changed."""
    uids, n = list(sop_uids), 0
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        n += conn.execute(
            "UPDATE forward_outbox SET state = 'stored', commit_uid = NULL, proof = '',"
            " delivered_at = NULL WHERE origin = 'report' AND state = 'delivered' AND sop_uid IN"
            f" ({','.join('?' * len(chunk))})", chunk).rowcount
    return n


def requeue(conn: sqlite3.Connection, destination: str, study_uid: str, sop_uids: list[str],
            origin: str, now: float) -> int:
    """Queue instances to one destination whatever their row says (the PACS lacks them):
    new rows are added, finished ones go back to ``waiting``; rows in flight are left."""
    n = 0
    with db.transaction(conn):
        for uid in sop_uids:
            cur = conn.execute(
                "INSERT OR IGNORE INTO forward_outbox (destination, study_uid, sop_uid,"
                " priority_rank, origin, next_attempt_at, created_at) VALUES (?,?,?,2,?,?,?)",
                (destination, study_uid, uid, origin, now, now))
            if not cur.rowcount:
                cur = conn.execute(
                    "UPDATE forward_outbox SET state = 'waiting', next_attempt_at = ?, proof = '',"
                    " commit_uid = NULL, delivered_at = NULL, origin = ? WHERE destination = ?"
                    " AND sop_uid = ? AND state IN ('delivered', 'failed')",
                    (now, origin, destination, uid))
            n += cur.rowcount
    return n


def rows_for(conn: sqlite3.Connection, destination: str,
             sop_uids: list[str]) -> dict[str, sqlite3.Row]:
    out: dict[str, sqlite3.Row] = {}
    for i in range(0, len(sop_uids), 500):
        chunk = sop_uids[i:i + 500]
        for r in conn.execute("SELECT * FROM forward_outbox WHERE destination = ? AND sop_uid IN"
                              f" ({','.join('?' * len(chunk))})", (destination, *chunk)):
            out[r["sop_uid"]] = r
    return out


def backoff_s(attempts: int, low: float, high: float) -> float:
    """Delay after ``attempts`` failures: low, 2×low, 4×low … at most ``high``."""
    return min(float(high), float(low) * (2 ** max(0, attempts - 1)))


# -- leases ------------------------------------------------------------------------------------
def recover(conn: sqlite3.Connection, now: float) -> int:
    """``sending`` rows whose lease ran out, or whose holder died on this host, wait again.

    The C-STORE may have reached the PACS before the holder died: sending the same file
    again stores the same SOP Instance once more, which the PACS keeps as one object."""
    with db.transaction(conn):
        rows = conn.execute("SELECT id, lease_owner, lease_until FROM forward_outbox"
                            " WHERE state = 'sending'").fetchall()
        dead = [r["id"] for r in rows if r["lease_until"] <= now or holder_gone(r["lease_owner"])]
        for rid in dead:
            conn.execute("UPDATE forward_outbox SET state = 'waiting', lease_owner = NULL,"
                         " lease_until = NULL WHERE id = ? AND state = 'sending'", (rid,))
    return len(dead)


def due_destinations(conn: sqlite3.Connection, now: float) -> list[str]:
    """Destinations with waiting rows due, the one with the most urgent row first."""
    return [r[0] for r in conn.execute(
        "SELECT destination FROM forward_outbox WHERE state = 'waiting' AND next_attempt_at <= ?"
        " GROUP BY destination ORDER BY MIN(priority_rank), MIN(next_attempt_at)", (now,))]


def lease(conn: sqlite3.Connection, destination: str, owner: str, now: float, lease_s: float,
          limit: int) -> list[sqlite3.Row]:
    """Take up to ``limit`` due rows of one destination: STAT first, then the oldest due."""
    with db.transaction(conn):
        rows = conn.execute(
            "SELECT * FROM forward_outbox WHERE destination = ? AND state = 'waiting'"
            " AND next_attempt_at <= ? ORDER BY priority_rank, next_attempt_at, id LIMIT ?",
            (destination, now, limit)).fetchall()
        for r in rows:
            conn.execute("UPDATE forward_outbox SET state = 'sending', lease_owner = ?,"
                         " lease_until = ? WHERE id = ?", (owner, now + lease_s, r["id"]))
    return rows


def renew(conn: sqlite3.Connection, ids: list[int], owner: str, until: float) -> None:
    with db.transaction(conn):
        for rid in ids:
            conn.execute("UPDATE forward_outbox SET lease_until = ? WHERE id = ? AND"
                         " lease_owner = ? AND state = 'sending'", (until, rid, owner))


# -- outcomes (each guarded by the lease: a row another worker took over is left alone) -------
def stored(conn: sqlite3.Connection, outcomes: list[tuple[int, str, str, str]], owner: str,
           now: float) -> int:
    """``sending → stored`` for (row id, sha256, syntax sent, status) in one transaction.

    Outcomes are written in small groups: a kill loses at most one group's knowledge, and
    those rows are sent again with the same file (the PACS keeps one object)."""
    with db.transaction(conn):
        return sum(conn.execute(
            "UPDATE forward_outbox SET state = 'stored', attempts = attempts + 1, sha256 = ?,"
            " sent_syntax = ?, last_status = ?, last_error = '', stored_at = ?,"
            " failing_since = NULL, lease_owner = NULL, lease_until = NULL"
            " WHERE id = ? AND lease_owner = ? AND state = 'sending'",
            (sha256, syntax, status, now, row_id, owner)).rowcount
            for row_id, sha256, syntax, status in outcomes)


def retry_later(conn: sqlite3.Connection, row_ids: list[int], owner: str | None, error: str,
                now: float, low: float, high: float) -> None:
    """The attempt failed in a way that may pass: wait, with a doubling delay."""
    with db.transaction(conn):
        for rid in row_ids:
            r = conn.execute("SELECT attempts, lease_owner, state FROM forward_outbox"
                             " WHERE id = ?", (rid,)).fetchone()
            if r is None or (owner is not None and r["lease_owner"] != owner):
                continue
            attempts = r["attempts"] + 1
            conn.execute(
                "UPDATE forward_outbox SET state = 'waiting', attempts = ?, next_attempt_at = ?,"
                " last_error = ?, failing_since = COALESCE(failing_since, ?), lease_owner = NULL,"
                " lease_until = NULL, commit_uid = NULL WHERE id = ?",
                (attempts, now + backoff_s(attempts, low, high), error[:500], now, rid))


def defer_destination(conn: sqlite3.Connection, destination: str, now: float) -> int:
    """The destination did not answer: its other due rows wait as long as the batch that
    tried (one attempt per pass, not one timeout per row); their attempts are unchanged."""
    with db.transaction(conn):
        until = conn.execute("SELECT MIN(next_attempt_at) FROM forward_outbox WHERE destination"
                             " = ? AND state = 'waiting' AND next_attempt_at > ?",
                             (destination, now)).fetchone()[0]
        if until is None:
            return 0
        return conn.execute("UPDATE forward_outbox SET next_attempt_at = ? WHERE destination = ?"
                            " AND state = 'waiting' AND next_attempt_at <= ?",
                            (until, destination, now)).rowcount


def refused(conn: sqlite3.Connection, row: sqlite3.Row, owner: str, error: str, status: str,
            now: float) -> None:
    """A permanent refusal: the row stops retrying, is shown as failed and audited."""
    with db.transaction(conn):
        done = conn.execute(
            "UPDATE forward_outbox SET state = 'failed', attempts = attempts + 1, last_error = ?,"
            " last_status = ?, failing_since = COALESCE(failing_since, ?), lease_owner = NULL,"
            " lease_until = NULL WHERE id = ? AND lease_owner = ? AND state = 'sending'",
            (error[:500], status, now, row["id"], owner)).rowcount
        if done:
            audit.record(conn, ACTOR, "forward.refused", row["sop_uid"], source="worker",
                         outcome="failed", ts=now,
                         detail={"destination": row["destination"], "study_uid": row["study_uid"],
                                 "status": status, "error": error[:200]})


def delivered(conn: sqlite3.Connection, destination: str, sop_uids: Iterable[str], proof: str,
              now: float, commit_uid: str | None = None) -> int:
    """``stored → delivered`` with its proof (``commitment`` or ``c-find``)."""
    n = 0
    with db.transaction(conn):
        for uid in sop_uids:
            sql = ("UPDATE forward_outbox SET state = 'delivered', proof = ?, delivered_at = ?"
                   " WHERE destination = ? AND sop_uid = ? AND state = 'stored'")
            args: tuple = (proof, now, destination, uid)
            if commit_uid is not None:
                sql, args = sql + " AND commit_uid = ?", (*args, commit_uid)
            n += conn.execute(sql, args).rowcount
    return n


def unproved(conn: sqlite3.Connection, now: float, settle_s: float,
             limit: int) -> dict[str, list[sqlite3.Row]]:
    """Per destination, rows stored at least ``settle_s`` ago with no proof asked for: their
    sender died between the C-STORE and the C-FIND or the commitment request."""
    out: dict[str, list[sqlite3.Row]] = {}
    for r in conn.execute("SELECT * FROM forward_outbox WHERE state = 'stored' AND commit_uid IS"
                          " NULL AND origin != 'report' AND stored_at <= ? ORDER BY id LIMIT ?", (now - settle_s, limit)):
        out.setdefault(r["destination"], []).append(r)
    return out


def study_rows(conn: sqlite3.Connection, study_uid: str) -> list[dict[str, Any]]:
    """A study's forwarding rows (what the study page and ``forward status`` show)."""
    return [dict(r) for r in conn.execute(
        "SELECT destination, sop_uid, state, attempts, proof, sent_syntax, last_status,"
        " last_error FROM forward_outbox WHERE study_uid = ? ORDER BY destination, id",
        (study_uid,))]


def study_summary(conn: sqlite3.Connection, study_uid: str) -> dict[str, dict[str, int]]:
    """Per destination, rows per state, for one study."""
    out: dict[str, dict[str, int]] = {}
    for dest, state, n in conn.execute(
            "SELECT destination, state, COUNT(*) FROM forward_outbox WHERE study_uid = ?"
            " GROUP BY destination, state", (study_uid,)):
        out.setdefault(dest, dict.fromkeys(STATES, 0))[state] = n
    return out


def study_forwarding(conn: sqlite3.Connection, study_uid: str) -> list[dict[str, Any]]:
    """What the report page says of a study's images at each destination: rows per state
    and, when some were refused for good, the first refusal (its status and error)."""
    out = []
    for dest, states in sorted(study_summary(conn, study_uid).items()):
        refusal = conn.execute(
            "SELECT last_status, last_error FROM forward_outbox WHERE study_uid = ? AND"
            " destination = ? AND state = 'failed' ORDER BY id LIMIT 1",
            (study_uid, dest)).fetchone()
        out.append({"destination": dest, "states": states,
                    "refusal": dict(refusal) if refusal else None})
    return out
