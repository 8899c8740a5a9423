"""Work for ``appliance media serve``: recordings, probes and relays asked for, with leases.

The web app (a recording asked for after consent, a relay asked for by a page
whose peer connection cannot get through), the probe schedule and the CLI put
rows in ``consult_media_jobs`` (migration 15); the media service leases them.
The row is the durable state, as for every background task here: a service
killed with -9 leaves a ``running`` row whose holder is gone, and the next
service takes it over (a recording carries on for the time left, the dead
recorder's seat in the consult is released).
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from appliance.consults import rooms as consults
from appliance.core import audit
from appliance.core.db import transaction
from appliance.core.leases import holder_gone, new_owner  # noqa: F401  (media_jobs.new_owner is API)

KINDS = ("record", "probe", "relay")
ACTIVE = ("queued", "running")
LEASE_S = 10.0
MAX_SECONDS = {"record": 4 * 3600.0, "probe": 120.0, "relay": 4 * 3600.0}
ACTOR = "appliance-media"


def request(conn: sqlite3.Connection, consult_id: int, kind: str, actor: str,
            seconds: float, streams: int = 0, now: float | None = None,
            source: str = "") -> int:
    """Ask the media service for work; an identical active job is returned, not doubled."""
    t = now if now is not None else time.time()
    if kind not in KINDS:
        raise consults.ConsultError(f"unknown media job {kind!r} (one of {', '.join(KINDS)})")
    if not 1 <= seconds <= MAX_SECONDS[kind]:
        raise consults.ConsultError(f"{kind}: seconds must be between 1 and"
                                    f" {MAX_SECONDS[kind]:.0f}")
    row = consults.get_consult(conn, consult_id)
    if row["ended_at"] is not None:
        raise consults.ConsultError("this consult has ended")
    if kind == "record" and not row["recording_consent_by"]:
        raise consults.ConsultError("recording needs consent first (recorded in the consult page)")
    with transaction(conn):
        same = conn.execute("SELECT id FROM consult_media_jobs WHERE consult_id = ? AND kind = ?"
                            " AND state IN ('queued', 'running')", (consult_id, kind)).fetchone()
        if same is not None:
            return same["id"]
        jid = conn.execute(
            "INSERT INTO consult_media_jobs (consult_id, kind, state, requested_by, requested_at,"
            " seconds, streams) VALUES (?,?,?,?,?,?,?)",
            (consult_id, kind, "queued", actor, t, seconds, streams)).lastrowid
        audit.record(conn, actor, f"consult.{kind}_request", consults._audit_obj(row),
                     source=source, detail={"consult": consult_id, "job": jid,
                                            "seconds": seconds}, ts=t)
    return jid


def claim(conn: sqlite3.Connection, owner: str, now: float | None = None,
          lease_s: float = LEASE_S, limit: int = 8) -> list[sqlite3.Row]:
    """Lease queued jobs and running ones whose holder died or whose lease ran out."""
    t = now if now is not None else time.time()
    got = []
    for r in conn.execute("SELECT * FROM consult_media_jobs WHERE state IN ('queued', 'running')"
                          " ORDER BY requested_at LIMIT ?", (limit * 4,)).fetchall():
        if r["state"] == "running" and r["lease_owner"] == owner:
            continue
        if r["state"] == "running" and r["lease_until"] > t and not holder_gone(r["lease_owner"]):
            continue
        with transaction(conn):
            n = conn.execute(
                "UPDATE consult_media_jobs SET state = 'running', lease_owner = ?,"
                " lease_until = ?, started_at = coalesce(started_at, ?) WHERE id = ?"
                " AND state = ? AND lease_owner IS ?",
                (owner, t + lease_s, t, r["id"], r["state"], r["lease_owner"])).rowcount
        if n:
            got.append(conn.execute("SELECT * FROM consult_media_jobs WHERE id = ?",
                                    (r["id"],)).fetchone())
        if len(got) >= limit:
            break
    return got


def renew(conn: sqlite3.Connection, owner: str, now: float | None = None,
          lease_s: float = LEASE_S) -> None:
    """Extend this service's leases (a write: the service does it every few seconds only)."""
    t = now if now is not None else time.time()
    conn.execute("UPDATE consult_media_jobs SET lease_until = ? WHERE lease_owner = ?"
                 " AND state = 'running'", (t + lease_s, owner))


def held(conn: sqlite3.Connection, owner: str) -> set[int]:
    """The ids this service still holds (a job cancelled from the page drops out)."""
    return {r[0] for r in conn.execute("SELECT id FROM consult_media_jobs WHERE lease_owner = ?"
                                       " AND state = 'running'", (owner,))}


def set_participant(conn: sqlite3.Connection, job_id: int, pid: int) -> None:
    conn.execute("UPDATE consult_media_jobs SET participant_id = ? WHERE id = ?", (pid, job_id))


def finish(conn: sqlite3.Connection, job_id: int, owner: str, state: str,
           result: dict[str, Any], now: float | None = None) -> bool:
    """Record the outcome (done, failed, refused) if this service still holds the job;
    a job stopped from the page stays ``cancelled`` but gets its result (the files sealed)."""
    t = now if now is not None else time.time()
    return bool(conn.execute(
        "UPDATE consult_media_jobs SET state = CASE WHEN state = 'cancelled' THEN state ELSE ?"
        " END, finished_at = ?, result = ?, lease_owner = NULL WHERE id = ? AND lease_owner = ?"
        " AND state IN ('running', 'cancelled')",
        (state, t, json.dumps(result, sort_keys=True, default=str), job_id, owner)).rowcount)


def release(conn: sqlite3.Connection, job_id: int, owner: str) -> bool:
    """Hand a running job back (the service stopping for a restart): the next one resumes it."""
    return bool(conn.execute(
        "UPDATE consult_media_jobs SET lease_owner = NULL, lease_until = 0 WHERE id = ?"
        " AND lease_owner = ? AND state = 'running'", (job_id, owner)).rowcount)


def cancel(conn: sqlite3.Connection, consult_id: int, kind: str, actor: str,
           now: float | None = None, source: str = "") -> int:
    """Stop a consult's active job of this kind (a recording stopped from the page); audited."""
    t = now if now is not None else time.time()
    row = consults.get_consult(conn, consult_id)
    with transaction(conn):
        n = conn.execute("UPDATE consult_media_jobs SET state = 'cancelled', finished_at = ?"
                         " WHERE consult_id = ? AND kind = ? AND state IN ('queued', 'running')",
                         (t, consult_id, kind)).rowcount
        if n:
            audit.record(conn, actor, f"consult.{kind}_stop", consults._audit_obj(row),
                         source=source, detail={"consult": consult_id}, ts=t)
    return n


def get(conn: sqlite3.Connection, job_id: int) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM consult_media_jobs WHERE id = ?", (job_id,)).fetchone()


def active(conn: sqlite3.Connection, consult_id: int) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(
        "SELECT id, kind, state, requested_by, requested_at, seconds FROM consult_media_jobs"
        " WHERE consult_id = ? AND state IN ('queued', 'running') ORDER BY id", (consult_id,))]
