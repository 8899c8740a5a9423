"""How far a hand-back has got: the one source of the terminal bar, the status page's panel
and the ``appliance_handback_*`` gauges.

A hand-back writes its figures into ``handback_progress`` (migration 23) as it goes:
instances, bytes and report documents planned and sent, the rate of this stretch, its state
and, once done, the manifest.  The runner hands the same :class:`Snapshot` it wrote to the
terminal bar, and the status page reads it back, so the two never disagree.

The row names its writer (host and pid).  A run killed with -9 cannot say it stopped, so a
``running`` row whose process is gone from this host (or that has not moved for
:data:`STALE_S`, for a writer on another host) reads as ``interrupted``.  The next hand-back
to that destination (same ``--since``) continues the row: what the PACS now holds of the
first plan counts as sent, so the totals at the end are the whole hand-back's, not the last
stretch's.  Counts, sizes and times only: no patient data.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

from appliance.core import db
from appliance.core.leases import holder_gone

STALE_S = 600.0  # a live run writes at least once per sending pass; 10 min still means gone
RECENT_S = 7 * 86400  # the panel shows a destination's last hand-back this long after it moved
STATES = ("running", "done", "interrupted")


class AlreadyRunning(Exception):
    """Another live process is handing back to this destination."""


@dataclass(frozen=True)
class Snapshot:
    """One hand-back's figures as last written (what the bar, the panel and /metrics show)."""

    id: int
    destination: str
    since: float
    started_at: float
    updated_at: float
    state: str
    instances_planned: int
    instances_sent: int
    instances_failed: int
    bytes_planned: int
    bytes_sent: int
    reports_planned: int
    reports_sent: int
    rate_instances_s: float
    rate_bytes_s: float
    resumes: int
    manifest: str
    note: str
    owner_host: str
    owner_pid: int

    @property
    def seconds_left(self) -> float | None:
        """Time left at the rate of this stretch (by bytes; by instances when sizes are
        unknown); None when nothing moves yet or the run is not running."""
        if self.state != "running":
            return None
        if self.bytes_planned and self.rate_bytes_s > 0:
            return max(0.0, (self.bytes_planned - self.bytes_sent) / self.rate_bytes_s)
        if self.rate_instances_s > 0:
            return max(0.0, (self.instances_planned - self.instances_sent) / self.rate_instances_s)
        return None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds_left": self.seconds_left}


def duration_text(seconds: float | None) -> str:
    """``42 s``, ``7 min 05 s``, ``2 h 10 min``; ``—`` when unknown (bar and panel alike)."""
    if seconds is None:
        return "—"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _snapshot(row: sqlite3.Row, now: float) -> Snapshot:
    snap = Snapshot(**{k: row[k] for k in Snapshot.__dataclass_fields__})
    if snap.state == "running" and _gone(snap, now):
        return replace(snap, state="interrupted", note=snap.note or "its process is gone")
    return snap


def _gone(snap: Snapshot, now: float) -> bool:
    """Its writer is dead: a process of this host that no longer exists (however long its
    last pass took), or, for a writer on another host, no update for :data:`STALE_S`."""
    if snap.owner_host == socket.gethostname():
        return holder_gone(f"{snap.owner_host}:{snap.owner_pid}")
    return now - snap.updated_at > STALE_S


def latest(conn: sqlite3.Connection, destination: str, now: float) -> Snapshot | None:
    """The destination's last hand-back (``interrupted`` when its writer is gone)."""
    row = conn.execute("SELECT * FROM handback_progress WHERE destination = ? ORDER BY id DESC"
                       " LIMIT 1", (destination,)).fetchone()
    return None if row is None else _snapshot(row, now)


def recent(conn: sqlite3.Connection, now: float, window_s: float = RECENT_S) -> list[Snapshot]:
    """Each destination's last hand-back that moved within ``window_s`` or still runs: what
    the status page's panel and the gauges show."""
    rows = conn.execute(
        "SELECT * FROM handback_progress WHERE id IN (SELECT MAX(id) FROM handback_progress"
        " GROUP BY destination) ORDER BY destination").fetchall()
    snaps = [_snapshot(r, now) for r in rows]
    return [s for s in snaps if s.state == "running" or now - s.updated_at <= window_s]


def check_not_running(conn: sqlite3.Connection, destination: str, now: float) -> Snapshot | None:
    """The destination's last hand-back; raises :class:`AlreadyRunning` when a live process
    is still on it (two hand-backs to one PACS would count each other's instances)."""
    last = latest(conn, destination, now)
    if last is not None and last.state == "running":
        raise AlreadyRunning(
            f"a hand-back to {destination} is already running (pid {last.owner_pid} on"
            f" {last.owner_host}, {last.instances_sent} of {last.instances_planned} instances"
            " sent); wait for it, or stop that process and run handback again to resume")
    return last


@dataclass
class Run:
    """A hand-back in this process: its row, and where this stretch started (for the rate)."""

    snap: Snapshot
    stretch_started: float
    base_instances: int
    base_bytes: int


def begin(conn: sqlite3.Connection, destination: str, since: float,
          lacking: list[tuple[str, int]], arrived_since: Callable[[float], set[str]],
          now: float | None = None) -> Run:
    """Start the hand-back's row, or continue the destination's interrupted one.

    ``lacking`` is the plan: (SOP Instance UID, size) of what the PACS lacks now.  When an
    interrupted hand-back with the same ``since`` is continued, its plan stands: instances of
    it the PACS no longer lacks were sent before the interruption, and instances received
    here since it started (``arrived_since``) join the plan."""
    t = time.time() if now is None else now
    with db.transaction(conn):
        last = check_not_running(conn, destination, t)
        if last is not None and last.state == "interrupted" and last.since == since:
            return _resume(conn, last, lacking, arrived_since(last.started_at), t)
        cur = conn.execute(
            "INSERT INTO handback_progress (destination, since, started_at, updated_at,"
            " instances_planned, bytes_planned, owner_host, owner_pid) VALUES (?,?,?,?,?,?,?,?)",
            (destination, since, t, t, len(lacking), sum(size for _, size in lacking),
             socket.gethostname(), os.getpid()))
        snap = latest(conn, destination, t)
        assert snap is not None and snap.id == cur.lastrowid
    return Run(snap, t, 0, 0)


def _resume(conn: sqlite3.Connection, last: Snapshot, lacking: list[tuple[str, int]],
            arrived: set[str], now: float) -> Run:
    # planned = sent before + every instance lacked now (of the first plan, or arrived since)
    old = [(u, size) for u, size in lacking if u not in arrived]  # of the first plan, still lacked
    base = max(0, last.instances_planned - len(old))
    base_bytes = max(0, last.bytes_planned - sum(size for _, size in old))
    conn.execute(
        "UPDATE handback_progress SET state = 'running', updated_at = ?, instances_planned = ?,"
        " instances_sent = ?, instances_failed = 0, bytes_planned = ?, bytes_sent = ?,"
        " rate_instances_s = 0, rate_bytes_s = 0, resumes = resumes + 1, note = '',"
        " owner_host = ?, owner_pid = ? WHERE id = ?",
        (now, base + len(lacking), base, base_bytes + sum(size for _, size in lacking), base_bytes,
         socket.gethostname(), os.getpid(), last.id))
    snap = latest(conn, last.destination, now)
    assert snap is not None
    return Run(snap, now, base, base_bytes)


def _write(conn: sqlite3.Connection, run: Run, now: float, **fields: Any) -> Snapshot:
    sets = ", ".join(f"{k} = ?" for k in fields)
    with db.transaction(conn):
        conn.execute(f"UPDATE handback_progress SET updated_at = ?, {sets} WHERE id = ?",
                     (now, *fields.values(), run.snap.id))
    run.snap = replace(run.snap, updated_at=now, **fields)
    return run.snap


def instances(conn: sqlite3.Connection, run: Run, sent: int, sent_bytes: int, failed: int,
              now: float | None = None) -> Snapshot:
    """Record this stretch's instances across (``sent``, ``sent_bytes``) and refused for good;
    the totals add what earlier stretches sent, the rate is this stretch's."""
    t = time.time() if now is None else now
    took = max(t - run.stretch_started, 1e-6)
    return _write(conn, run, t, instances_sent=run.base_instances + sent,
                  bytes_sent=run.base_bytes + sent_bytes, instances_failed=failed,
                  rate_instances_s=sent / took, rate_bytes_s=sent_bytes / took)


def reports(conn: sqlite3.Connection, run: Run, planned: int, sent: int,
            now: float | None = None) -> Snapshot:
    """Record the report documents (SRs) planned and delivered so far."""
    return _write(conn, run, time.time() if now is None else now, reports_planned=planned,
                  reports_sent=sent)


def finish(conn: sqlite3.Connection, run: Run, manifest: str, not_delivered: int,
           now: float | None = None) -> Snapshot:
    """The manifest is written: the hand-back is done (``note`` says what was not delivered)."""
    note = f"{not_delivered} not delivered (run handback again)" if not_delivered else ""
    return _write(conn, run, time.time() if now is None else now, state="done",
                  manifest=manifest, note=note)


def interrupt(conn: sqlite3.Connection, run: Run, why: str, now: float | None = None) -> None:
    """The run stopped before its manifest (an error, Ctrl-C): say so, keep the figures for
    the next run to continue.  Best effort: the database may be what failed."""
    try:
        _write(conn, run, time.time() if now is None else now, state="interrupted",
               note=why[:300])
    except sqlite3.Error:
        pass  # the row then reads as interrupted once this process is gone


def counted(rows: Iterable[sqlite3.Row], size: dict[str, int]) -> tuple[int, int, int]:
    """(instances across, their bytes, refused for good) among outbox rows of the plan."""
    sent = sent_bytes = failed = 0
    for r in rows:
        if r["state"] in ("stored", "delivered"):
            sent += 1
            sent_bytes += size.get(r["sop_uid"], 0)
        elif r["state"] == "failed":
            failed += 1
    return sent, sent_bytes, failed
