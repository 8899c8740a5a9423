"""Component heartbeats: each process says it is alive in ``components``.

``appliance status`` and ``/readyz`` read these rows instead of guessing from
PIDs, so they work across the supervisor, systemd and a chroot alike.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from typing import Any

from appliance.core import processes

NAMES = ("dicom", "web", "worker")
# Started only where they can run (the consult media service needs aiortc): shown and
# counted once they have beaten on this site, so a box without them is not "down".
OPTIONAL_NAMES = ("media",)
STALE_AFTER_S = 20.0


def beat(conn: sqlite3.Connection, name: str, started_at: float,
         detail: dict[str, Any] | None = None) -> None:
    conn.execute(
        "INSERT INTO components (name, pid, started_at, heartbeat_at, detail) VALUES (?,?,?,?,?)"
        " ON CONFLICT(name) DO UPDATE SET pid=excluded.pid, started_at=excluded.started_at,"
        " heartbeat_at=excluded.heartbeat_at, detail=excluded.detail",
        (name, os.getpid(), started_at, time.time(), json.dumps(detail or {})),
    )


def start_heartbeat(connect, name: str, interval: float = 5.0,
                    detail=lambda: {}) -> threading.Event:
    """Beat every ``interval`` seconds from a daemon thread; set the event to stop."""
    stop = threading.Event()
    started = time.time()

    def run() -> None:
        conn = connect()
        while True:
            try:
                beat(conn, name, started, detail())
            except sqlite3.Error:
                pass  # a locked database delays a beat; /readyz reports a stale one
            if stop.wait(interval):
                break
        conn.close()

    threading.Thread(target=run, name=f"heartbeat-{name}", daemon=True).start()
    return stop


def read(conn: sqlite3.Connection, now: float | None = None) -> dict[str, dict[str, Any]]:
    now = now or time.time()
    out = {}
    for r in conn.execute("SELECT name, pid, started_at, heartbeat_at, detail FROM components"):
        age = now - (r["heartbeat_at"] or 0)
        out[r["name"]] = {
            "pid": r["pid"], "up": age <= STALE_AFTER_S and processes.alive(r["pid"]),
            "heartbeat_age_s": round(age, 1), "started_at": r["started_at"],
            "detail": json.loads(r["detail"] or "{}"),
        }
    return out
