"""Building: the bundle file of a reserved outbox row, written, signed and marked ``built``.

A reservation's contents are rebuilt from ``bundle_items`` alone, so a bundle
built twice (a builder killed mid-write, a local file lost before upload) is
the same bundle under the same id.
"""

from __future__ import annotations

import logging
import sqlite3
import time

from appliance.consults import recordings as consult_recordings
from appliance.core import audit, audit_heads, db, durable, identity
from appliance.core.config import Config
from appliance.core.leases import holder_gone, new_owner
from appliance.reports import model as reports
from appliance.sync import bundle as bnd
from appliance.sync import outbox

log = logging.getLogger("appliance.sync")


def entries(conn: sqlite3.Connection, cfg: Config, bundle_id: str) -> list[bnd.Entry]:
    """What a reserved bundle holds, rebuilt from ``bundle_items`` (so a rebuild is identical)."""
    out = []
    for it in conn.execute("SELECT * FROM bundle_items WHERE bundle_id=? ORDER BY rowid",
                           (bundle_id,)).fetchall():
        if it["item_kind"] == "instance":
            out.append(bnd.Entry(f"dicom/{it['path']}", it["version"], it["size"],
                                 source=cfg.studies_dir / it["path"],
                                 meta={"sop_uid": it["item_id"], "type": "dicom"}))
        elif it["item_kind"] == "report_version":
            rec = reports.version_record(conn, int(it["item_id"]))
            v = rec["version"]
            out.append(bnd.Entry.record(f"records/report-version-{v['id']}.json", rec,
                                        type="report", report_id=v["report_id"]))
        elif it["item_kind"] == "audit":
            first, last = int(it["version"]), int(it["item_id"])
            out.append(bnd.Entry.record(f"records/audit-{first:010d}-{last:010d}.json",
                                        audit.rows_between(conn, first, last),
                                        type="audit", first=first, last=last))
            heads = [h for h in audit_heads.read_heads(audit_heads.heads_path(cfg.data_dir))
                     if isinstance(h.get("id"), int) and first <= h["id"] <= last]
            if heads:  # the signed heads of this slice leave the box with it
                out.append(bnd.Entry.record(f"records/audit-heads-{first:010d}-{last:010d}.json",
                                            heads, type="audit_heads", first=first, last=last))
        elif it["item_kind"] == "recording":
            out.append(bnd.Entry(it["path"], it["version"], it["size"],
                                 source=cfg.data_dir / it["path"],
                                 meta=consult_recordings.bundle_meta(conn, it["item_id"])))
    return out


def build_reserved(conn: sqlite3.Connection, cfg: Config, bundle_id: str,
                   recipients: list[str] | None = None) -> bnd.BundleInfo:
    """Write the bundle file of a reserved row and mark it ``built``."""
    row = conn.execute("SELECT * FROM bundles WHERE bundle_id=?", (bundle_id,)).fetchone()
    for stale in outbox.bundles_dir(cfg).glob(f".{row['path']}.*{durable.TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)  # a temp file a killed builder left
    key = identity.load_signing_key(cfg.keys_dir)
    info = bnd.build(outbox.bundles_dir(cfg) / row["path"], bundle_id, key,
                     recipients or cfg["sync"]["recipients"], entries(conn, cfg, bundle_id),
                     row["priority"], row["kind"], row["subject"])
    with db.transaction(conn):
        conn.execute("UPDATE bundles SET state='built', size=?, sha256=?, built_at=?,"
                     " lease_owner=NULL, lease_until=0 WHERE bundle_id=? AND state='building'",
                     (info.size, info.file_sha256, time.time(), bundle_id))
        audit.record(conn, outbox.ACTOR, "bundle.built", bundle_id, detail={
            "kind": row["kind"], "subject": row["subject"], "seq": row["seq"],
            "size": info.size})
    return info


def _take_over(conn: sqlite3.Connection, cfg: Config, r: sqlite3.Row, owner: str,
               now: float) -> bool:
    """Lease a reservation whose builder is gone or whose lease ran out."""
    if r["lease_until"] > now and not holder_gone(r["lease_owner"]):
        return False
    with db.transaction(conn):
        cur = conn.execute("UPDATE bundles SET lease_owner=?, lease_until=? WHERE"
                           " bundle_id=? AND state='building' AND lease_owner IS ?",
                           (owner, now + cfg["sync"]["lease_s"], r["bundle_id"],
                            r["lease_owner"]))
    return bool(cur.rowcount)


def build_due(conn: sqlite3.Connection, cfg: Config, force: bool = False) -> int:
    """Reserve and build what is due; rebuild reservations a dead builder left. Idempotent."""
    owner = new_owner()
    now = time.time()
    outbox.plan(conn, cfg, now, force, owner)
    built = 0
    for r in conn.execute("SELECT bundle_id, lease_owner, lease_until FROM bundles"
                          " WHERE state='building' ORDER BY priority, seq").fetchall():
        if r["lease_owner"] != owner and not _take_over(conn, cfg, r, owner, now):
            continue
        try:
            build_reserved(conn, cfg, r["bundle_id"])
            built += 1
        except (bnd.BundleError, OSError) as e:
            log.error("bundle %s not built: %s", r["bundle_id"], e)
            conn.execute("UPDATE bundles SET last_error=?, lease_until=? WHERE bundle_id=?",
                         (str(e)[:500], time.time() + outbox.BACKOFF_MAX_S, r["bundle_id"]))
    return built
