"""Disaster recovery: a fresh data directory rebuilt from every bundle of a site on a target.

Bundles are applied in sequence order; each is verified, replay-checked against
``received_bundles`` and hash-checked before anything is stored, and a bundle
already applied is skipped, so an interrupted restore is simply run again.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.consults import recordings as consult_recordings
from appliance.core import audit, db, durable
from appliance.core.config import Config
from appliance.dicomweb import metadata as dicomweb_metadata
from appliance.reports import model as reports
from appliance.sync import bundle as bnd
from appliance.sync import targets as st
from dicom_node.study_store import StudyStore


def _bundle_keys(target: st.Target, site_id: str | None) -> list[str]:
    """The target's bundle objects (of one site, if given), in sequence order."""
    objs = []
    for o in target.list(f"{site_id}/" if site_id else ""):
        name = o.key.rsplit("/", 1)[-1]
        if name.endswith(".bundle") and name[:10].isdigit():
            objs.append((int(name[:10]), o.key))
    return [key for _seq, key in sorted(objs)]


def restore(cfg: Config, target: st.Target, identities: list, trusted: list[str],
            site_id: str | None = None, say: Callable[[str], Any] = print) -> dict[str, int]:
    """Rebuild this (fresh) data directory from every bundle of a site on ``target``.

    ``trusted`` (signing key ids) is required: each bundle carries the public key that
    signed it, so checking against that key alone would accept anyone's bundles."""
    if not trusted:
        raise bnd.BundleError("restore needs the trusted signing key id(s) of the site "
                              "(--trust KEY_ID); nothing was restored")
    conn = db.open_db(cfg.db_path)
    try:
        counts = _restore_all(conn, cfg, target, identities, trusted, site_id, say)
        audit.record(conn, "cli:restore", "sync.restore", target.description, source="cli",
                     detail=counts)
    finally:
        conn.close()
    return counts


def _restore_all(conn: sqlite3.Connection, cfg: Config, target: st.Target, identities: list,
                 trusted: list[str] | None, site_id: str | None,
                 say: Callable[[str], Any]) -> dict[str, int]:
    store = StudyStore(cfg.studies_dir, cfg.db_path, connect=db.connect,
                       derive=dicomweb_metadata.at_ingest)  # restored series answer /metadata at once
    counts = {"bundles": 0, "skipped": 0, "rejected": 0, "instances": 0, "reports": 0,
              "audit_rows": 0, "recordings": 0}
    work = cfg.data_dir / "run" / "restore"
    work.mkdir(parents=True, exist_ok=True)
    try:
        for key in _bundle_keys(target, site_id):
            local = work / "incoming.bundle"
            target.download(key, local)
            try:
                info = bnd.verify(local, trusted)
                if conn.execute("SELECT 1 FROM received_bundles WHERE bundle_id=?",
                                (info.bundle_id,)).fetchone():
                    counts["skipped"] += 1
                    continue
                opened = bnd.open_to_staging(local, identities, work / "staging",
                                             bnd.DbLedger(conn), trusted)
            except bnd.BundleError as e:
                counts["rejected"] += 1
                say(f"rejected {key}: {e}")
                continue
            _apply(conn, cfg, store, opened, counts)
            counts["bundles"] += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return counts


def _apply(conn: sqlite3.Connection, cfg: Config, store: StudyStore, opened: bnd.Opened,
           counts: dict[str, int]) -> None:
    """Store one opened bundle's files and records, then mark it received (and confirmed)."""
    m, items = opened.manifest, []
    for fe in m["files"]:
        path = opened.root / fe["name"]
        if fe.get("type") == "dicom":
            result = store.store(path.read_bytes(), calling_ae="", remote_addr="restore")
            if not result.success:
                raise bnd.BundleError(f"{fe['name']}: could not be stored: {result.comment}")
            items.append(("instance", fe["sop_uid"], fe["sha256"], result.record.path
                          if result.record and result.record.path else "", fe["size"]))
            counts["instances"] += 1
        elif fe.get("type") == "report":
            rec = json.loads(path.read_bytes())
            counts["reports"] += reports.restore_version_record(conn, rec)
            items.append(("report_version", str(rec["version"]["id"]), fe["sha256"], "", 0))
        elif fe.get("type") == "audit":
            durable.atomic_write(cfg.data_dir / "restored" / "audit" / Path(fe["name"]).name,
                                 path.read_bytes(), 0o600)
            counts["audit_rows"] += len(json.loads(path.read_bytes()))
            items.append(("audit", str(fe["last"]), str(fe["first"]), "", 0))
        elif fe.get("type") == "audit_heads":  # the lost box's signed heads, kept beside
            durable.atomic_write(cfg.data_dir / "restored" / "audit" / Path(fe["name"]).name,
                                 path.read_bytes(), 0o600)
        elif fe.get("type") == "recording":
            consult_recordings.restore_file(conn, cfg.data_dir, path, fe)
            items.append(("recording", path.name, fe["sha256"], fe["name"], fe["size"]))
            counts["recordings"] += 1
    _mark_received(conn, opened, items)
    shutil.rmtree(opened.root, ignore_errors=True)


def _mark_received(conn: sqlite3.Connection, opened: bnd.Opened, items: list[tuple]) -> None:
    """Record the bundle as received here and as a confirmed outbox row (never sent again)."""
    info, m = opened.info, opened.manifest
    with db.transaction(conn):
        bnd.DbLedger(conn).record(info)
        conn.execute("INSERT INTO bundle_sequence (site_id, last_seq) VALUES (?, ?) ON CONFLICT"
                     "(site_id) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
                     (info.site_id, info.seq))
        conn.execute(
            "INSERT OR IGNORE INTO bundles (bundle_id, site_id, seq, kind, subject, priority,"
            " state, path, size, sha256, created_at, confirmed_at) VALUES"
            " (?,?,?,?,?,?,'confirmed','',?,?,?,?)",
            (info.bundle_id, info.site_id, info.seq, m["kind"], m["subject"], m["priority"],
             info.size, info.file_sha256, m["created_at"], time.time()))
        conn.executemany("INSERT OR IGNORE INTO bundle_items (bundle_id, item_kind, item_id,"
                         " version, path, size) VALUES (?,?,?,?,?,?)",
                         [(info.bundle_id, *it) for it in items])
