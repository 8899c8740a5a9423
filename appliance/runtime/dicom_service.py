"""``appliance dicom``: runs the DICOM node with this site's settings.

The node itself (dicom_node/) knows nothing of the appliance; here we hand it
its settings, the study store, and hooks that audit what happens.  Known AEs
are re-read from ``appliance.yaml`` when the file changes, so ``appliance ae
add`` takes effect without a restart.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import select
import signal
import threading
import time
from pathlib import Path
from typing import Any

from appliance.core import audit, components, config, db, metrics
from appliance.dicomweb import metadata as dicomweb_metadata
from appliance.forwarding import commitment as forward_commitment
from dicom_node import index as dicom_index
from dicom_node.node import DicomNode, NodeSettings, Peer, listen
from dicom_node.study_store import StudyStore

log = logging.getLogger("appliance.dicom")
# The lock file through which every node process counts each address's associations.
PEER_SLOTS_NAME = "dicom-peers.lock"


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
        return [Peer(a.name, a.host, a.port, a.query, a.move_destination, a.worklist)
                for a in cfg.known_aes]

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


class Auditor:
    """The store's ``on_event`` hook: one audit row per event, a connection per thread."""

    def __init__(self, db_path: Path):
        self.db_path = db_path
        self._local = threading.local()

    def __call__(self, kind: str, detail: dict[str, Any]) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = db.connect(self.db_path)
        audit.record(conn, f"dicom:{detail.get('calling_ae', '')}", kind,
                     detail.get("sop_uid", ""), detail=detail)

    def close(self) -> None:
        """Close this thread's connection (before a fork: SQLite must not cross one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def build_node(cfg: config.Config) -> DicomNode:
    conn = db.open_db(cfg.db_path)  # migrations run on every start
    conn.close()
    on_event = Auditor(cfg.db_path)
    store = StudyStore(cfg.studies_dir, cfg.db_path, low_water_mb=cfg["dicom"]["low_water_mb"],
                       on_event=on_event, connect=db.connect, derive=dicomweb_metadata.at_ingest)
    metrics.instrument_store(store, cfg.data_dir,  # C-STORE counts/latency for /metrics
                             [a.name for a in cfg.known_aes], cfg["dicom"]["processes"])
    dcfg = cfg["dicom"]
    settings = NodeSettings(
        ae_title=dcfg["ae_title"], port=dcfg["port"], bind=dcfg["bind"],
        store_from=dcfg["store_from"], max_associations=dcfg["max_associations"],
        peers=PeerList(cfg), fast_store=dcfg["fast_store"],
        max_dataset_bytes=dcfg["max_dataset_bytes"],
        max_associations_per_peer=dcfg["max_associations_per_peer"],
        peer_slots_path=str(cfg.data_dir / PEER_SLOTS_NAME),
        max_idle_life_s=dcfg["max_association_idle_life_s"],
        require_host_for_query=dcfg["require_host_for_query"],
    )

    def on_reject(calling: str, address: str, reason: str) -> None:
        on_event("association.rejected", {"calling_ae": calling, "address": address,
                                          "reason": reason})

    node = DicomNode(settings, store, on_reject=on_reject)
    _add_query_services(node, on_event)
    forward_commitment.accept_reports(node.ae, node.handlers, cfg)  # PACS-opened N-EVENT-REPORT
    _add_patient_services(node, cfg, on_event)
    return node


def _add_patient_services(node: DicomNode, cfg: config.Config, on_event) -> None:
    """Modality Worklist C-FIND and MPPS N-CREATE/N-SET over the registration desk's orders."""
    from appliance.patients import orders
    from dicom_node import mpps, worklist

    worklist.add_contexts(node.ae)
    mpps.add_contexts(node.ae)
    source = worklist.WorklistSource(orders.WORKLIST_SQL, lambda: node.store.conn)
    node.handlers = worklist.bind(node.handlers, worklist.WorklistService(
        node.settings, source, on_event))
    node.handlers.extend(mpps.handlers(mpps.MppsService(
        node.settings, orders.MppsRecorder(cfg.db_path, on_event), on_event)))


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
    """Serve DICOM with ``dicom.processes`` processes accepting from one port.

    One pynetdicom process ingests on about one core (the GIL), so parallel
    senders need more than one.  The parent migrates and recovers the store
    first, binds the port, then forks the others before it starts any thread
    or opens any SQLite connection; each process then builds its own node,
    store and connections.  A child that dies stops the parent with an
    error, so the supervisor restarts the whole node (and its recovery).
    """
    conn = db.open_db(cfg.db_path)  # migrations run on every start
    counts = dicom_index.counts(conn)
    conn.close()
    _recover(cfg)
    dcfg = cfg["dicom"]
    listener = listen(dcfg["bind"], dcfg["port"])
    children = [_fork_child(cfg, listener) for _ in range(dcfg["processes"] - 1)]
    node = build_node(cfg)
    stop_beat = components.start_heartbeat(
        lambda: db.connect(cfg.db_path), "dicom",
        detail=lambda: {"ae_title": dcfg["ae_title"], "port": dcfg["port"],
                        "processes": dcfg["processes"]},
    )
    done = _stop_on_signals()
    node.start(listener=listener)
    log.info("DICOM node ready", extra={"ae_title": dcfg["ae_title"], "port": dcfg["port"],
                                        "processes": dcfg["processes"], **counts})
    code = 0
    try:
        while not done.wait(0.5):
            dead = _reap(children)
            if dead:
                code = 0 if done.is_set() or dead[1] == 0 else 1
                if code:
                    log.error("DICOM node process %s died (status %s): stopping the node",
                              dead[0], dead[1])
                break
        node.stop()
    finally:
        _stop_children(children)
        stop_beat.set()
    return code


def _recover(cfg: config.Config) -> None:
    """Start-up recovery, once, in the parent, with connections closed afterwards."""
    auditor = Auditor(cfg.db_path)
    store = StudyStore(cfg.studies_dir, cfg.db_path, on_event=auditor, connect=db.connect,
                       derive=dicomweb_metadata.at_ingest)  # reindexed series answer /metadata
    try:
        recovered = store.recover()
    finally:
        store.close()
        auditor.close()
    if any(recovered.values()):
        log.warning("start-up recovery", extra=recovered)


class StopSignal:
    """Set by SIGTERM/SIGINT; waited on by the node's main loop.

    The handler must take no lock: a ``threading.Event`` set from a signal
    handler deadlocks when a second signal (the parent-death SIGTERM after a
    supervisor's SIGTERM) interrupts the first handler inside ``Event.set``,
    which left a node process running forever after its parent died.  A
    plain flag and one byte down a pipe are safe to write from a handler.
    """

    def __init__(self) -> None:
        self._set = False
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)

    def set(self) -> None:
        self._set = True
        try:
            os.write(self._write, b"x")
        except OSError:  # pipe full: already woken
            pass

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """True once set; otherwise returns after ``timeout`` seconds."""
        if not self._set:
            select.select([self._read], [], [], timeout)
        return self._set


def _stop_on_signals() -> StopSignal:
    done = StopSignal()

    def shutdown(signum, _frame) -> None:
        if not done.is_set():
            log.info("stopping DICOM node (signal %s)", signum)
        done.set()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    return done


def _fork_child(cfg: config.Config, listener) -> int:
    """Fork one more node process serving ``listener``; return its pid."""
    if threading.active_count() > 1:
        log.warning("forking with %d threads running", threading.active_count())
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _die_with_parent(parent)
        done = _stop_on_signals()
        node = build_node(cfg)
        node.start(listener=listener)
        while not done.wait(0.5):  # the parent's death signal, or its absence noticed
            if os.getppid() != parent:
                log.error("DICOM node parent %s is gone: stopping", parent)
                break
        _exit_if_stuck(STOP_GRACE_S)
        node.stop()
        code = 0
    except BaseException:
        log.exception("DICOM node process failed")
    finally:
        os._exit(code)


STOP_GRACE_S = 5.0


def _exit_if_stuck(grace_s: float) -> None:
    """End this process after ``grace_s`` even if stopping the node hangs.

    A node process that outlives its parent holds the shared port and blocks
    the supervisor's restart; what it acknowledged is already durable, so a
    stop that does not finish in time is cut short.
    """
    timer = threading.Timer(grace_s, os._exit, args=(1,))
    timer.daemon = True
    timer.start()


def _die_with_parent(parent: int) -> None:
    """Ask Linux for SIGTERM when the parent dies, so no orphan keeps the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _reap(children: list[int]) -> tuple[int, int] | None:
    """(pid, exit status) of a child that has exited, if any."""
    for pid in children:
        try:
            done_pid, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return pid, -1
        if done_pid:
            children.remove(pid)
            return pid, os.waitstatus_to_exitcode(status)
    return None


def _stop_children(children: list[int], timeout: float = 8.0) -> None:
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in children:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                break
            time.sleep(0.05)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
