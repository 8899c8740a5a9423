"""What the status page shows: overall colour, components, SLOs with error budgets, alerts, plots.

Everything is computed from SQLite, the data directory and the same checks as
``/readyz`` (:mod:`appliance.health.readiness`), so the page works on an appliance
with no network and no metrics server.  Kept out of ``appliance.web`` so the
logic can be tested without HTTP.
"""

from __future__ import annotations

import calendar
import datetime as dt
import sqlite3
import time
from dataclasses import asdict, dataclass
from typing import Any

from appliance.consults import rooms as consults
from appliance.core import components
from appliance.forwarding import progress as handback_progress
from appliance.forwarding import status as forward_status
from appliance.health import readiness
from appliance.health import series as health_series
from appliance.reading import read_queue
from appliance.sync import status as sync_status

RESTART_LOOP_COUNT = 3
RESTART_LOOP_WINDOW_S = 600
DISK_FORECAST_WARN_H = 24
CERT_WARN_DAYS = 14
CONSULT_WINDOW_S = 30 * 86400  # consult figures (join p50/p95, drops, degraded) over 30 days


@dataclass
class Slo:
    key: str
    name: str
    objective: str
    target: float  # fraction of good events (or minutes)
    total: int  # events (or minutes) so far this month
    bad: int
    allowed_bad: float  # the month's error budget, in events (or minutes)

    @property
    def current(self) -> float | None:
        return None if self.total == 0 else (self.total - self.bad) / self.total

    @property
    def budget_left(self) -> float:
        """Fraction of this month's error budget not yet spent (negative when overspent)."""
        if self.allowed_bad <= 0:
            return 1.0 if self.bad == 0 else -1.0
        return 1.0 - self.bad / self.allowed_bad

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(current=self.current, budget_left=self.budget_left,
                 met=self.current is None or self.current >= self.target)
        return d


@dataclass
class Alert:
    severity: str  # "red" or "amber"
    title: str
    detail: str = ""


def month_bounds(now: float) -> tuple[float, float]:
    """Start and end (UTC) of the calendar month holding ``now``."""
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    start = dt.datetime(t.year, t.month, 1, tzinfo=dt.UTC)
    days = calendar.monthrange(t.year, t.month)[1]
    return start.timestamp(), start.timestamp() + days * 86400


def slos(conn: sqlite3.Connection, now: float) -> list[Slo]:
    start, end = month_bounds(now)
    month_minutes = (end - start) / 60
    total, down = health_series.uptime(conn, start, now)
    out = [Slo("uptime", "Uptime", "ready 99.95% of minutes", 0.9995, total, down,
               (1 - 0.9995) * month_minutes)]
    for key, name, objective, target in (
        ("video_join", "Video join", "99% of consult joins under 5 s", 0.99),
        ("call_drop", "Call drops", "under 2% of consult calls dropped", 0.98),
        ("auth", "Authentication", "99% of sign-ins under 3 s", 0.99),
    ):
        n, bad = health_series.observations(conn, key, start)
        out.append(Slo(key, name, objective, target, n, bad, (1 - target) * n))
    n, bad = _reads(conn, start, now)
    out.append(Slo("read_within_sla", "Reads within SLA", "95% of studies read within their SLA",
                   0.95, n, bad, 0.05 * n))
    return out


def _reads(conn: sqlite3.Connection, start: float, now: float) -> tuple[int, int]:
    """Reads finished this month, plus unread studies already past due (they count as late)."""
    try:
        return read_queue.reads_in_window(conn, start, now)
    except sqlite3.OperationalError:
        return 0, 0


def alerts(cfg, conn: sqlite3.Connection, reasons: list[str], now: float) -> list[Alert]:
    out = [Alert("red", r) for r in reasons]
    out += _sla_alerts(conn, now)
    out += _restart_alerts(conn, now)
    out += _disk_alerts(cfg, conn, now)
    out += _sync_alerts(cfg, conn, now)
    out += _cert_alerts(cfg, now)
    out += _modality_alerts(cfg, conn, now)
    out += _forward_alerts(cfg, conn, now)
    return out


def _forward_alerts(cfg, conn: sqlite3.Connection, now: float) -> list[Alert]:
    """Amber (never red: forwarding never blocks ingest) when a destination has been failing
    for ``forwarding.failing_alert_min``, or refused instances for good."""
    try:
        rows = forward_status.summary(conn, now, cfg["forwarding"]["failing_alert_min"])
    except sqlite3.OperationalError:
        return []
    out = [Alert("amber", f"forwarding to {d['destination']} failing for"
                 f" {(now - d['failing_since']) / 60:.0f} min", d["last_error"][:200])
           for d in rows if d["alert"]]
    out += [Alert("amber", f"{d['failed']} instance(s) refused by {d['destination']}",
                  "appliance forward status") for d in rows if d["failed"]]
    return out


def _sla_alerts(conn: sqlite3.Connection, now: float) -> list[Alert]:
    try:
        rows = read_queue.overdue_by_priority(conn, now)
    except sqlite3.OperationalError:
        return []
    return [Alert("red", f"{r['n']} {r['priority']} read(s) past their SLA",
                  f"oldest due {(now - r['oldest']) / 60:.0f} min ago") for r in rows]


def _restart_alerts(conn: sqlite3.Connection, now: float) -> list[Alert]:
    try:
        starts = health_series.starts_since(conn, now - RESTART_LOOP_WINDOW_S)
    except sqlite3.OperationalError:
        return []
    return [Alert("red", f"{name} is restarting in a loop",
                  f"{n} starts in the last {RESTART_LOOP_WINDOW_S // 60} min")
            for name, n in sorted(starts.items()) if n >= RESTART_LOOP_COUNT]


def _disk_alerts(cfg, conn: sqlite3.Connection, now: float) -> list[Alert]:
    """Disk filling: free space falling fast enough to reach the reserve within a day."""
    points = health_series.series(conn, "free_disk_mb", now - 3 * 3600)
    if len(points) < 10:
        return []
    (t0, f0), (t1, f1) = points[0], points[-1]
    reserve = cfg["dicom"]["low_water_mb"]
    rate = (f0 - f1) / max(t1 - t0, 1)  # MiB per second being used
    if rate <= 0 or f1 <= reserve:
        return []  # not filling, or already reported by readiness
    hours = (f1 - reserve) / rate / 3600
    if hours > DISK_FORECAST_WARN_H:
        return []
    return [Alert("amber", f"disk filling: reserve reached in about {hours:.0f} h",
                  f"{f1:.0f} MiB free, using {rate * 3600:.0f} MiB/h")]


def _sync_alerts(cfg, conn: sqlite3.Connection, now: float) -> list[Alert]:
    if cfg.values.get("sync", {}).get("target", "none") == "none":
        return []
    lag = readiness.sync_lag_s(conn, now)
    limit = cfg.values.get("health", {}).get("sync_lag_limit_min", 120) * 60
    if lag is None or lag < limit / 2:
        return []
    try:
        err = sync_status.oldest_error(conn)
    except sqlite3.OperationalError:
        err = None
    return [Alert("amber" if lag < limit else "red", f"sync stalled for {lag / 60:.0f} min",
                  f"last error: {err}" if err else "no upload completed")]


def _cert_alerts(cfg, now: float) -> list[Alert]:
    path = cfg.tls_dir / "server.crt"
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return [Alert("amber", "TLS certificate unreadable", str(path))]
    days = (cert.not_valid_after_utc.timestamp() - now) / 86400
    if days < 0:
        return [Alert("red", "TLS certificate expired", f"{-days:.0f} days ago")]
    if days < cfg.values.get("health", {}).get("cert_warn_days", CERT_WARN_DAYS):
        return [Alert("amber", f"TLS certificate expires in {days:.0f} days", str(path))]
    return []


def _modality_alerts(cfg, conn: sqlite3.Connection, now: float) -> list[Alert]:
    allowed = set(cfg["dicom"].get("allowed_modalities") or [])
    if not allowed:
        return []
    seen: dict[str, set[str]] = {}
    for r in conn.execute("SELECT DISTINCT modality, study_uid FROM series JOIN"
                          " (SELECT study_uid FROM studies WHERE last_received >= ?) USING"
                          " (study_uid)", (now - 86400,)):
        if r[0] and r[0] not in allowed:
            seen.setdefault(r[0], set()).add(r[1])
    return [Alert("amber", f"{len(uids)} study(ies) of unexpected modality {mod} today",
                  f"allowed: {', '.join(sorted(allowed))}") for mod, uids in sorted(seen.items())]


def _forwarding(cfg, conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    try:
        return forward_status.summary(conn, now, cfg["forwarding"]["failing_alert_min"])
    except sqlite3.OperationalError:
        return []


def handback_figures(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """Each destination's recent hand-back (running, done or interrupted): counts, sizes,
    rate, time left, the manifest's path; nothing when there was none lately."""
    try:
        return [s.as_dict() for s in handback_progress.recent(conn, now)]
    except sqlite3.OperationalError:  # a database not migrated to 23 yet
        return []


def superseded_figures(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Per destination, old copies under a temporary identity still at the PACS: waiting
    for their corrected copy to arrive, or left to the PACS administrator (counts only)."""
    from appliance.patients import superseded

    try:
        found = superseded.summary(conn)
    except sqlite3.OperationalError:  # a database not migrated to 24 yet
        return []
    return [{"destination": d, "waiting": n["waiting"], "manual": n["manual"],
             "removed": n["removed"]} for d, n in sorted(found.items())
            if n["waiting"] or n["manual"]]


def consult_figures(conn: sqlite3.Connection, now: float) -> dict[str, Any] | None:
    """Consult join time p50/p95, drop rate and share of time degraded (last 30 days)."""
    try:
        return consults.call_summary(conn, since=now - CONSULT_WINDOW_S)
    except sqlite3.OperationalError:  # a build without consults
        return None


def collect(cfg, conn: sqlite3.Connection, now: float | None = None) -> dict[str, Any]:
    """Everything the status page and /status.json show."""
    now = now or time.time()
    ready, reasons, checks = readiness.check(cfg, now=now)
    found = alerts(cfg, conn, reasons, now)
    colour = "red" if not ready or any(a.severity == "red" for a in found) else (
        "amber" if found else "green")
    comps = components.read(conn, now)
    starts = health_series.starts_since(conn, now - 86400)
    return {
        "site": cfg["site"]["name"], "status": colour, "ready": ready, "checked_at": now,
        "reasons": reasons, "checks": checks,
        "components": {
            name: {"up": bool(c["up"]), "pid": c["pid"], "heartbeat_age_s": c["heartbeat_age_s"],
                   "starts_24h": starts.get(name, 0)} for name, c in sorted(comps.items())},
        "slos": [s.as_dict() for s in slos(conn, now)],
        "alerts": [asdict(a) for a in found],
        "consults": consult_figures(conn, now),
        "forwarding": _forwarding(cfg, conn, now),
        "handback": handback_figures(conn, now),
        "superseded": superseded_figures(conn),
        "series": {name: health_series.series(conn, name, now - 86400)
                   for name in health_series.SERIES},
    }
