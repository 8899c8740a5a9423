"""Prometheus metrics of every process, gathered by the web app's ``/metrics``.

Each process (gunicorn workers, the DICOM node, the worker, consult media)
writes its counters to memory-mapped files in ``DATA_DIR/run/prometheus``
(prometheus_client's multiprocess mode); ``/metrics`` merges them, then adds
the figures that live in SQLite (read items, sync lag …), computed at scrape
time so they are never stale.

prometheus_client decides at import whether it writes to files, from
``PROMETHEUS_MULTIPROC_DIR``: :func:`setup` sets it before the first metric is
made, which is why the metric objects are built lazily by :func:`m`.  Every
``observe_*`` function is safe to call in any process and never raises: a
metrics problem must not fail a C-STORE or a sign-in.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from types import SimpleNamespace

from appliance.core import processes

log = logging.getLogger("appliance.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"
_lock = threading.Lock()
_metrics: SimpleNamespace | None = None
_built_for: str | None = None
_PID_FILE = re.compile(r"_(\d+)\.db$")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def multiproc_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "run" / "prometheus"


def setup(data_dir: Path) -> Path:
    """Point this process's metrics at the data directory; drop files of dead processes.

    Called at each process start ("cleaned at start"): files of processes that
    are gone are removed so their gauges stop counting, while the files of the
    other live processes (the DICOM node, the other gunicorn workers) stay.
    """
    global _metrics, _built_for
    path = multiproc_dir(data_dir)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(path)
    _remove_dead(path)
    if _built_for != str(path):
        _metrics = None  # made again, writing to this directory
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # in case prometheus_client came in earlier
    return path


def _remove_dead(path: Path) -> None:
    for f in path.glob("*.db"):
        match = _PID_FILE.search(f.name)
        if match and not processes.alive(int(match.group(1))):
            try:
                f.unlink()
            except FileNotFoundError:
                pass


def m() -> SimpleNamespace:
    """The metric objects, made on first use (after :func:`setup`)."""
    global _metrics, _built_for
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _built_for = os.environ.get(ENV)
                _metrics = _build()
    return _metrics


def ensure_setup(data_dir: Path) -> None:
    """:func:`setup` once per process (for code that runs repeatedly, like a sweep)."""
    if os.environ.get(ENV) != str(multiproc_dir(data_dir)):
        setup(data_dir)


def _build() -> SimpleNamespace:
    """The metric objects. Not registered globally: /metrics reads every process's files."""
    from functools import partial

    import prometheus_client

    Counter = partial(prometheus_client.Counter, registry=None)
    Gauge = partial(prometheus_client.Gauge, registry=None)
    Histogram = partial(prometheus_client.Histogram, registry=None)

    return SimpleNamespace(
        cstore=Counter("appliance_cstore_total", "C-STORE requests by calling AE and outcome",
                       ["calling_ae", "outcome"]),
        cstore_failures=Counter("appliance_cstore_failures_total",
                                "C-STORE requests not stored (invalid, no space, failed)",
                                ["calling_ae"]),
        cstore_seconds=Histogram("appliance_cstore_seconds",
                                 "Time to store one instance durably", ["calling_ae"],
                                 buckets=LATENCY_BUCKETS),
        auth_seconds=Histogram("appliance_auth_seconds", "Sign-in request latency",
                               buckets=LATENCY_BUCKETS),
        auth_failures=Counter("appliance_auth_failures_total", "Failed sign-ins"),
        dicomweb_seconds=Histogram("appliance_dicomweb_seconds",
                                   "DICOMweb request latency", ["service"],
                                   buckets=LATENCY_BUCKETS),
        consult_join_seconds=Histogram("appliance_consult_join_seconds",
                                       "Consult join to first frame",
                                       buckets=(0.5, 1, 2, 3, 5, 8, 13, 30)),
        consult_calls=Counter("appliance_consult_calls_total", "Consult calls ended"),
        consult_drops=Counter("appliance_consult_drops_total", "Consult calls dropped"),
        notifications=Counter("appliance_notifications_total",
                              "Notifications handed to an outbound channel, by outcome",
                              ["channel", "outcome"]),
        notification_seconds=Histogram("appliance_notification_delivery_seconds",
                                       "From the notification to its channel's acceptance",
                                       ["channel"], buckets=(1, 2, 5, 10, 30, 60, 120, 300, 900)),
        worker_last_sweep=Gauge("appliance_worker_last_sweep_timestamp_seconds",
                                "When the worker last completed a sweep",
                                multiprocess_mode="max"),
    )


def _safely(fn) -> None:
    try:
        fn()
    except Exception:  # never let metrics break the work being measured
        log.debug("metrics update failed", exc_info=True)


def observe_store(calling_ae: str, seconds: float, outcome: str, success: bool) -> None:
    def do() -> None:
        mm = m()
        mm.cstore.labels(calling_ae, outcome).inc()
        mm.cstore_seconds.labels(calling_ae).observe(seconds)
        if not success:
            mm.cstore_failures.labels(calling_ae).inc()
    _safely(do)


def observe_auth(seconds: float, ok: bool) -> None:
    def do() -> None:
        m().auth_seconds.observe(seconds)
        if not ok:
            m().auth_failures.inc()
    _safely(do)


def observe_dicomweb(service: str, seconds: float) -> None:
    _safely(lambda: m().dicomweb_seconds.labels(service).observe(seconds))


def observe_consult(join_seconds: float | None = None, ended: bool = False,
                    dropped: bool = False) -> None:
    """For consult media: a join (seconds to first frame) or a call's end."""
    def do() -> None:
        if join_seconds is not None:
            m().consult_join_seconds.observe(join_seconds)
        if ended or dropped:
            m().consult_calls.inc()
        if dropped:
            m().consult_drops.inc()
    _safely(do)


def observe_notification(channel: str, outcome: str, seconds: float | None = None) -> None:
    """For the notify outbox: one attempt (sent or failed) and, when sent, its latency."""
    def do() -> None:
        m().notifications.labels(channel, outcome).inc()
        if seconds is not None:
            m().notification_seconds.labels(channel).observe(seconds)
    _safely(do)


def worker_swept(ts: float) -> None:
    _safely(lambda: m().worker_last_sweep.set(ts))


AE_LABELS = 32  # distinct calling_ae label values, configured AEs first; the rest: "other"


class AeLabels:
    """The ``calling_ae`` label for an AE title, from a bounded set.

    Any peer may call with any AE title, and every label value is a time
    series kept forever: unbounded, 200 random titles meant 200 series per
    metric.  Configured AEs always get their own label; others take the
    ``budget`` left first come, first served (split between node processes,
    so the whole node stays within ``AE_LABELS``), then fold into ``other``.
    """

    def __init__(self, configured: list[str], processes: int = 1):
        self.configured = set(configured[:AE_LABELS])
        self.budget = max(0, AE_LABELS - len(self.configured)) // max(processes, 1)
        self.seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, calling_ae: str) -> str:
        if calling_ae in self.configured or calling_ae in self.seen:
            return calling_ae
        with self._lock:
            if len(self.seen) < self.budget:
                self.seen.add(calling_ae)
                return calling_ae
        return "other"


def instrument_store(store, data_dir: Path, known_aes: list[str] | None = None,
                     processes: int = 1) -> None:
    """Time every C-STORE write of the DICOM node's study store, by calling AE and outcome.

    dicom_node must not import appliance, so the appliance wraps the store it
    hands to the node (appliance/runtime/dicom_service.py calls this once at start).
    """
    import time

    setup(data_dir)
    inner = store.store
    label = AeLabels(known_aes or [], processes)

    def timed_store(data, calling_ae: str = "", *args, **kwargs):
        start = time.perf_counter()
        result = inner(data, calling_ae, *args, **kwargs)
        observe_store(label(calling_ae or ""), time.perf_counter() - start, result.outcome,
                      result.success)
        return result

    store.store = timed_store
