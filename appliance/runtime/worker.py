"""``appliance worker``: the huey consumer plus a ticker that wakes the sweep."""

from __future__ import annotations

import logging
import threading

from appliance.core import config, db
from appliance.runtime.tasks import Tasks

log = logging.getLogger("appliance.worker")


def run(cfg: config.Config) -> int:
    conn = db.open_db(cfg.db_path)
    conn.close()
    tasks = Tasks(cfg)
    interval = float(cfg["worker"]["sweep_interval_s"])
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            try:
                tasks.sweep()
            except Exception:
                log.exception("could not enqueue the sweep")
            stop.wait(interval)

    threading.Thread(target=tick, name="ticker", daemon=True).start()
    consumer = tasks.huey.create_consumer(workers=2, worker_type="thread", periodic=True,
                                          check_worker_health=True)
    log.info("worker started", extra={"queue": str(cfg.queue_path)})
    try:
        consumer.run()  # installs SIGTERM/SIGINT handlers and returns on shutdown
    finally:
        stop.set()
    return 0
