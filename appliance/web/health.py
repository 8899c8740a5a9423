"""Health endpoints: /livez (process alive), /readyz (can it do its job?), /healthz (alias).

/readyz answers 503 with every reason it found, so a responder sees what to
fix, not only that something is wrong.
"""

from __future__ import annotations

import socket
import sqlite3
import time

from flask import Blueprint, current_app, jsonify

from appliance import components
from appliance.web import get_db
from dicom_node import durable

bp = Blueprint("health", __name__)


@bp.get("/livez")
def livez():
    return jsonify(status="ok", ts=time.time())


def _port_listening(host: str, port: int) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    try:
        with socket.create_connection((target, port), timeout=1):
            return True
    except OSError:
        return False


def readiness() -> tuple[bool, list[str], dict]:
    cfg = current_app.config["SITE"]
    reasons: list[str] = []
    checks: dict = {}
    try:
        conn = get_db()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        checks["database"] = "writable"
        comps = components.read(conn)
    except sqlite3.Error as e:
        reasons.append(f"database not writable: {e}")
        checks["database"] = "error"
        comps = {}
    free = durable.free_mb(cfg.data_dir)
    checks["free_disk_mb"] = round(free)
    if free < cfg["dicom"]["low_water_mb"]:
        reasons.append(f"free disk {free:.0f} MiB is under the reserve of "
                       f"{cfg['dicom']['low_water_mb']} MiB")
    dicom_ok = _port_listening(cfg["dicom"]["bind"], cfg["dicom"]["port"])
    checks["dicom_port"] = "listening" if dicom_ok else "not listening"
    if not dicom_ok:
        reasons.append(f"DICOM port {cfg['dicom']['port']} is not listening")
    worker = comps.get("worker")
    checks["worker"] = "up" if worker and worker["up"] else "down"
    if not (worker and worker["up"]):
        reasons.append("worker is not sweeping (no recent heartbeat)")
    return not reasons, reasons, checks


@bp.get("/readyz")
@bp.get("/healthz")
def readyz():
    ok, reasons, checks = readiness()
    body = {"status": "ok" if ok else "unavailable", "reasons": reasons, "checks": checks}
    return jsonify(body), (200 if ok else 503)
