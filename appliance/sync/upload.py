"""Uploading: the Uploader, its pacing (bandwidth timetable), the worker's sweep and ``sync now``.

Uploads can take hours on a thin link, so the sweep builds what is due (bounded)
and leaves the sending to one background thread per data directory; every
part is recorded as it is acknowledged, so a pass killed at any line resumes.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from appliance.core import audit, db
from appliance.core.config import Config
from appliance.core.leases import new_owner
from appliance.sync import outbox
from appliance.sync import targets as st
from appliance.sync.building import build_due
from appliance.sync.outbox import BACKOFF_MAX_S, BACKOFF_MIN_S, bundles_dir, object_key

log = logging.getLogger("appliance.sync")

__all__ = ["BACKOFF_MAX_S", "Pacer", "Uploader", "backoff_s", "make_target", "object_key",
           "rate_kbit_s", "sweep", "sync_now"]


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
        state = outbox.link_state(self.conn)
        now = time.time()
        if not force and state.get("next_check", 0) > now:
            return False
        try:
            self.target.check()
        except st.TargetError as e:
            failures = state.get("failures", 0) + 1
            state.update(up=False, failures=failures, last_error=str(e)[:300], checked_at=now,
                         next_check=now + self._backoff(failures))
            outbox.set_link_state(self.conn, state)
            log.warning("sync link down: %s (next check in %.0f s)", e,
                        state["next_check"] - now)
            return False
        state.update(up=True, failures=0, last_error="", checked_at=now, next_check=0)
        outbox.set_link_state(self.conn, state)
        return True

    def run(self, force: bool = False, stop: threading.Event | None = None) -> dict[str, int]:
        """One pass; returns counts. Safe to run in several processes at once (leases)."""
        counts = {"confirmed": 0, "failed": 0, "yielded": 0, "conflict": 0}
        if not self._due() or not self.link_ok(force):
            return counts
        while not (stop and stop.is_set()):
            row = outbox.lease_next(self.conn, self.cfg, self.owner, time.time())
            if row is None:
                break
            self._renewed = time.time()
            outcome = self._one(row)
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome == "failed":
                break  # the link probably dropped: back off rather than hammer it
        return counts

    def _due(self) -> bool:
        return outbox.any_due_for_upload(self.conn, time.time())

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
            state = outbox.link_state(self.conn)
            state.update(up=False, last_error=str(e)[:300], next_check=time.time() + delay)
            with self.lock:
                outbox.set_link_state(self.conn, state)
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
            audit.record(self.conn, outbox.ACTOR, "bundle.confirmed", row["bundle_id"],
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
    if not outbox.enabled(cfg):
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
    """Anything due for upload, unless the link is backing off."""
    now = time.time()
    if outbox.link_state(conn).get("next_check", 0) > now:
        return False
    return outbox.any_due_for_upload(conn, now)


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
        link = outbox.link_state(up.conn)
    finally:
        up.close()
    return {"built": built, **counts, "link_up": bool(link.get("up")),
            "link_error": link.get("last_error", "")}


