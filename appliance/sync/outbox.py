"""The outbox: what is due for a bundle, reserved bundle rows, the sequence and the link state.

The durable state of cloud sync is the outbox (``bundles`` and ``bundle_items``,
migration 7): ``building → built → uploading → uploaded → confirmed``, with
attempts, the next attempt, a lease, a priority and bytes sent.  huey only wakes
the sweep (``sync.upload.sweep``); a worker killed at any line leaves a row
whose lease runs out (or whose owner is a dead process on this host) and the
next sweep takes it over.

What goes out, most urgent first (re-decided at every part boundary):
STAT studies, then signed reports and audit slices, then routine studies.
A study is bundled once it has been quiet for ``worker.quiet_period_s``;
instances that arrive later go into a new bundle of their own, so every
stored instance version ends up in exactly one bundle.

Other capabilities' tables are read only through their owners' functions:
the DICOM index through ``dicom_node.index``, read items through
``reading.worklist``, reports through ``reports.model``, the audit trail
through ``core.audit``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from appliance.consults import recordings as consult_recordings
from appliance.core import audit, audit_heads, db
from appliance.core.config import Config
from appliance.core.leases import holder_gone
from appliance.reading import worklist
from appliance.reports import model as reports
from appliance.sync import bundle as bnd
from dicom_node import index as dicom_index

BACKOFF_MIN_S, BACKOFF_MAX_S = 5.0, 600.0
LINK_KEY = "sync.link"
MAX_BUILDS_PER_SWEEP = 8
ACTOR = "system:sync"

# The ledgers ``dicom_node.index`` checks instance versions against: every bundled one,
# and those in a confirmed bundle (temporary views over this capability's own tables).
BUNDLED = "temp.sync_bundled_instances"
CONFIRMED = "temp.sync_confirmed_instances"
_LEDGER_VIEWS = (
    "CREATE TEMP VIEW IF NOT EXISTS sync_bundled_instances AS SELECT item_id AS sop_uid,"
    " version AS sha256 FROM main.bundle_items WHERE item_kind='instance'",
    "CREATE TEMP VIEW IF NOT EXISTS sync_confirmed_instances AS SELECT b.item_id AS sop_uid,"
    " b.version AS sha256 FROM main.bundle_items b JOIN main.bundles USING (bundle_id)"
    " WHERE b.item_kind='instance' AND bundles.state='confirmed'",
)
# Bundles waiting to be sent or confirmed whose next attempt has come.
_DUE_FOR_UPLOAD = "state IN ('built','uploading','uploaded') AND next_attempt <= ?"


def enabled(cfg: Config) -> bool:
    s = cfg["sync"]
    return s["target"] != "none" and bool(s["recipients"])


def bundles_dir(cfg: Config) -> Path:
    return cfg.data_dir / "bundles"


def object_key(cfg: Config, row: sqlite3.Row) -> str:
    return f"{cfg['sync']['prefix']}{row['site_id']}/{row['seq']:010d}-{row['kind']}-" \
           f"{row['bundle_id']}.bundle"


# -- link state ------------------------------------------------------------------------------
def link_state(conn: sqlite3.Connection) -> dict[str, Any]:
    r = conn.execute("SELECT value FROM settings WHERE key=?", (LINK_KEY,)).fetchone()
    return json.loads(r[0]) if r else {"up": None, "failures": 0, "next_check": 0}


def set_link_state(conn: sqlite3.Connection, state: dict[str, Any]) -> None:
    conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
                 " SET value=excluded.value", (LINK_KEY, json.dumps(state)))


# -- what is waiting -------------------------------------------------------------------------
def ledger_views(conn: sqlite3.Connection) -> None:
    """Create this connection's ledger views (idempotent; temporary, so no migration)."""
    for sql in _LEDGER_VIEWS:
        conn.execute(sql)


def unbundled_instances(conn: sqlite3.Connection, quiet_before: float | None = None,
                        limit: int | None = None) -> list[sqlite3.Row]:
    """Current instance versions in no bundle yet, of studies quiet since ``quiet_before``."""
    ledger_views(conn)
    return dicom_index.unlisted_instances(conn, BUNDLED, quiet_before, limit)


def unbundled_summary(conn: sqlite3.Connection) -> tuple[int, float | None, int]:
    """(count, oldest received_at, bytes) of instance versions in no bundle yet."""
    ledger_views(conn)
    return dicom_index.unlisted_summary(conn, BUNDLED)


def due_for_upload(conn: sqlite3.Connection, now: float) -> list[sqlite3.Row]:
    """Bundles to send or confirm now, most urgent first."""
    return conn.execute(f"SELECT * FROM bundles WHERE {_DUE_FOR_UPLOAD} ORDER BY priority, seq",
                        (now,)).fetchall()


def any_due_for_upload(conn: sqlite3.Connection, now: float) -> bool:
    return conn.execute(f"SELECT 1 FROM bundles WHERE {_DUE_FOR_UPLOAD} LIMIT 1",
                        (now,)).fetchone() is not None


def _last_report_version_bundled(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT MAX(CAST(item_id AS INTEGER)) FROM bundle_items"
                        " WHERE item_kind='report_version'").fetchone()[0] or 0


def unbundled_recordings(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Recordings made here that no bundle carries yet (consults owns the recordings, sync the
    bundles: the filter is sync's)."""
    bundled = {r[0] for r in conn.execute(
        "SELECT item_id FROM bundle_items WHERE item_kind = 'recording'")}
    return [r for r in consult_recordings.local_recordings(conn) if r["name"] not in bundled]


def unbundled_report_versions(conn: sqlite3.Connection,
                              limit: int | None = None) -> list[dict[str, Any]]:
    """Signed versions after the last one bundled (versions are append-only, bundled in order)."""
    return reports.signed_versions_after(conn, _last_report_version_bundled(conn), limit)


def _last_audit_slice(conn: sqlite3.Connection) -> tuple[int, float]:
    last = conn.execute("SELECT MAX(CAST(item_id AS INTEGER)) AS last_id, MAX(b.created_at) AS at"
                        " FROM bundle_items i JOIN bundles b USING (bundle_id)"
                        " WHERE i.item_kind='audit'").fetchone()
    return last["last_id"] or 0, last["at"] or 0


# -- reserving bundles -----------------------------------------------------------------------
def next_seq(conn: sqlite3.Connection, site_id: str) -> int:
    return conn.execute(
        "INSERT INTO bundle_sequence (site_id, last_seq) VALUES (?, 1) ON CONFLICT(site_id)"
        " DO UPDATE SET last_seq = last_seq + 1 RETURNING last_seq", (site_id,)).fetchone()[0]


def study_priority(conn: sqlite3.Connection, cfg: Config, study_uid: str,
                   description: str) -> int:
    """STAT when the read queue made it STAT or its workflow says ``sync: high``
    (``sync: low`` keeps it routine), else when its description has a STAT keyword."""
    priority, wanted = worklist.sync_wish(conn, study_uid)
    if wanted in ("high", "low"):
        return bnd.PRIORITY_STAT if wanted == "high" else bnd.PRIORITY_ROUTINE
    if priority == "stat":
        return bnd.PRIORITY_STAT
    text = (description or "").upper()
    if any(k.upper() in text for k in cfg["sync"]["stat_keywords"]):
        return bnd.PRIORITY_STAT
    return bnd.PRIORITY_ROUTINE


def _create(conn: sqlite3.Connection, cfg: Config, kind: str, subject: str, priority: int,
            items: list[tuple[str, str, str, str, int]], owner: str) -> str:
    """Reserve a bundle: sequence number, outbox row and items, in the caller's transaction."""
    site_id = cfg["site"]["id"]
    seq = next_seq(conn, site_id)
    bundle_id = bnd.new_bundle_id(site_id, seq)
    now = time.time()
    conn.execute(
        "INSERT INTO bundles (bundle_id, site_id, seq, kind, subject, priority, state, path,"
        " lease_owner, lease_until, created_at) VALUES (?,?,?,?,?,?,'building',?,?,?,?)",
        (bundle_id, site_id, seq, kind, subject, priority, f"{bundle_id}.bundle", owner,
         now + cfg["sync"]["lease_s"], now))
    conn.executemany(
        "INSERT INTO bundle_items (bundle_id, item_kind, item_id, version, path, size)"
        " VALUES (?,?,?,?,?,?)", [(bundle_id, *it) for it in items])
    return bundle_id


def plan(conn: sqlite3.Connection, cfg: Config, now: float, force: bool = False,
         owner: str = "") -> list[str]:
    """Reserve bundles for what is due: quiet studies' unbundled instances, signed report
    versions, and an audit slice when the interval has passed (``force``: now)."""
    quiet = 0 if force else cfg["worker"]["quiet_period_s"]
    made: list[str] = []
    if not force and not _anything_due(conn, cfg, now - quiet):
        return made  # the common case: no write transaction, no lock taken from ingest
    with db.transaction(conn):
        by_study: dict[str, list] = {}
        for r in unbundled_instances(conn, now - quiet):
            by_study.setdefault(r["study_uid"], []).append(r)
        for study_uid, rs in list(by_study.items())[:MAX_BUILDS_PER_SWEEP]:
            prio = study_priority(conn, cfg, study_uid, rs[0]["study_description"])
            items = [("instance", r["sop_uid"], r["sha256"], r["path"], r["size"]) for r in rs]
            made.append(_create(conn, cfg, "study", study_uid, prio, items, owner))
        made += _plan_reports(conn, cfg, owner)
        made += _plan_recordings(conn, cfg, owner)
        made += _plan_audit(conn, cfg, now, force, owner)
    return made


def _anything_due(conn: sqlite3.Connection, cfg: Config, quiet_before: float) -> bool:
    """A read-only look: is any study, report version or audit slice waiting for a bundle?"""
    if unbundled_instances(conn, quiet_before, limit=1):
        return True
    if unbundled_report_versions(conn, limit=1):
        return True
    if unbundled_recordings(conn):
        return True
    return time.time() - _last_audit_slice(conn)[1] >= cfg["sync"]["audit_interval_s"]


def _plan_reports(conn: sqlite3.Connection, cfg: Config, owner: str) -> list[str]:
    return [_create(conn, cfg, "report", str(v["report_id"]), bnd.PRIORITY_RECORDS,
                    [("report_version", str(v["id"]), v["sha256"], "", 0)], owner)
            for v in unbundled_report_versions(conn)]


def _plan_recordings(conn: sqlite3.Connection, cfg: Config, owner: str) -> list[str]:
    """One bundle per sealed consult recording (already age-encrypted; carried as it is)."""
    return [_create(conn, cfg, "recording", r["study_uid"] or f"consult:{r['consult_id']}",
                    bnd.PRIORITY_RECORDS,
                    [("recording", r["name"], r["sha256"], f"recordings/{r['name']}", r["size"])],
                    owner) for r in unbundled_recordings(conn)]


def _plan_audit(conn: sqlite3.Connection, cfg: Config, now: float, force: bool,
                owner: str) -> list[str]:
    last_id, at = _last_audit_slice(conn)
    if not force and now - at < cfg["sync"]["audit_interval_s"]:
        return []
    top = audit.last_id(conn)
    if top <= last_id:
        return []
    # The slice's last row is signed before it is reserved, so the slice carries its own head.
    audit_heads.append_head(cfg.data_dir, cfg.keys_dir, conn)
    return [_create(conn, cfg, "audit", f"{last_id + 1}-{top}", bnd.PRIORITY_RECORDS,
                    [("audit", str(top), str(last_id + 1), "", 0)], owner)]


# -- leases ----------------------------------------------------------------------------------
def lease_next(conn: sqlite3.Connection, cfg: Config, owner: str,
               now: float) -> sqlite3.Row | None:
    """Lease the most urgent bundle due for upload that nobody live holds."""
    with db.transaction(conn):
        for r in due_for_upload(conn, now):
            if r["lease_until"] > now and r["lease_owner"] != owner \
                    and not holder_gone(r["lease_owner"]):
                continue
            conn.execute("UPDATE bundles SET lease_owner=?, lease_until=? WHERE bundle_id=?",
                         (owner, now + cfg["sync"]["lease_s"], r["bundle_id"]))
            return conn.execute("SELECT * FROM bundles WHERE bundle_id=?",
                                (r["bundle_id"],)).fetchone()
    return None
