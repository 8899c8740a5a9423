"""``appliance dicom``: runs the DICOM node with this site's settings.

The node itself (dicom_node/) knows nothing of the appliance; here we hand it
its settings, the study store, and hooks that audit what happens.  Known AEs
are re-read from ``appliance.yaml`` when the file changes, so ``appliance ae
add`` takes effect without a restart.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from appliance import audit, components, config, db, metrics
from dicom_node import index as dicom_index
from dicom_node.node import DicomNode, NodeSettings, Peer
from dicom_node.study_store import StudyStore

log = logging.getLogger("appliance.dicom")


class PeerList:
    """Known AEs from appliance.yaml, re-read when the file's mtime changes.

    A broken edit keeps the last good list and is logged, never applied.
    """

    def __init__(self, cfg: config.Config):
        self.data_dir = cfg.data_dir
        self.path = cfg.data_dir / config.CONFIG_NAME
        self._mtime = self._stat()
        self._peers = self._convert(cfg)
        self._lock = threading.Lock()

    def _stat(self) -> float:
        try:
            return os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return 0

    @staticmethod
    def _convert(cfg: config.Config) -> list[Peer]:
        return [Peer(a.name, a.host, a.port, a.query, a.move_destination) for a in cfg.known_aes]

    def __call__(self) -> list[Peer]:
        mtime = self._stat()
        if mtime != self._mtime:
            with self._lock:
                if mtime != self._mtime:
                    self._mtime = mtime
                    try:
                        self._peers = self._convert(config.load(self.data_dir))
                        log.info("known AEs reloaded", extra={"count": len(self._peers)})
                    except config.ConfigError as e:
                        log.error("appliance.yaml edit rejected, keeping last good AEs: %s", e)
        return self._peers


def _auditor(db_path: Path):
    local = threading.local()

    def on_event(kind: str, detail: dict[str, Any]) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = db.connect(db_path)
        audit.record(conn, f"dicom:{detail.get('calling_ae', '')}", kind,
                     detail.get("sop_uid", ""), detail=detail)

    return on_event


def build_node(cfg: config.Config) -> DicomNode:
    conn = db.open_db(cfg.db_path)  # migrations run on every start
    conn.close()
    on_event = _auditor(cfg.db_path)
    store = StudyStore(cfg.studies_dir, cfg.db_path, low_water_mb=cfg["dicom"]["low_water_mb"],
                       on_event=on_event, connect=db.connect)
    metrics.instrument_store(store, cfg.data_dir)  # C-STORE counts/latency for /metrics
    dcfg = cfg["dicom"]
    settings = NodeSettings(
        ae_title=dcfg["ae_title"], port=dcfg["port"], bind=dcfg["bind"],
        store_from=dcfg["store_from"], max_associations=dcfg["max_associations"],
        peers=PeerList(cfg),
    )

    def on_reject(calling: str, address: str, reason: str) -> None:
        on_event("association.rejected", {"calling_ae": calling, "address": address,
                                          "reason": reason})

    node = DicomNode(settings, store, on_reject=on_reject)
    _add_query_services(node, on_event)
    return node


def _add_query_services(node: DicomNode, on_event) -> None:
    """C-FIND / C-MOVE / C-GET: contexts and handlers from dicom_node.retrieve."""
    try:
        retrieve = importlib.import_module("dicom_node.retrieve")
    except ModuleNotFoundError as e:
        if e.name != "dicom_node.retrieve":
            raise
        return
    retrieve.add_contexts(node.ae)
    node.handlers.extend(retrieve.handlers(node.settings, node.store, on_event))


def run(cfg: config.Config) -> int:
    node = build_node(cfg)
    recovered = node.store.recover()
    if any(recovered.values()):
        log.warning("start-up recovery", extra=recovered)
    conn = db.connect(cfg.db_path)
    counts = dicom_index.counts(conn)
    conn.close()
    stop_beat = components.start_heartbeat(
        lambda: db.connect(cfg.db_path), "dicom",
        detail=lambda: {"ae_title": cfg["dicom"]["ae_title"], "port": cfg["dicom"]["port"]},
    )
    done = threading.Event()

    def shutdown(signum, _frame) -> None:
        log.info("stopping DICOM node (signal %s)", signum)
        done.set()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    node.start()
    log.info("DICOM node ready", extra={"ae_title": cfg["dicom"]["ae_title"],
                                        "port": cfg["dicom"]["port"], **counts})
    done.wait()
    node.stop()
    stop_beat.set()
    return 0
