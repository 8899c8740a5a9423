"""Background tasks, run by ``appliance worker`` on huey (SQLite storage in queue.db).

huey's SQLite storage deletes a task when a consumer dequeues it, so a worker
killed mid-task loses that task.  Durable state therefore lives in our own
tables; huey only *wakes* the work, and the periodic sweep (enqueued by the
worker's ticker every few seconds) picks up anything a dead worker left.
Every task here must be safe to run twice or to die at any line.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from huey import SqliteHuey

from appliance.core import components, config, db

log = logging.getLogger("appliance.worker")

# Modules whose ``sweep(cfg)`` the periodic sweep runs, in order, registered by name. Each sweep must be idempotent and bounded in time.
SWEEP_MODULES = (
    "appliance.patients.studies",  # studies linked to their orders (or flagged) before read
    "appliance.reading.read_queue",  # study completion, read items, claims, SLA escalations
    "appliance.reports.delivery",  # signed reports back to the site
    "appliance.forwarding.sending",  # images to site PACS destinations (forward:, handback)
    "appliance.patients.superseded",  # old copies of reconciled instances removed at PACS
    "appliance.sync.upload",  # bundles built and sent to the cloud
    "appliance.core.audit_heads",  # the audit chain head signed into DATA_DIR/audit-heads/
    "appliance.health.series",  # a health sample a minute, component restarts (status page)
    "appliance.dicomweb.metadata",  # DICOMweb metadata kept per instance after ingest
    "appliance.dicomweb.htj2k_cache",  # HTJ2K frames for thin links (STAT first), pruned by size
    "appliance.accounts.users",  # old sign-in attempts and sessions pruned (hourly)
    "appliance.notify.outbox",  # notifications out by email, SMS, webhook; ack ladder
)


def sweep_steps() -> list[Callable[[config.Config], None]]:
    """Each module's ``sweep``; a missing module or function fails the worker at start."""
    return [importlib.import_module(name).sweep for name in SWEEP_MODULES]


def make_huey(queue_path: Path) -> SqliteHuey:
    return SqliteHuey("appliance", filename=str(queue_path), fsync=True)


class Tasks:
    """The huey instance and the tasks registered on it for one data directory."""

    def __init__(self, cfg: config.Config, immediate: bool = False):
        self.cfg = cfg
        self.huey = make_huey(cfg.queue_path)
        self.huey.immediate = immediate
        self.started_at = time.time()
        self.steps = sweep_steps()
        self.sweep = self.huey.task(name="sweep")(self._sweep)

    def _sweep(self) -> None:
        """Run every sweep step; beat only when the sweep ran, so /readyz sees a stuck worker."""
        conn = db.connect(self.cfg.db_path)
        try:
            for step in self.steps:
                try:
                    step(self.cfg)
                except Exception:
                    log.exception("sweep step %s failed", getattr(step, "__name__", step))
            components.beat(conn, "worker", self.started_at, {"last_sweep": time.time()})
        finally:
            conn.close()
