"""Copies a destination still holds under an identity that a reconciliation replaced, until
they are gone.

A corrected instance keeps its SOP Instance UID and is sent again by the forwarding outbox.
A PACS that names instances by SOP Instance UID replaces its old copy; Orthanc, which hashes
the Patient ID into its ids, keeps both, so the study would stay findable under the trauma
identity.  Reconciliation therefore records, in the same transaction that queues the
corrected copies, one ``superseded_copies`` row per destination that had the instance (and
per report document delivered there), and this module's sweep acts on each row **only once
the corrected copy is proved delivered at that destination**: a study lost from the site
PACS is a patient-safety incident, a duplicate is an inconvenience.

- A destination with an Orthanc REST API (``orthanc_url`` on the known AE): the corrected
  copy is looked up under the current Patient ID, the old one under the old ID (both exact,
  by SOP Instance UID), the old one is deleted and looked up again.  ``pacs_ref`` names what
  is about to be deleted before the DELETE goes, so a worker killed after it still ends the
  row ``removed`` and audited.
- Any other destination: a C-FIND by Patient ID shows whether the corrected copy is filed
  under the current identity and whether the old one is still there; if it is, the row is
  ``manual`` (listed by ``appliance patient superseded`` and on the desk for the PACS
  administrator) and asked again every ``MANUAL_RECHECK_S`` until it is gone.

Rows are leased while worked on (a dead holder's lease is taken at once, an expired one by
time); every step may run twice: a copy already deleted is not found again.  Every removal,
absence and listing for the administrator is audited.  An IHE IOCM rejection note is not
sent: it names instances by SOP Instance UID, which the corrected copies share, so a PACS
acting on it would hide the corrected copies too (and Orthanc ignores it).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core import audit, db, leases
from appliance.core.config import Config, KnownAE
from appliance.forwarding import outbox
from appliance.patients import orthanc_api
from appliance.reports import delivery
from dicom_node import index as dicom_index
from dicom_node import instance_find

log = logging.getLogger("appliance.patients.superseded")

ACTOR = "system:reconciliation"
STATES = ("waiting", "manual", "removed", "absent", "obsolete")
DONE = ("removed", "absent", "obsolete")
LEASE_S = 120.0
BATCH = 50  # rows leased and worked at once per destination
CANDIDATES = 500  # waiting rows looked at per destination per pass
RECHECK_S = 10.0  # a row whose corrected copy is not yet delivered is looked at again after
MANUAL_RECHECK_S = 600.0  # a copy left to the PACS administrator is asked for again after
SWEEP_BUDGET_S = 30.0


@dataclass(frozen=True)
class Copy:
    """One object a destination may hold: an image, or a report document (SR, PDF)."""

    destination: str
    kind: str
    study_uid: str
    series_uid: str
    sop_uid: str


# -- recording (reconciliation, in its transaction) ---------------------------------------------
def held_copies(conn: sqlite3.Connection, sop_uids: list[str],
                study_uids: list[str]) -> list[Copy]:
    """What destinations may hold of these instances and of these studies' report documents,
    read before the corrected copies are queued (queuing resets the forwarding rows)."""
    where = {r["sop_uid"]: r for r in dicom_index.instances_to_send(conn, sop_uids=sop_uids)}
    out = [Copy(dest, "image", where[sop]["study_uid"], where[sop]["series_uid"], sop)
           for sop, dests in outbox.holders(conn, sop_uids).items() if sop in where
           for dest in dests]
    out += [Copy(d["destination"], "report", d["study_uid"], d["series_uid"], d["sop_uid"])
            for d in delivery.sent_documents(conn, study_uids)]
    return out


def record(conn: sqlite3.Connection, copies: Iterable[Copy], old_ids: dict[str, str],
           link_id: int | None, now: float) -> int:
    """One row per copy whose study's Patient ID changed from ``old_ids[study]``; rows whose
    old ID is the current one again are ``obsolete``.  Runs in the caller's transaction (the
    one that queues the corrected copies).  Returns how many rows are waiting."""
    copies = list(copies)
    current = dicom_index.patient_ids(conn, list(old_ids))
    n = 0
    with db.transaction(conn):
        for study, patient_id in current.items():
            conn.execute("UPDATE superseded_copies SET state = 'obsolete', done_at = ?,"
                         " lease_owner = NULL, lease_until = NULL WHERE study_uid = ? AND"
                         " old_patient_id = ? AND state IN ('waiting', 'manual')",
                         (now, study, patient_id))
        for c in copies:
            old = old_ids.get(c.study_uid, "")
            if not old or old == current.get(c.study_uid, old):
                continue
            n += _upsert(conn, c, old, link_id, now)
    return n


def _upsert(conn: sqlite3.Connection, c: Copy, old: str, link_id: int | None,
            now: float) -> int:
    """A new row, or a finished one for the same copy made waiting again (the old identity
    was current again in between, so its copy was sent again)."""
    return conn.execute(
        "INSERT INTO superseded_copies (destination, kind, old_patient_id, study_uid,"
        " series_uid, sop_uid, link_id, next_check_at, created_at) VALUES (?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT (destination, sop_uid, old_patient_id) DO UPDATE SET"
        " link_id = excluded.link_id, state = 'waiting', attempts = 0, pacs_ref = '',"
        " proof = '', last_error = '', done_at = NULL, next_check_at = excluded.next_check_at,"
        " created_at = excluded.created_at WHERE state IN ('removed', 'absent', 'obsolete')",
        (c.destination, c.kind, old, c.study_uid, c.series_uid, c.sop_uid, link_id, now,
         now)).rowcount


# -- what the CLI and the desk show -----------------------------------------------------------
def listing(conn: sqlite3.Connection, destination: str | None = None, every: bool = False,
            limit: int = 10_000) -> list[dict[str, Any]]:
    """Rows not finished (or ``every`` row), oldest first, with the current Patient ID."""
    sql = "SELECT * FROM superseded_copies WHERE 1 = 1"
    args: list[Any] = []
    if not every:
        sql += " AND state IN ('waiting', 'manual')"
    if destination:
        sql += " AND destination = ?"
        args.append(destination)
    rows = [dict(r) for r in conn.execute(sql + " ORDER BY id LIMIT ?", (*args, limit))]
    now_ids = dicom_index.patient_ids(conn, [r["study_uid"] for r in rows])
    for r in rows:
        r["patient_id"] = now_ids.get(r["study_uid"], "")
        r.pop("lease_owner")
    return rows


def summary(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Per destination, rows per state (no patient data)."""
    out: dict[str, dict[str, int]] = {}
    for dest, state, n in conn.execute("SELECT destination, state, COUNT(*) FROM"
                                       " superseded_copies GROUP BY destination, state"):
        out.setdefault(dest, dict.fromkeys(STATES, 0))[state] = n
    return out


# -- the sweep --------------------------------------------------------------------------------
def recover(conn: sqlite3.Connection) -> int:
    """Leases of holders that died on this host are let go at once (expired ones lapse).
    A read first: the common pass (nothing held) takes no write lock from ingest."""
    held = conn.execute("SELECT id, lease_owner FROM superseded_copies WHERE lease_owner"
                        " IS NOT NULL").fetchall()
    gone = [r for r in held if leases.holder_gone(r["lease_owner"])]
    if gone:
        with db.transaction(conn):
            for r in gone:
                conn.execute("UPDATE superseded_copies SET lease_owner = NULL, lease_until ="
                             " NULL WHERE id = ? AND lease_owner = ?", (r["id"], r["lease_owner"]))
    return len(gone)


def _due_destinations(conn: sqlite3.Connection, now: float) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT destination FROM superseded_copies WHERE state IN ('waiting', 'manual')"
        " AND next_check_at <= ? AND (lease_until IS NULL OR lease_until <= ?)"
        " ORDER BY destination", (now, now))]


def _delivered(conn: sqlite3.Connection, destination: str,
               rows: list[sqlite3.Row]) -> tuple[set[str], dict[str, str]]:
    """SOP UIDs whose corrected copy is proved delivered there, and image rows whose
    forwarding row says it will not be (refused for good)."""
    images = [r["sop_uid"] for r in rows if r["kind"] == "image"]
    reports = [r["sop_uid"] for r in rows if r["kind"] == "report"]
    states = outbox.states(conn, destination, images)
    done = {u for u, s in states.items() if s == "delivered"}
    done |= delivery.delivered_documents(conn, destination, reports)
    failed = {u: s for u, s in states.items() if s == "failed"}
    return done, failed


def _candidates(conn: sqlite3.Connection, destination: str, now: float) -> list[sqlite3.Row]:
    """Due rows that may be acted on now: manual ones to ask again, waiting ones whose
    corrected copy is delivered.  The others are looked at again after ``RECHECK_S``."""
    rows = conn.execute(
        "SELECT * FROM superseded_copies WHERE destination = ? AND state IN ('waiting',"
        " 'manual') AND next_check_at <= ? AND (lease_until IS NULL OR lease_until <= ?)"
        " ORDER BY next_check_at, id LIMIT ?", (destination, now, now, CANDIDATES)).fetchall()
    waiting = [r for r in rows if r["state"] == "waiting"]
    done, failed = _delivered(conn, destination, waiting)
    _look_later(conn, [r for r in waiting if r["sop_uid"] not in done], failed, now)
    return [r for r in rows if r["state"] == "manual" or r["sop_uid"] in done][:BATCH]


def _look_later(conn: sqlite3.Connection, rows: list[sqlite3.Row], failed: dict[str, str],
                now: float) -> None:
    """Not delivered yet: back of the line (saying so when forwarding gave up on it)."""
    if not rows:
        return
    with db.transaction(conn):
        for r in rows:
            why = (f"the corrected copy was refused by {r['destination']} (appliance forward"
                   " status)" if r["sop_uid"] in failed else "")
            conn.execute("UPDATE superseded_copies SET next_check_at = ?, last_error = ?"
                         " WHERE id = ? AND state = 'waiting'", (now + RECHECK_S, why, r["id"]))


def _lease(conn: sqlite3.Connection, rows: list[sqlite3.Row], owner: str,
           now: float) -> list[sqlite3.Row]:
    with db.transaction(conn):
        for r in rows:
            conn.execute("UPDATE superseded_copies SET lease_owner = ?, lease_until = ? WHERE"
                         " id = ? AND state IN ('waiting', 'manual') AND (lease_until IS NULL"
                         " OR lease_until <= ?)", (owner, now + LEASE_S, r["id"], now))
        return conn.execute("SELECT * FROM superseded_copies WHERE lease_owner = ? ORDER BY id",
                            (owner,)).fetchall()


def _retry_later(conn: sqlite3.Connection, cfg: Config, rows: list[sqlite3.Row], owner: str,
                 error: str, now: float) -> None:
    f = cfg["forwarding"]
    with db.transaction(conn):
        for r in rows:
            wait = outbox.backoff_s(r["attempts"] + 1, f["retry_min_s"], f["retry_max_s"])
            conn.execute("UPDATE superseded_copies SET attempts = attempts + 1, last_error = ?,"
                         " next_check_at = ?, lease_owner = NULL, lease_until = NULL WHERE id = ?"
                         " AND lease_owner = ?", (error[:500], now + wait, r["id"], owner))


def _finish(conn: sqlite3.Connection, outcomes: list[tuple[sqlite3.Row, str, str, dict]],
            owner: str, now: float) -> int:
    """Write (row, state, proof, audit detail) outcomes in one transaction, each audited.
    A row a later correction made obsolete meanwhile (its lease cleared) is left alone."""
    n = 0
    with db.transaction(conn):
        for r, state, proof, detail in outcomes:
            wait = now + MANUAL_RECHECK_S if state == "manual" else None
            done = conn.execute(
                "UPDATE superseded_copies SET state = ?, proof = ?, last_error = '', done_at = ?,"
                " next_check_at = COALESCE(?, next_check_at), lease_owner = NULL,"
                " lease_until = NULL WHERE id = ? AND lease_owner = ?",
                (state, proof, None if wait else now, wait, r["id"], owner)).rowcount
            changed = state != r["state"]
            if done and changed:
                audit.record(conn, ACTOR, f"patient.superseded.{state}", r["sop_uid"],
                             source="worker", ts=now, detail={
                                 "destination": r["destination"], "kind": r["kind"],
                                 "old_patient_id": r["old_patient_id"], "link": r["link_id"],
                                 "study_uid": r["study_uid"], "proof": proof, **detail})
            n += done
    return n


# -- by the destination's Orthanc REST API ----------------------------------------------------
def api_for(cfg: Config, peer: KnownAE) -> orthanc_api.OrthancApi:
    """The destination's API with its credentials, if the credentials file names it."""
    name = cfg["patients"]["pacs_credentials_file"]
    creds = {}
    if name:
        path = Path(name) if Path(name).is_absolute() else cfg.data_dir / name
        creds = orthanc_api.read_credentials(path)
    return orthanc_api.OrthancApi(peer.orthanc_url, creds.get(peer.name),
                                  cfg["forwarding"]["timeout_s"])


def _plan(api: orthanc_api.OrthancApi, r: sqlite3.Row, current: str) -> list[str] | str:
    """The Orthanc ids of the old copies to delete, or why nothing may be deleted yet."""
    if not current or current == r["old_patient_id"]:  # never delete the current copy
        return "the study is no longer stored here: the old copy is kept"
    key = (r["study_uid"], r["series_uid"], r["sop_uid"])
    if not api.copies(current, *key):
        return f"{r['destination']} does not show the corrected copy under {current} yet"
    return sorted(set(api.copies(r["old_patient_id"], *key)) | set(_ref(r)))


def _ref(r: sqlite3.Row) -> list[str]:
    return json.loads(r["pacs_ref"]) if r["pacs_ref"] else []


def _by_api(conn: sqlite3.Connection, cfg: Config, peer: KnownAE, rows: list[sqlite3.Row],
            owner: str, now: float) -> int:
    """Check, then delete, then check again, for the leased rows of one destination."""
    try:
        api = api_for(cfg, peer)
        current = dicom_index.patient_ids(conn, [r["study_uid"] for r in rows])
        plans = [(r, _plan(api, r, current.get(r["study_uid"], ""))) for r in rows]
    except orthanc_api.ApiError as e:
        _retry_later(conn, cfg, rows, owner, str(e), now)
        return 0
    for r, why in [(r, p) for r, p in plans if isinstance(p, str)]:
        _retry_later(conn, cfg, [r], owner, why, now)
    plans = [(r, p) for r, p in plans if not isinstance(p, str)]
    _write_ahead(conn, plans, owner)
    try:
        outcomes = [_delete(api, r, ids) for r, ids in plans]
    except orthanc_api.ApiError as e:
        _retry_later(conn, cfg, [r for r, _ in plans], owner, str(e), now)
        return 0
    return _finish(conn, outcomes, owner, now)


def _write_ahead(conn: sqlite3.Connection, plans: list[tuple[sqlite3.Row, list[str]]],
                 owner: str) -> None:
    """Name the copies about to be deleted before any DELETE goes."""
    with db.transaction(conn):
        for r, ids in plans:
            if ids:
                conn.execute("UPDATE superseded_copies SET pacs_ref = ? WHERE id = ? AND"
                             " lease_owner = ?", (json.dumps(ids), r["id"], owner))


def _delete(api: orthanc_api.OrthancApi, r: sqlite3.Row,
            ids: list[str]) -> tuple[sqlite3.Row, str, str, dict]:
    """Delete each old copy and look for the old identity again: ``removed`` (or ``absent``
    when none was ever found); an old copy still there raises, so the row is tried again."""
    for oid in ids:
        if not api.delete(oid):
            raise orthanc_api.ApiError(f"{r['destination']} still holds {oid} after DELETE")
    if api.copies(r["old_patient_id"], r["study_uid"], r["series_uid"], r["sop_uid"]):
        raise orthanc_api.ApiError(f"{r['destination']} still files a copy under"
                                   f" {r['old_patient_id']}")
    if not ids:
        return r, "absent", "orthanc-api", {}
    return r, "removed", "orthanc-api", {"orthanc_ids": ids}


# -- by C-FIND (no REST API: the PACS administrator removes them) -----------------------------
def _peer(cfg: Config, peer: KnownAE) -> instance_find.Peer:
    return instance_find.Peer(cfg["dicom"]["ae_title"], peer.name, peer.host, peer.port,
                              cfg["forwarding"]["timeout_s"])


def _by_cfind(conn: sqlite3.Connection, cfg: Config, peer: KnownAE, rows: list[sqlite3.Row],
              owner: str, now: float) -> int:
    """Corrected copy filed under the current ID? Old copy still there? One C-FIND each."""
    ask, current = _peer(cfg, peer), dicom_index.patient_ids(conn, [r["study_uid"] for r in rows])
    outcomes = []
    for r in rows:
        try:
            outcome = _ask(ask, r, current.get(r["study_uid"], ""))
        except instance_find.FindFailed as e:
            _retry_later(conn, cfg, [r], owner, str(e), now)
            continue
        if isinstance(outcome, str):
            _retry_later(conn, cfg, [r], owner, outcome, now)
        else:
            outcomes.append(outcome)
    return _finish(conn, outcomes, owner, now)


def _ask(ask: instance_find.Peer, r: sqlite3.Row,
         current: str) -> tuple[sqlite3.Row, str, str, dict] | str:
    series = (r["study_uid"], r["series_uid"])
    if r["state"] == "waiting":
        if not current:
            return "the study is no longer stored here: the old copy is kept"
        if r["sop_uid"] not in instance_find.held(ask, current, *series):
            return (f"{r['destination']} does not show the corrected copy under {current}"
                    " (it may have kept the first copy as a duplicate)")
    still = r["sop_uid"] in instance_find.held(ask, r["old_patient_id"], *series)
    if still:
        return r, "manual", "c-find", {}
    if r["state"] == "manual":
        return r, "removed", "c-find (removed at the PACS)", {}
    return r, "absent", "c-find", {}


# -- one pass ---------------------------------------------------------------------------------
def run_due(cfg: Config, now: float | None = None, conn: sqlite3.Connection | None = None,
            budget_s: float = SWEEP_BUDGET_S) -> int:
    """Act on due rows, destination by destination, within a time budget; returns how many
    rows reached a new state."""
    own = conn is None
    conn = conn or db.connect(cfg.db_path)
    t = now if now is not None else time.time()
    started, n, owner = time.monotonic(), 0, leases.new_owner()
    try:
        recover(conn)
        for dest in _due_destinations(conn, t):
            while time.monotonic() - started < budget_s:
                rows = _lease(conn, _candidates(conn, dest, t), owner, t)
                if not rows:
                    break
                n += _work(conn, cfg, dest, rows, owner, t)
    finally:
        if own:
            conn.close()
    return n


def _work(conn: sqlite3.Connection, cfg: Config, dest: str, rows: list[sqlite3.Row],
          owner: str, now: float) -> int:
    current = dicom_index.patient_ids(conn, [r["study_uid"] for r in rows])
    same = [r for r in rows if current.get(r["study_uid"]) == r["old_patient_id"]]
    if same:  # the old identity is the current one again: its copy is the one to keep
        _finish(conn, [(r, "obsolete", "", {}) for r in same], owner, now)
        rows = [r for r in rows if r not in same]
    peer = cfg.known_ae(dest)
    if not rows:
        return len(same)
    if peer is None or not peer.host:
        _retry_later(conn, cfg, rows, owner, f"{dest} is not a known AE with a host", now)
        return 0
    if peer.orthanc_url:
        return len(same) + _by_api(conn, cfg, peer, rows, owner, now)
    return len(same) + _by_cfind(conn, cfg, peer, rows, owner, now)


def sweep(cfg: Config, now: float | None = None) -> None:
    """The worker's periodic step (registered in runtime/tasks.py SWEEP_MODULES, after
    forwarding, whose proofs it waits for)."""
    run_due(cfg, now)
