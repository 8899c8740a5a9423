"""/status (health at a glance) and /metrics (Prometheus).

Anyone on site may see the coarse colour: green (ready, nothing to watch),
amber (ready, but something needs attention), red (not ready, or reads past
their SLA).  Signed-in users also see components, SLOs with the month's error
budget, 24-hour plots (inline SVG drawn from SQLite: no external server, no
CDN) and the alert list.

The blueprint also times sign-ins and DICOMweb requests for the metrics and the
authentication SLO, without touching those areas' code.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    has_request_context,
    jsonify,
    render_template,
    request,
)
from markupsafe import Markup

from appliance.core import metrics
from appliance.forwarding import outbox as forward_outbox
from appliance.forwarding import progress as handback_progress
from appliance.forwarding import status as forward_status
from appliance.health import readiness, status_report
from appliance.health import series as health_series
from appliance.reading import read_queue
from appliance.sync import status as sync_status
from appliance.web import get_db

bp = Blueprint("status_page", __name__)

AUTH_PATHS = ("/login", "/login/totp")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")  # a caller's id is kept only if it is sane
AUTH_SLO_S = 3.0


def _public(view):
    view.auth_public = True  # read by the auth area's permission table test
    return view


@bp.record_once
def _setup_metrics(state) -> None:
    metrics.setup(state.app.config["SITE"].data_dir)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


class RequestIdFilter(logging.Filter):
    """Put the request id on every log line written while a request is served."""

    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context() and "request_id" in g and not hasattr(record, "request_id"):
            record.request_id = g.request_id
        return True


def _user() -> dict[str, Any] | None:
    try:
        from appliance.accounts import sessions as auth
    except ImportError:  # no sign-in in this build: details stay hidden
        return None
    return auth.current_user()


# -- timing of other areas' requests -------------------------------------------------------------
@bp.before_app_request
def _start_timer() -> None:
    g.status_page_t0 = time.perf_counter()
    given = request.headers.get("X-Request-Id", "")
    g.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]


@bp.after_app_request
def _time_request(response: Response) -> Response:
    if "request_id" in g:
        response.headers["X-Request-Id"] = g.request_id
    t0 = g.pop("status_page_t0", None)
    if t0 is None:
        return response
    seconds = time.perf_counter() - t0
    path = request.path
    if request.method == "POST" and path in AUTH_PATHS:
        location = response.headers.get("Location", "")
        ok = response.status_code in (301, 302, 303) and not location.startswith("/login?")
        metrics.observe_auth(seconds, ok)
        try:
            health_series.observe(get_db(), "auth", seconds, seconds < AUTH_SLO_S)
        except Exception:  # a locked database must not fail the sign-in itself
            current_app.logger.warning("could not record the sign-in SLO observation")
    elif path.startswith("/dicom-web/"):
        metrics.observe_dicomweb(_dicomweb_service(path), seconds)
    return response


def _dicomweb_service(path: str) -> str:
    if request.method == "POST":
        return "stow"
    if "/frames/" in path or "/rendered" in path or "/thumbnail" in path \
            or path.endswith("/metadata") or "/instances/" in path:
        return "wado"
    return "qido"


# -- /metrics ---------------------------------------------------------------------------------------
class SqliteCollector:
    """Figures that live in SQLite or on disk, computed at scrape time (never stale)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        now = time.time()
        conn = readiness.connect_bounded(self.cfg)
        try:
            yield from self._families(conn, now, GaugeMetricFamily, CounterMetricFamily)
        finally:
            conn.close()

    def _families(self, conn, now, Gauge, Counter):
        ready, _reasons, checks = readiness.check(self.cfg, now=now)
        yield Gauge("appliance_ready", "1 when /readyz would answer 200", value=int(ready))
        up = Gauge("appliance_component_up", "Component heartbeat fresh", labels=["component"])
        for name, is_up in checks.get("components", {}).items():
            up.add_metric([name], int(is_up))
        yield up
        yield Gauge("appliance_disk_free_bytes", "Free disk in the data directory",
                    value=checks["free_disk_mb"] * 1024 * 1024)
        yield from _sql_families(conn, now, Gauge, Counter)


def _sql_families(conn, now, Gauge, Counter):
    import sqlite3

    def rows(sql, params=()):
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError:  # an area this build does not have
            return []

    def area(read, *args):
        """An owner's figure, or None when this build does not have its tables."""
        try:
            return read(*args)
        except sqlite3.OperationalError:
            return None

    r = rows("SELECT COUNT(*), COALESCE(SUM(num_instances), 0) FROM studies")
    if r:
        yield Gauge("appliance_studies", "Studies stored", value=r[0][0])
        yield Gauge("appliance_instances", "Instances stored", value=r[0][1])
    by_state = Gauge("appliance_read_items", "Read items by state", labels=["state"])
    for state, n in (area(read_queue.counts_by_state, conn) or {}).items():
        by_state.add_metric([state], n)
    yield by_state
    waiting = readiness.studies_waiting(conn)
    if waiting is not None:
        yield Gauge("appliance_studies_waiting", "Studies waiting for a read", value=waiting)
    totals = area(read_queue.read_totals, conn)
    if totals:
        yield Counter("appliance_sla_breaches", "Read items that breached their SLA",
                      value=totals["breached"])
        yield Counter("appliance_time_to_read_seconds_count", "Reads done",
                      value=totals["reads"])
        yield Counter("appliance_time_to_read_seconds_sum", "Seconds from arrival to read",
                      value=totals["read_seconds"])
    lag = readiness.sync_lag_s(conn, now)
    if lag is not None:
        yield Gauge("appliance_sync_lag_seconds", "Age of the oldest bundle not uploaded",
                    value=lag)
    sent = area(sync_status.bytes_uploaded, conn)
    if sent is not None:
        yield Counter("appliance_sync_bytes", "Bytes uploaded to the sync target", value=sent)
    yield from _consult_families(conn, now, Gauge)
    yield from _forward_families(conn, now, Gauge)
    yield from _handback_families(conn, now, Gauge)


def _handback_families(conn, now, Gauge):
    """Each destination's recent hand-back: planned and sent, its state, rate and time left
    (the figures of the status page's panel, from the same rows)."""
    import sqlite3

    try:
        runs = handback_progress.recent(conn, now)
    except sqlite3.OperationalError:
        return
    figures = {name: Gauge(f"appliance_handback_{name}", text, labels=["destination", "figure"])
               for name, text in (("instances", "Hand-back instances planned and sent"),
                                  ("bytes", "Hand-back bytes planned and sent"),
                                  ("report_documents", "Hand-back report SRs planned and sent"))}
    state = Gauge("appliance_handback_state", "1 for the hand-back's current state",
                  labels=["destination", "state"])
    rate = Gauge("appliance_handback_bytes_per_second", "Hand-back rate while running",
                 labels=["destination"])
    left = Gauge("appliance_handback_seconds_left", "Hand-back time left at its rate",
                 labels=["destination"])
    started = Gauge("appliance_handback_started_timestamp_seconds", "When the hand-back began",
                    labels=["destination"])
    for h in runs:
        d = h.destination
        for name, planned, sent in (("instances", h.instances_planned, h.instances_sent),
                                    ("bytes", h.bytes_planned, h.bytes_sent),
                                    ("report_documents", h.reports_planned, h.reports_sent)):
            figures[name].add_metric([d, "planned"], planned)
            figures[name].add_metric([d, "sent"], sent)
        for st in handback_progress.STATES:
            state.add_metric([d, st], int(h.state == st))
        rate.add_metric([d], h.rate_bytes_s if h.state == "running" else 0.0)
        if h.seconds_left is not None:
            left.add_metric([d], h.seconds_left)
        started.add_metric([d], h.started_at)
    yield from (*figures.values(), state, rate, left, started)


def _forward_families(conn, now, Gauge):
    """Forwarding outbox rows per destination and state, and the oldest waiting."""
    import sqlite3

    try:
        rows = forward_status.summary(conn, now)
    except sqlite3.OperationalError:
        return
    by_state = Gauge("appliance_forward_instances", "Forwarding rows by destination and state",
                     labels=["destination", "state"])
    oldest = Gauge("appliance_forward_oldest_waiting_seconds", "Age of the oldest waiting row",
                   labels=["destination"])
    for d in rows:
        for state in forward_outbox.STATES:
            by_state.add_metric([d["destination"], state], d[state])
        if d["oldest_waiting_at"] is not None:
            oldest.add_metric([d["destination"]], now - d["oldest_waiting_at"])
    yield by_state
    yield oldest


def _consult_families(conn, now, Gauge):
    """Consult join time p50/p95, drop rate, share of time degraded (30 days, from SQLite)."""
    figures = status_report.consult_figures(conn, now)
    if figures is None:
        return
    join = Gauge("appliance_consult_join_quantile_seconds",
                 "Consult join to first frame over 30 days, by quantile", labels=["quantile"])
    for q, key in (("0.5", "join_ms_p50"), ("0.95", "join_ms_p95")):
        if figures[key] is not None:
            join.add_metric([q], figures[key] / 1000)
    yield join
    yield Gauge("appliance_consult_calls_30d", "Consults started in the last 30 days",
                value=figures["calls"])
    yield Gauge("appliance_consult_drop_ratio", "Share of consults (30 days) that dropped",
                value=figures["drop_rate"])
    yield Gauge("appliance_consult_degraded_ratio",
                "Share of sampled consult time (30 days) below video", value=figures["degraded_share"])


@bp.get("/metrics")
@_public
def prometheus_metrics():
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    cfg = current_app.config["SITE"]
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics.multiproc_dir(cfg.data_dir)))
    registry.register(SqliteCollector(cfg))
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


# -- /status -----------------------------------------------------------------------------------------
def _report(detailed: bool) -> dict[str, Any]:
    cfg = current_app.config["SITE"]
    conn = readiness.connect_bounded(cfg)  # short busy timeout: the page answers during a lock
    try:
        report = status_report.collect(cfg, conn)
    except Exception as e:  # the database itself is the fault: show that, not a 500
        ready, reasons, checks = readiness.check(cfg)
        report = {"site": cfg["site"]["name"], "status": "red", "ready": ready,
                  "checked_at": time.time(), "reasons": reasons or [f"status unavailable: {e}"],
                  "checks": checks, "components": {}, "slos": [], "series": {},
                  "alerts": [{"severity": "red", "title": r, "detail": ""}
                             for r in reasons or [f"status unavailable: {e}"]]}
    finally:
        conn.close()
    if not detailed:
        return {"site": report["site"], "status": report["status"],
                "checked_at": report["checked_at"]}
    return report


@bp.get("/status.json")
@_public
def status_json():
    user = _user()
    report = _report(detailed=user is not None)
    report["detailed"] = user is not None
    return jsonify(report), (200 if report["status"] != "red" else 503)


@bp.get("/status")
@_public
def status_html():
    user = _user()
    report = _report(detailed=user is not None)
    html = render_template("health/status.html", r=report, user=user, plots=_plots(report),
                           fmt_pct=_pct, when=_when, ms=_ms, mb=_mb,
                           duration=handback_progress.duration_text)
    return html, (200 if report["status"] != "red" else 503), {"Refresh": "30"}


def _pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x * 100:.{digits}f}%"


def _mb(n: float) -> str:
    """Bytes as MB with one decimal, as the hand-back's terminal bar prints them."""
    return f"{n / 1e6:.1f}"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x / 1000:.2f} s"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


PLOTS = (("ready", "Ready (1 = yes)"), ("instances_per_min", "Instances received / min"),
         ("studies_waiting", "Studies waiting"), ("overdue_reads", "Reads past SLA"),
         ("free_disk_mb", "Free disk (MiB)"), ("sync_lag_s", "Sync lag (s)"))


def _plots(report: dict[str, Any]) -> list[tuple[str, Markup, str]]:
    series = report.get("series") or {}
    now = report["checked_at"]
    return [(title, sparkline(series.get(name, []), now - 86400, now),
             _last(series.get(name, []))) for name, title in PLOTS]


def _last(points: list) -> str:
    return "no data" if not points else f"now {points[-1][1]:g}"


def sparkline(points: list, t0: float, t1: float, w: int = 320, h: int = 60) -> Markup:
    """A 24-hour plot as inline SVG: a polyline over the time axis, min/max labelled."""
    if not points:
        return Markup(f'<svg class="plot" width="{w}" height="{h}" role="img"><text x="8" '
                      f'y="{h // 2}" class="nodata">no samples yet</text></svg>')
    lo = min(v for _, v in points)
    hi = max(v for _, v in points)
    span = (hi - lo) or 1.0
    pad = 4

    def xy(t: float, v: float) -> str:
        x = pad + (t - t0) / max(t1 - t0, 1) * (w - 2 * pad)
        y = h - pad - (v - lo) / span * (h - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(t, v) for t, v in points)
    dots = "".join(  # a lone sample (a fresh site) would be an invisible line
        f'<circle cx="{xy(t, v).split(",")[0]}" cy="{xy(t, v).split(",")[1]}" r="2" '
        f'fill="#2563eb"/>' for t, v in points) if len(points) < 3 else ""
    return Markup(
        f'<svg class="plot" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">'
        f'<polyline fill="none" stroke="#2563eb" stroke-width="1.5" points="{line}"/>{dots}'
        f'<text x="{w - 4}" y="12" text-anchor="end">{hi:g}</text>'
        f'<text x="{w - 4}" y="{h - 4}" text-anchor="end">{lo:g}</text></svg>')
