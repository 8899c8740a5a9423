"""Cloud sync: bundles built from what the appliance holds, pushed whenever a link is up.

The durable state is the outbox (``bundles`` and ``bundle_items``, migration 7):
``building → built → uploading → uploaded → confirmed``, with attempts, the next
attempt, a lease, a priority and bytes sent.  huey only wakes this module
(``sweep``); a worker killed at any line leaves a row whose lease runs out (or
whose owner is a dead process on this host) and the next sweep takes it over.

What goes out, most urgent first (re-decided at every part boundary):
STAT studies, then signed reports and audit slices, then routine studies.
A study is bundled once it has been quiet for ``worker.quiet_period_s``;
instances that arrive later go into a new bundle of their own, so every
stored instance version ends up in exactly one bundle.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from appliance.consults import recordings as consult_recordings
from appliance.core import audit, db, durable, identity
from appliance.core.config import Config
from appliance.core.leases import holder_gone, new_owner
from appliance.sync import bundle as bnd
from appliance.sync import targets as st

log = logging.getLogger("appliance.sync")

BACKOFF_MIN_S, BACKOFF_MAX_S = 5.0, 600.0
LINK_KEY = "sync.link"
MAX_BUILDS_PER_SWEEP = 8
ACTOR = "system:sync"


# -- settings and helpers --------------------------------------------------------------------
def enabled(cfg: Config) -> bool:
    s = cfg["sync"]
    return s["target"] != "none" and bool(s["recipients"])


def make_target(cfg: Config) -> st.Target:
    s = cfg["sync"]
    if s["target"] == "s3":
        creds = None
        if s["credentials_file"]:
            creds = st.read_credentials(cfg.data_dir / s["credentials_file"])
        return st.S3Target(s["bucket"], s["prefix"], s["url"], s["region"], creds, s["timeout_s"])
    if s["target"] == "folder":
        if not s["folder"]:
            raise st.TargetError("sync.folder is not set")
        return st.FolderTarget(Path(s["folder"]), s["prefix"])
    raise st.TargetError("sync.target is 'none'")


def backoff_s(attempts: int, rng: random.Random | None = None, low: float = BACKOFF_MIN_S,
              high: float = BACKOFF_MAX_S) -> float:
    """Capped exponential backoff with jitter: 5 s, 10 s, 20 s … 10 min, each in [d/2, d]."""
    d = min(high, low * 2 ** max(0, attempts - 1))
    return d / 2 + (rng or random).uniform(0, d / 2)


def rate_kbit_s(cfg: Config, when: dt.datetime | None = None) -> int:
    """The bandwidth cap now: the first timetable window that contains ``when``, else the default."""
    when = when or dt.datetime.now()
    day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[when.weekday()]
    hhmm = when.strftime("%H:%M")
    for w in cfg["sync"]["timetable"]:
        if w.get("days") and day not in w["days"]:
            continue
        start, end = w["from"], w["to"]
        inside = start <= hhmm < end if start <= end else (hhmm >= start or hhmm < end)
        if inside:
            return w["kbit_s"]
    return cfg["sync"]["bandwidth_kbit_s"]


class Pacer:
    """A token bucket over every part in flight; the rate is re-read (timetable) as it goes."""

    def __init__(self, rate_fn, on_progress=None, burst_s: float = 0.25):
        self.rate_fn, self.on_progress, self.burst_s = rate_fn, on_progress, burst_s
        self.lock = threading.Lock()
        self.allowance_at = time.monotonic()

    def __call__(self, n: int) -> None:
        if self.on_progress:
            self.on_progress()
        kbit = self.rate_fn()
        if kbit <= 0:
            return
        with self.lock:
            now = time.monotonic()
            start = max(self.allowance_at, now - self.burst_s)
            self.allowance_at = start + n * 8 / (kbit * 1000)
            wait = self.allowance_at - now
        if wait > 0:
            time.sleep(wait)


def _link(conn: sqlite3.Connection) -> dict[str, Any]:
    r = conn.execute("SELECT value FROM settings WHERE key=?", (LINK_KEY,)).fetchone()
    return json.loads(r[0]) if r else {"up": None, "failures": 0, "next_check": 0}


def _set_link(conn: sqlite3.Connection, state: dict[str, Any]) -> None:
    conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
                 " SET value=excluded.value", (LINK_KEY, json.dumps(state)))


def _table_exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                        (name,)).fetchone() is not None


# -- building --------------------------------------------------------------------------------
def _next_seq(conn: sqlite3.Connection, site_id: str) -> int:
    return conn.execute(
        "INSERT INTO bundle_sequence (site_id, last_seq) VALUES (?, 1) ON CONFLICT(site_id)"
        " DO UPDATE SET last_seq = last_seq + 1 RETURNING last_seq", (site_id,)).fetchone()[0]


def _study_priority(conn: sqlite3.Connection, cfg: Config, study_uid: str,
                    description: str) -> int:
    """STAT when the read queue made it STAT or its workflow says ``sync: high``
    (``sync: low`` keeps it routine), else when its description has a STAT keyword."""
    if _table_exists(conn, "read_items"):
        r = conn.execute("SELECT priority, actions FROM read_items WHERE study_uid=?",
                         (study_uid,)).fetchone()
        if r is not None:
            wanted = [a["sync"] for a in json.loads(r["actions"] or "[]")
                      if isinstance(a, dict) and "sync" in a]
            if wanted and wanted[-1] in ("high", "low"):
                return bnd.PRIORITY_STAT if wanted[-1] == "high" else bnd.PRIORITY_ROUTINE
            if r["priority"] == "stat":
                return bnd.PRIORITY_STAT
    text = (description or "").upper()
    if any(k.upper() in text for k in cfg["sync"]["stat_keywords"]):
        return bnd.PRIORITY_STAT
    return bnd.PRIORITY_ROUTINE


def _create(conn: sqlite3.Connection, cfg: Config, kind: str, subject: str, priority: int,
            items: list[tuple[str, str, str, str, int]], owner: str) -> str:
    """Reserve a bundle: sequence number, outbox row and items, in the caller's transaction."""
    site_id = cfg["site"]["id"]
    seq = _next_seq(conn, site_id)
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
        rows = conn.execute(
            "SELECT i.study_uid, i.sop_uid, i.sha256, i.path, i.size, s.study_description"
            " FROM instances i JOIN studies s ON s.study_uid = i.study_uid"
            " WHERE s.last_received <= ? AND NOT EXISTS (SELECT 1 FROM bundle_items b"
            "  WHERE b.item_kind='instance' AND b.item_id=i.sop_uid AND b.version=i.sha256)"
            " ORDER BY i.study_uid, i.path", (now - quiet,)).fetchall()
        by_study: dict[str, list] = {}
        for r in rows:
            by_study.setdefault(r["study_uid"], []).append(r)
        for study_uid, rs in list(by_study.items())[:MAX_BUILDS_PER_SWEEP]:
            prio = _study_priority(conn, cfg, study_uid, rs[0]["study_description"])
            items = [("instance", r["sop_uid"], r["sha256"], r["path"], r["size"]) for r in rs]
            made.append(_create(conn, cfg, "study", study_uid, prio, items, owner))
        made += _plan_reports(conn, cfg, owner)
        made += _plan_recordings(conn, cfg, owner)
        made += _plan_audit(conn, cfg, now, force, owner)
    return made


def _anything_due(conn: sqlite3.Connection, cfg: Config, quiet_before: float) -> bool:
    """A read-only look: is any study, report version or audit slice waiting for a bundle?"""
    if conn.execute(
            "SELECT 1 FROM instances i JOIN studies s ON s.study_uid = i.study_uid"
            " WHERE s.last_received <= ? AND NOT EXISTS (SELECT 1 FROM bundle_items b"
            "  WHERE b.item_kind='instance' AND b.item_id=i.sop_uid AND b.version=i.sha256)"
            " LIMIT 1", (quiet_before,)).fetchone():
        return True
    if _table_exists(conn, "report_versions") and conn.execute(
            "SELECT 1 FROM report_versions v WHERE NOT EXISTS (SELECT 1 FROM bundle_items b"
            " WHERE b.item_kind='report_version' AND b.item_id = CAST(v.id AS TEXT))"
            " LIMIT 1").fetchone():
        return True
    if _table_exists(conn, "consult_recordings") and consult_recordings.unbundled(conn):
        return True
    last = conn.execute("SELECT MAX(b.created_at) FROM bundle_items i JOIN bundles b"
                        " USING (bundle_id) WHERE i.item_kind='audit'").fetchone()[0] or 0
    return time.time() - last >= cfg["sync"]["audit_interval_s"]


def _plan_reports(conn: sqlite3.Connection, cfg: Config, owner: str) -> list[str]:
    if not _table_exists(conn, "report_versions"):
        return []
    made = []
    for r in conn.execute(
            "SELECT v.id, v.report_id, v.sha256 FROM report_versions v WHERE NOT EXISTS"
            " (SELECT 1 FROM bundle_items b WHERE b.item_kind='report_version'"
            "  AND b.item_id = CAST(v.id AS TEXT)) ORDER BY v.id").fetchall():
        made.append(_create(conn, cfg, "report", str(r["report_id"]), bnd.PRIORITY_RECORDS,
                            [("report_version", str(r["id"]), r["sha256"], "", 0)], owner))
    return made


def _plan_recordings(conn: sqlite3.Connection, cfg: Config, owner: str) -> list[str]:
    """One bundle per sealed consult recording (already age-encrypted; carried as it is)."""
    if not _table_exists(conn, "consult_recordings"):
        return []
    return [_create(conn, cfg, "recording", r["study_uid"] or f"consult:{r['consult_id']}",
                    bnd.PRIORITY_RECORDS,
                    [("recording", r["name"], r["sha256"], f"recordings/{r['name']}", r["size"])],
                    owner) for r in consult_recordings.unbundled(conn)]


def _plan_audit(conn: sqlite3.Connection, cfg: Config, now: float, force: bool,
                owner: str) -> list[str]:
    last = conn.execute("SELECT MAX(CAST(item_id AS INTEGER)) AS last_id, MAX(b.created_at) AS at"
                        " FROM bundle_items i JOIN bundles b USING (bundle_id)"
                        " WHERE i.item_kind='audit'").fetchone()
    last_id, at = last["last_id"] or 0, last["at"] or 0
    if not force and now - at < cfg["sync"]["audit_interval_s"]:
        return []
    top = conn.execute("SELECT MAX(id) FROM audit").fetchone()[0] or 0
    if top <= last_id:
        return []
    return [_create(conn, cfg, "audit", f"{last_id + 1}-{top}", bnd.PRIORITY_RECORDS,
                    [("audit", str(top), str(last_id + 1), "", 0)], owner)]


def _entries(conn: sqlite3.Connection, cfg: Config, bundle_id: str) -> list[bnd.Entry]:
    """What a reserved bundle holds, rebuilt from ``bundle_items`` (so a rebuild is identical)."""
    out = []
    for it in conn.execute("SELECT * FROM bundle_items WHERE bundle_id=? ORDER BY rowid",
                           (bundle_id,)).fetchall():
        if it["item_kind"] == "instance":
            out.append(bnd.Entry(f"dicom/{it['path']}", it["version"], it["size"],
                                 source=cfg.studies_dir / it["path"],
                                 meta={"sop_uid": it["item_id"], "type": "dicom"}))
        elif it["item_kind"] == "report_version":
            v = dict(conn.execute("SELECT * FROM report_versions WHERE id=?",
                                  (int(it["item_id"]),)).fetchone())
            rep = dict(conn.execute("SELECT * FROM reports WHERE id=?",
                                    (v["report_id"],)).fetchone())
            out.append(bnd.Entry.record(f"records/report-version-{v['id']}.json",
                                        {"report": rep, "version": v},
                                        type="report", report_id=v["report_id"]))
        elif it["item_kind"] == "audit":
            first, last = int(it["version"]), int(it["item_id"])
            rows = [dict(r) for r in conn.execute(
                "SELECT * FROM audit WHERE id BETWEEN ? AND ? ORDER BY id", (first, last))]
            out.append(bnd.Entry.record(f"records/audit-{first:010d}-{last:010d}.json", rows,
                                        type="audit", first=first, last=last))
        elif it["item_kind"] == "recording":
            out.append(bnd.Entry(it["path"], it["version"], it["size"],
                                 source=cfg.data_dir / it["path"],
                                 meta=consult_recordings.bundle_meta(conn, it["item_id"])))
    return out


def build_reserved(conn: sqlite3.Connection, cfg: Config, bundle_id: str,
                   recipients: list[str] | None = None) -> bnd.BundleInfo:
    """Write the bundle file of a reserved row and mark it ``built``."""
    row = conn.execute("SELECT * FROM bundles WHERE bundle_id=?", (bundle_id,)).fetchone()
    for stale in bundles_dir(cfg).glob(f".{row['path']}.*{durable.TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)  # a temp file a killed builder left
    key = identity.load_signing_key(cfg.keys_dir)
    info = bnd.build(bundles_dir(cfg) / row["path"], bundle_id, key,
                     recipients or cfg["sync"]["recipients"], _entries(conn, cfg, bundle_id),
                     row["priority"], row["kind"], row["subject"])
    with db.transaction(conn):
        conn.execute("UPDATE bundles SET state='built', size=?, sha256=?, built_at=?,"
                     " lease_owner=NULL, lease_until=0 WHERE bundle_id=? AND state='building'",
                     (info.size, info.file_sha256, time.time(), bundle_id))
        audit.record(conn, ACTOR, "bundle.built", bundle_id, detail={
            "kind": row["kind"], "subject": row["subject"], "seq": row["seq"],
            "size": info.size})
    return info


def bundles_dir(cfg: Config) -> Path:
    return cfg.data_dir / "bundles"


def build_due(conn: sqlite3.Connection, cfg: Config, force: bool = False) -> int:
    """Reserve and build what is due; rebuild reservations a dead builder left. Idempotent."""
    owner = new_owner()
    now = time.time()
    plan(conn, cfg, now, force, owner)
    built = 0
    for r in conn.execute("SELECT bundle_id, lease_owner, lease_until FROM bundles"
                          " WHERE state='building' ORDER BY priority, seq").fetchall():
        if r["lease_owner"] != owner:
            if r["lease_until"] > now and not holder_gone(r["lease_owner"]):
                continue
            with db.transaction(conn):
                cur = conn.execute("UPDATE bundles SET lease_owner=?, lease_until=? WHERE"
                                   " bundle_id=? AND state='building' AND lease_owner IS ?",
                                   (owner, now + cfg["sync"]["lease_s"], r["bundle_id"],
                                    r["lease_owner"]))
            if not cur.rowcount:
                continue
        try:
            build_reserved(conn, cfg, r["bundle_id"])
            built += 1
        except (bnd.BundleError, OSError) as e:
            log.error("bundle %s not built: %s", r["bundle_id"], e)
            conn.execute("UPDATE bundles SET last_error=?, lease_until=? WHERE bundle_id=?",
                         (str(e)[:500], time.time() + BACKOFF_MAX_S, r["bundle_id"]))
    return built


# -- uploading -------------------------------------------------------------------------------
def object_key(cfg: Config, row: sqlite3.Row) -> str:
    return f"{cfg['sync']['prefix']}{row['site_id']}/{row['seq']:010d}-{row['kind']}-" \
           f"{row['bundle_id']}.bundle"


def _lease_next(conn: sqlite3.Connection, cfg: Config, owner: str,
                now: float) -> sqlite3.Row | None:
    with db.transaction(conn):
        for r in conn.execute(
                "SELECT * FROM bundles WHERE state IN ('built','uploading','uploaded')"
                " AND next_attempt <= ? ORDER BY priority, seq", (now,)).fetchall():
            if r["lease_until"] > now and r["lease_owner"] != owner \
                    and not holder_gone(r["lease_owner"]):
                continue
            conn.execute("UPDATE bundles SET lease_owner=?, lease_until=? WHERE bundle_id=?",
                         (owner, now + cfg["sync"]["lease_s"], r["bundle_id"]))
            return conn.execute("SELECT * FROM bundles WHERE bundle_id=?",
                                (r["bundle_id"],)).fetchone()
    return None


class Uploader:
    """Sends leased bundles in priority order until none is due or the link drops."""

    def __init__(self, cfg: Config, target: st.Target | None = None):
        self.cfg, self.owner = cfg, new_owner()
        self.target = target or make_target(cfg)
        self.conn = db.connect(cfg.db_path)
        self.lock = threading.Lock()
        self._renewed = 0.0
        self.pacer = Pacer(lambda: rate_kbit_s(cfg), self._renew)

    def close(self) -> None:
        self.conn.close()

    def _exec(self, sql: str, args: tuple) -> int:
        with self.lock:
            return self.conn.execute(sql, args).rowcount

    def _renew(self) -> None:
        now = time.time()
        if now - self._renewed < self.cfg["sync"]["lease_s"] / 4:
            return
        self._renewed = now
        self._exec("UPDATE bundles SET lease_until=? WHERE lease_owner=?",
                   (now + self.cfg["sync"]["lease_s"], self.owner))

    def _backoff(self, attempts: int) -> float:
        s = self.cfg["sync"]
        return backoff_s(attempts, low=s["retry_min_s"], high=s["retry_max_s"])

    def link_ok(self, force: bool = False) -> bool:
        state = _link(self.conn)
        now = time.time()
        if not force and state.get("next_check", 0) > now:
            return False
        try:
            self.target.check()
        except st.TargetError as e:
            failures = state.get("failures", 0) + 1
            state.update(up=False, failures=failures, last_error=str(e)[:300], checked_at=now,
                         next_check=now + self._backoff(failures))
            _set_link(self.conn, state)
            log.warning("sync link down: %s (next check in %.0f s)", e,
                        state["next_check"] - now)
            return False
        state.update(up=True, failures=0, last_error="", checked_at=now, next_check=0)
        _set_link(self.conn, state)
        return True

    def run(self, force: bool = False, stop: threading.Event | None = None) -> dict[str, int]:
        """One pass; returns counts. Safe to run in several processes at once (leases)."""
        counts = {"confirmed": 0, "failed": 0, "yielded": 0, "conflict": 0}
        if not self._due() or not self.link_ok(force):
            return counts
        while not (stop and stop.is_set()):
            row = _lease_next(self.conn, self.cfg, self.owner, time.time())
            if row is None:
                break
            self._renewed = time.time()
            outcome = self._one(row)
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome == "failed":
                break  # the link probably dropped: back off rather than hammer it
        return counts

    def _due(self) -> bool:
        return self.conn.execute("SELECT 1 FROM bundles WHERE state IN ('built','uploading',"
                                 "'uploaded') AND next_attempt <= ? LIMIT 1",
                                 (time.time(),)).fetchone() is not None

    def _one(self, row: sqlite3.Row) -> str:
        key = row["target_key"] or object_key(self.cfg, row)
        bid = row["bundle_id"]
        if row["state"] != "uploaded" and not (bundles_dir(self.cfg) / row["path"]).is_file():
            # The local file is gone (disk trouble, a hand): build it again from its items
            # under the same id, and start a fresh upload of the new bytes.
            self._exec("UPDATE bundles SET state='building', upload_id=NULL, bytes_sent=0,"
                       " lease_owner=NULL, lease_until=0, last_error=? WHERE bundle_id=?",
                       ("local bundle file missing: rebuilding", bid))
            self._exec("DELETE FROM bundle_parts WHERE bundle_id=?", (bid,))
            return "rebuild"
        try:
            if row["state"] != "uploaded":
                self._exec("UPDATE bundles SET state='uploading', target_key=? WHERE"
                           " bundle_id=? AND lease_owner=?", (key, bid, self.owner))
                result = self.target.upload(self._job(row, key))
                if result == st.YIELDED:
                    self._release(bid)
                    return "yielded"
                self._exec("UPDATE bundles SET state='uploaded', uploaded_at=? WHERE"
                           " bundle_id=? AND lease_owner=?", (time.time(), bid, self.owner))
            self._confirm(row, key)
            return "confirmed"
        except (st.TargetError, OSError) as e:
            attempts = row["attempts"] + 1
            delay = self._backoff(attempts)
            self._exec("UPDATE bundles SET attempts=?, next_attempt=?, last_error=?,"
                       " lease_owner=NULL, lease_until=0 WHERE bundle_id=? AND lease_owner=?",
                       (attempts, time.time() + delay, str(e)[:500], bid, self.owner))
            log.warning("bundle %s: upload failed (attempt %d, retry in %.0f s): %s", bid,
                        attempts, delay, e)
            if isinstance(e, st.BundleConflict):
                return "conflict"  # this bundle waits; the others go on
            state = _link(self.conn)
            state.update(up=False, last_error=str(e)[:300], next_check=time.time() + delay)
            with self.lock:
                _set_link(self.conn, state)
            return "failed"

    def _job(self, row: sqlite3.Row, key: str) -> st.UploadJob:
        bid = row["bundle_id"]

        def save_upload_id(uid: str | None) -> None:
            self._exec("UPDATE bundles SET upload_id=? WHERE bundle_id=?", (uid, bid))
            if uid is None:
                self._exec("DELETE FROM bundle_parts WHERE bundle_id=?", (bid,))

        def part_done(n: int, etag: str, size: int) -> None:
            with self.lock, db.transaction(self.conn):
                self.conn.execute("INSERT OR REPLACE INTO bundle_parts (bundle_id, part_number,"
                                  " etag, size, sent_at) VALUES (?,?,?,?,?)",
                                  (bid, n, etag, size, time.time()))
                self.conn.execute("UPDATE bundles SET bytes_sent = bytes_sent + ?, lease_until=?"
                                  " WHERE bundle_id=?",
                                  (size, time.time() + self.cfg["sync"]["lease_s"], bid))

        def should_yield() -> bool:
            with self.lock:
                mine = self.conn.execute("SELECT lease_owner FROM bundles WHERE bundle_id=?",
                                         (bid,)).fetchone()
                if mine is None or mine[0] != self.owner:
                    return True  # our lease ran out and another worker took over: stop
                r = self.conn.execute(
                    "SELECT 1 FROM bundles WHERE state IN ('built','uploading') AND priority < ?"
                    " AND next_attempt <= ? AND (lease_until <= ? OR lease_owner IS NULL)"
                    " LIMIT 1", (row["priority"], time.time(), time.time())).fetchone()
            return r is not None

        return st.UploadJob(key=key, path=bundles_dir(self.cfg) / row["path"], size=row["size"],
                            sha256=row["sha256"], upload_id=row["upload_id"],
                            part_size=self.cfg["sync"]["part_size_mb"] * 1024 * 1024,
                            parallel=self.cfg["sync"]["parallel_parts"],
                            save_upload_id=save_upload_id, part_done=part_done,
                            should_yield=should_yield, pace=self.pacer)

    def _release(self, bid: str) -> None:
        self._exec("UPDATE bundles SET lease_owner=NULL, lease_until=0 WHERE bundle_id=? AND"
                   " lease_owner=?", (bid, self.owner))

    def _confirm(self, row: sqlite3.Row, key: str) -> None:
        """``confirmed`` only once the target reports the object with our size and SHA-256."""
        obj = self.target.head(key)
        if obj is None or obj.size != row["size"] or obj.sha256 != row["sha256"]:
            raise st.TargetError(f"{key}: not confirmed by the target (missing or different)")
        with self.lock, db.transaction(self.conn):
            self.conn.execute("UPDATE bundles SET state='confirmed', confirmed_at=?,"
                              " lease_owner=NULL, lease_until=0, last_error='' WHERE bundle_id=?",
                              (time.time(), row["bundle_id"]))
            audit.record(self.conn, ACTOR, "bundle.confirmed", row["bundle_id"],
                         source=self.target.description, detail={"key": key, "size": row["size"]})
        (bundles_dir(self.cfg) / row["path"]).unlink(missing_ok=True)


# -- the worker's entry points -----------------------------------------------------------------
_runners: dict[str, threading.Thread] = {}
_runners_lock = threading.Lock()


def sweep(cfg: Config) -> None:
    """Build what is due, then make sure an upload pass is running in this process.

    Builds are bounded; uploads can take hours on a thin link, so they run in a
    background thread and the sweep returns at once.
    """
    if not enabled(cfg):
        return
    conn = db.connect(cfg.db_path)
    try:
        build_due(conn, cfg)
        if not _upload_due(conn):
            return  # nothing to send, or the link is backing off: no client, no thread
    finally:
        conn.close()
    key = str(cfg.data_dir)
    with _runners_lock:
        t = _runners.get(key)
        if t is not None and t.is_alive():
            return
        t = threading.Thread(target=_upload_pass, args=(cfg,), name="sync-upload", daemon=True)
        _runners[key] = t
        t.start()


def _upload_due(conn: sqlite3.Connection) -> bool:
    now = time.time()
    if _link(conn).get("next_check", 0) > now:
        return False
    return conn.execute("SELECT 1 FROM bundles WHERE state IN ('built','uploading','uploaded')"
                        " AND next_attempt <= ? LIMIT 1", (now,)).fetchone() is not None


def _upload_pass(cfg: Config) -> None:
    try:
        up = Uploader(cfg)
    except st.TargetError as e:
        log.error("sync target unusable: %s", e)
        return
    try:
        up.run()
    except Exception:
        log.exception("sync upload pass failed")
    finally:
        up.close()


def sync_now(cfg: Config, target: st.Target | None = None) -> dict[str, Any]:
    """``appliance sync now``: build everything due (no quiet period), retry at once, upload."""
    conn = db.connect(cfg.db_path)
    try:
        built = build_due(conn, cfg, force=True)
        conn.execute("UPDATE bundles SET next_attempt=0 WHERE state != 'confirmed'")
    finally:
        conn.close()
    up = Uploader(cfg, target)
    try:
        counts = up.run(force=True)
        if counts.get("rebuild"):  # a local bundle file was missing: build it, send again
            built += build_due(up.conn, cfg, force=True)
            counts = up.run(force=True)
        link = _link(up.conn)
    finally:
        up.close()
    return {"built": built, **counts, "link_up": bool(link.get("up")),
            "link_error": link.get("last_error", "")}


# -- status ------------------------------------------------------------------------------------
def figures(conn: sqlite3.Connection, now: float | None = None) -> dict[str, Any]:
    """Queued, bytes left, last success, lag of the oldest unsent item: for status and /metrics."""
    now = now or time.time()
    by_state = {r[0]: r[1] for r in conn.execute(
        "SELECT state, COUNT(*) FROM bundles GROUP BY state")}
    left = conn.execute(
        "SELECT COALESCE(SUM(CASE WHEN state IN ('built','uploading') THEN size - bytes_sent"
        " ELSE 0 END), 0), MIN(CASE WHEN state != 'confirmed' THEN created_at END),"
        " MAX(confirmed_at) FROM bundles").fetchone()
    unbundled = conn.execute(
        "SELECT COUNT(*), MIN(i.received_at), COALESCE(SUM(i.size), 0) FROM instances i"
        " WHERE NOT EXISTS (SELECT 1 FROM bundle_items b WHERE b.item_kind='instance'"
        " AND b.item_id=i.sop_uid AND b.version=i.sha256)").fetchone()
    oldest = min([t for t in (left[1], unbundled[1]) if t is not None], default=None)
    link = _link(conn)
    errors = [r[0] for r in conn.execute(
        "SELECT last_error FROM bundles WHERE state != 'confirmed' AND last_error != ''"
        " ORDER BY priority, seq LIMIT 1")]
    return {
        "queued": sum(v for k, v in by_state.items() if k != "confirmed"),
        "by_state": by_state,
        "bytes_left": int(left[0]) + int(unbundled[2]),
        "instances_not_bundled": unbundled[0],
        "last_success": left[2],
        "oldest_unsent_lag_s": round(now - oldest, 1) if oldest else 0.0,
        "link_up": link.get("up"),
        "link_error": link.get("last_error", ""),
        "next_link_check": link.get("next_check", 0),
        "last_error": errors[0] if errors else "",
    }


def reconcile(conn: sqlite3.Connection) -> dict[str, int]:
    """Instances (current versions) in no confirmed bundle, and any in more than one."""
    r = conn.execute(
        "SELECT SUM(n = 0), SUM(n > 1), COUNT(*) FROM (SELECT (SELECT COUNT(*) FROM bundle_items b"
        " JOIN bundles USING (bundle_id) WHERE b.item_kind='instance' AND b.item_id=i.sop_uid"
        " AND b.version=i.sha256 AND bundles.state='confirmed') AS n FROM instances i)"
    ).fetchone()
    return {"unconfirmed": r[0] or 0, "duplicated": r[1] or 0, "instances": r[2]}


# -- disaster recovery -------------------------------------------------------------------------
def restore(cfg: Config, target: st.Target, identities: list, trusted: list[str] | None = None,
            site_id: str | None = None, say=print) -> dict[str, int]:
    """Rebuild this (fresh) data directory from every bundle of a site on ``target``.

    Bundles are applied in sequence order; each is verified, replay-checked
    against ``received_bundles`` and hash-checked before anything is stored,
    and a bundle already applied is skipped, so an interrupted restore is
    simply run again.
    """
    from dicom_node.study_store import StudyStore

    conn = db.open_db(cfg.db_path)
    store = StudyStore(cfg.studies_dir, cfg.db_path, connect=db.connect)
    counts = {"bundles": 0, "skipped": 0, "rejected": 0, "instances": 0, "reports": 0,
              "audit_rows": 0, "recordings": 0}
    objs = []
    for o in target.list(f"{site_id}/" if site_id else ""):
        name = o.key.rsplit("/", 1)[-1]
        if name.endswith(".bundle") and name[:10].isdigit():
            objs.append((int(name[:10]), o.key))
    work = cfg.data_dir / "run" / "restore"
    work.mkdir(parents=True, exist_ok=True)
    try:
        for _seq, key in sorted(objs):
            local = work / "incoming.bundle"
            target.download(key, local)
            try:
                info = bnd.verify(local, trusted)
            except bnd.BundleError as e:
                counts["rejected"] += 1
                say(f"rejected {key}: {e}")
                continue
            if conn.execute("SELECT 1 FROM received_bundles WHERE bundle_id=?",
                            (info.bundle_id,)).fetchone():
                counts["skipped"] += 1
                continue
            try:
                opened = bnd.open_to_staging(local, identities, work / "staging",
                                             bnd.DbLedger(conn), trusted)
            except bnd.BundleError as e:
                counts["rejected"] += 1
                say(f"rejected {key}: {e}")
                continue
            _apply(conn, cfg, store, opened, counts)
            counts["bundles"] += 1
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    audit.record(conn, "cli:restore", "sync.restore", target.description, source="cli",
                 detail=counts)
    conn.close()
    return counts


def _apply(conn: sqlite3.Connection, cfg: Config, store, opened: bnd.Opened,
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
            counts["reports"] += _restore_report(conn, json.loads(path.read_bytes()))
            items.append(("report_version", str(json.loads(path.read_bytes())["version"]["id"]),
                          fe["sha256"], "", 0))
        elif fe.get("type") == "audit":
            from appliance.core import durable

            durable.atomic_write(cfg.data_dir / "restored" / "audit" / Path(fe["name"]).name,
                                 path.read_bytes(), 0o600)
            counts["audit_rows"] += len(json.loads(path.read_bytes()))
            items.append(("audit", str(fe["last"]), str(fe["first"]), "", 0))
        elif fe.get("type") == "recording":
            consult_recordings.restore_file(conn, cfg.data_dir, path, fe)
            items.append(("recording", path.name, fe["sha256"], fe["name"], fe["size"]))
            counts["recordings"] += 1
    info = opened.info
    with db.transaction(conn):
        bnd.DbLedger(conn).record(info)
        conn.execute("INSERT INTO bundle_sequence (site_id, last_seq) VALUES (?, ?) ON CONFLICT"
                     "(site_id) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
                     (info.site_id, info.seq))
        now = time.time()
        conn.execute(
            "INSERT OR IGNORE INTO bundles (bundle_id, site_id, seq, kind, subject, priority,"
            " state, path, size, sha256, created_at, confirmed_at) VALUES"
            " (?,?,?,?,?,?,'confirmed','',?,?,?,?)",
            (info.bundle_id, info.site_id, info.seq, m["kind"], m["subject"], m["priority"],
             info.size, info.file_sha256, m["created_at"], now))
        conn.executemany("INSERT OR IGNORE INTO bundle_items (bundle_id, item_kind, item_id,"
                         " version, path, size) VALUES (?,?,?,?,?,?)",
                         [(info.bundle_id, *it) for it in items])
    import shutil

    shutil.rmtree(opened.root, ignore_errors=True)


def _restore_report(conn: sqlite3.Connection, rec: dict[str, Any]) -> int:
    """Insert a report and its signed version if this appliance has the report tables."""
    if not (_table_exists(conn, "reports") and _table_exists(conn, "report_versions")):
        return 0
    rank = {"draft": 0, "preliminary": 1, "final": 2}
    with db.transaction(conn):
        for table, row in (("reports", rec["report"]), ("report_versions", rec["version"])):
            cols = [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]
            keep = {k: v for k, v in row.items() if k in cols}
            conn.execute(f"INSERT OR IGNORE INTO {table} ({', '.join(keep)}) VALUES"
                         f" ({', '.join('?' for _ in keep)})", tuple(keep.values()))
            if table == "reports":  # a later signature's bundle carries the newer report row
                have = conn.execute("SELECT status FROM reports WHERE id=?",
                                    (row["id"],)).fetchone()
                if rank.get(row.get("status"), 0) > rank.get(have["status"], 0):
                    sets = {k: v for k, v in keep.items() if k != "id"}
                    conn.execute(f"UPDATE reports SET {', '.join(f'{k}=?' for k in sets)}"
                                 " WHERE id=?", (*sets.values(), row["id"]))
    return 1


# -- what other capabilities read of the outbox (health: /metrics, the status page) -------------
def bytes_uploaded(conn: sqlite3.Connection) -> int:
    """Bytes sent to the sync target, all bundles together."""
    return conn.execute("SELECT COALESCE(SUM(bytes_sent), 0) FROM bundles").fetchone()[0]


def oldest_error(conn: sqlite3.Connection) -> str | None:
    """The last upload error of the oldest bundle that has one (why sync is stalled)."""
    row = conn.execute("SELECT last_error FROM bundles WHERE last_error != ''"
                       " ORDER BY created_at LIMIT 1").fetchone()
    return row[0] if row else None
