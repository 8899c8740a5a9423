"""Can the appliance do its job right now? Every reason it cannot, in words a responder can act on.

Shared by ``/readyz`` (web), the status page and the worker's health sampler,
so the three never disagree.  Each check is bounded in time: a database held
by a frozen writer is reported after about a second, not after the usual
ten-second busy timeout, so ``/readyz`` answers while the fault lasts.
"""

from __future__ import annotations

import socket
import sqlite3
import time
from typing import Any

from appliance.core import components, durable
from appliance.sync import status as sync_status

DB_CHECK_TIMEOUT_MS = 1000
WAITING_STATES = ("queued", "claimed", "preliminary")
WORKER_DOWN = "worker is not sweeping"


def port_listening(host: str, port: int, timeout: float = 1.0) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    try:
        with socket.create_connection((target, port), timeout=timeout):
            return True
    except OSError:
        return False


def connect_bounded(cfg) -> sqlite3.Connection:
    """A connection that gives up on a lock after a second: for checks that must answer
    while a writer is stuck, where the usual ten-second busy timeout would hang them."""
    conn = sqlite3.connect(str(cfg.db_path), timeout=DB_CHECK_TIMEOUT_MS / 1000,
                           isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={DB_CHECK_TIMEOUT_MS}")
    return conn


def sync_lag_s(conn: sqlite3.Connection, now: float) -> float | None:
    """Sync lag as health means it: ``sync.status.upload_lag_s``, the age of the oldest bundle
    not yet uploaded (0 when all are up; None without sync)."""
    return sync_status.upload_lag_s(conn, now)


def studies_waiting(conn: sqlite3.Connection) -> int | None:
    try:
        return conn.execute(
            f"SELECT COUNT(*) FROM read_items WHERE state IN "
            f"({','.join('?' * len(WAITING_STATES))})", WAITING_STATES).fetchone()[0]
    except sqlite3.OperationalError:
        return None


def _database(cfg, reasons: list[str], checks: dict[str, Any]) -> dict[str, dict]:
    try:
        conn = connect_bounded(cfg)
    except sqlite3.Error as e:
        reasons.append(f"database cannot be opened: {e}")
        checks["database"] = "error"
        return {}
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        checks["database"] = "writable"
    except sqlite3.Error as e:
        reasons.append(f"database not writable: {e}")
        checks["database"] = "error"
    try:
        return components.read(conn)
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def _sync(cfg, now: float, reasons: list[str], checks: dict[str, Any]) -> None:
    sync_cfg = cfg.values.get("sync", {})
    limit_min = cfg.values.get("health", {}).get("sync_lag_limit_min", 120)
    if sync_cfg.get("target", "none") == "none":
        checks["sync"] = "off"
        return
    try:
        conn = connect_bounded(cfg)
        try:
            lag = sync_lag_s(conn, now)
        finally:
            conn.close()
    except sqlite3.Error:
        lag = None
    if lag is None:
        checks["sync"] = "unknown"
        return
    checks["sync_lag_s"] = round(lag)
    if lag > limit_min * 60:
        reasons.append(f"sync lag {lag / 60:.0f} min is over the limit of {limit_min} min "
                       "(is the uplink down?)")


def check(cfg, now: float | None = None) -> tuple[bool, list[str], dict[str, Any]]:
    """(ready, reasons, checks): the database, free disk, DICOM port, worker, sync lag."""
    now = now or time.time()
    reasons: list[str] = []
    checks: dict[str, Any] = {}
    comps = _database(cfg, reasons, checks)
    try:
        free = durable.free_mb(cfg.data_dir)
    except OSError as e:
        reasons.append(f"data directory unreadable: {e}")
        free = 0.0
    reserve = cfg["dicom"]["low_water_mb"]
    checks["free_disk_mb"] = round(free, 1)
    if free < reserve:
        reasons.append(f"free disk {free:.0f} MiB is under the reserve of {reserve} MiB")
    dicom_ok = port_listening(cfg["dicom"]["bind"], cfg["dicom"]["port"])
    checks["dicom_port"] = "listening" if dicom_ok else "not listening"
    if not dicom_ok:
        reasons.append(f"DICOM port {cfg['dicom']['port']} is not listening")
    worker = comps.get("worker")
    checks["worker"] = "up" if worker and worker["up"] else "down"
    if not (worker and worker["up"]):
        reasons.append(f"{WORKER_DOWN} (no recent heartbeat)")
    _sync(cfg, now, reasons, checks)
    checks["components"] = {name: bool(c["up"]) for name, c in comps.items()}
    return not reasons, reasons, checks
