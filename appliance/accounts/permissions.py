"""Who may open what: the one decision "may this user see this study", the role groups,
the routes open to anyone, and the navigation per role.

A view states its roles with ``@auth.require(*roles)``; a view that touches
patient data also says so with ``@permissions.patient_data(...)`` and calls
:func:`check_study` (or filters a listing with :func:`visible`). Every one of
those goes through :func:`decide`, so pools, sites and break-glass grants mean
the same on the worklist, in reports, consults and DICOMweb.
``tests/test_permissions.py`` walks every rule of the app: a route that is
neither public, nor marked as patient data, nor listed in
:data:`NO_PATIENT_DATA` fails, and every marked route is tried by outsiders.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import request

from appliance.accounts import sessions as auth
from appliance.accounts.roles import (  # noqa: F401  (re-exported: callers use permissions.X)
    ADMINS,
    ALL,
    BREAK_GLASS,
    CONSULT_HOSTS,
    DASHBOARD,
    IMAGE_VIEWERS,
    OPERATORS,
    READERS,
    REPORT_VIEWERS,
    SITE_STAFF,
)
from appliance.web import get_db
from workflows.schema import Pool

SITE_TAG = "site:"


# -- the decision --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Study:
    """What the decision needs to know of a study: its site, its reading pool, its reader."""

    uid: str
    institution: str = ""
    pool: Pool | None = None  # the read item's pool; None while the study has no read item
    claimed_by: str | None = None


@dataclass(frozen=True)
class Decision:
    """Allowed or not, and why in words an audit row and an error message can carry."""

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


def user_tags(user: Mapping[str, Any]) -> list[str]:
    tags = user.get("tags") or ""
    items = tags.split(",") if isinstance(tags, str) else tags
    return [t.strip() for t in items if t and t.strip()]


def user_sites(user: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Institutions named by the user's ``site:<name>`` tags (lower case); None: every site."""
    sites = tuple(t[len(SITE_TAG):].strip().lower() for t in user_tags(user)
                  if t.lower().startswith(SITE_TAG) and t[len(SITE_TAG):].strip())
    return sites or None


def decide(user: Mapping[str, Any] | None, study: Study, granted: bool = False) -> Decision:
    """May ``user`` see ``study``? The one rule, for every route, listing and service.

    - a live break-glass grant for the study opens it (typed reason, audited, expires);
    - a ``site:<name>`` tag limits the user to studies whose InstitutionName is a
      named site (no site tag: every site of this appliance);
    - a reader must also be in the study's reading pool (``Pool.admits``: role and
      every pool tag), unless they hold or held its claim; a study without a read
      item yet (still arriving, a prior) is open to the site's readers;
    - admins, responders and site staff are not pooled: their site decides.
    """
    if user is None:
        return Decision(False, "not signed in")
    if granted:
        return Decision(True, "break-glass grant")
    sites = user_sites(user)
    if sites is not None and (study.institution or "").strip().lower() not in sites:
        return Decision(False, "this study belongs to another site than yours")
    role = user.get("role", "")
    if role in READERS:
        if study.pool is None:
            return Decision(True, "site")
        if study.claimed_by and study.claimed_by == user.get("username"):
            return Decision(True, "reader of this study")
        if in_pool(user, study.pool):
            return Decision(True, "pool")
        return Decision(False, f"this study is outside your reading pool: you are not in pool "
                               f"{study.pool.describe()}")
    if role in OPERATORS or role in SITE_STAFF:
        return Decision(True, "site")
    return Decision(False, f"the role {role or '?'} does not see studies")


def in_pool(user: Mapping[str, Any], pool: Pool) -> bool:
    """Whether the pool admits the user (may claim its items): the workflow's own rule (``Pool.admits``), handed the user's role and tags."""
    return pool.admits(str(user.get("role", "")), user_tags(user))


def scope_sql(conn: sqlite3.Connection, user: Mapping[str, Any] | None, now: float,
              column: str) -> tuple[str, list[Any]] | None:
    """:func:`decide` as one SQL condition on a study UID ``column``, for searches that page
    in SQL (QIDO); None when the user sees every study.

    Same rule: site tags, then (readers) the pools that do not admit them, except
    studies whose claim they hold; a break-glass grant opens its study whatever else.
    """
    if user is None:
        return "0", []
    role, parts, params = user.get("role", ""), [], []
    if role not in READERS and role not in OPERATORS and role not in SITE_STAFF:
        parts.append("0")
    sites = user_sites(user)
    if sites is not None:
        parts.append(f"{column} IN (SELECT study_uid FROM studies WHERE"
                     f" lower(trim(coalesce(institution_name, ''))) IN"
                     f" ({', '.join('?' for _ in sites)}))")
        params += list(sites)
    if role in READERS:
        closed = [(r["pool_roles"], r["pool_tags"]) for r in conn.execute(
            "SELECT DISTINCT pool, pool_roles, pool_tags FROM read_items")
            if not in_pool(user, Pool(r["pool"], _split(r["pool_roles"]),
                                       _split(r["pool_tags"])))]
        if closed:
            pairs = " OR ".join("(pool_roles = ? AND pool_tags = ?)" for _ in closed)
            parts.append(f"{column} NOT IN (SELECT study_uid FROM read_items WHERE ({pairs})"
                         " AND coalesce(claimed_by, '') != ?)")
            params += [v for pair in closed for v in pair] + [user.get("username", "")]
    if not parts:
        return None
    granted = sorted(grants(conn, user, now))
    clause = " AND ".join(parts)
    if granted:
        clause = f"(({clause}) OR {column} IN ({', '.join('?' for _ in granted)}))"
        params += granted
    return clause, params


# -- facts from the database -------------------------------------------------------------------
_FACTS_SQL = (
    "SELECT s.study_uid AS uid, s.institution_name, r.pool, r.pool_roles, r.pool_tags,"
    " r.claimed_by FROM studies s LEFT JOIN read_items r ON r.study_uid = s.study_uid"
    " WHERE s.study_uid IN ({marks})"
)


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(t for t in (text or "").split(",") if t)


def _study(row: sqlite3.Row) -> Study:
    pool = None
    if row["pool"] is not None:
        pool = Pool(row["pool"], _split(row["pool_roles"]), _split(row["pool_tags"]))
    return Study(row["uid"], row["institution_name"] or "", pool, row["claimed_by"])


def studies(conn: sqlite3.Connection, uids: Iterable[str]) -> dict[str, Study]:
    """The decision's facts for each known study among ``uids`` (unknown ones are left out).

    Reads the study index and the read item's pool columns: those are the
    facts of "who may see", read here and nowhere else.
    """
    wanted = list(dict.fromkeys(u for u in uids if u))
    out: dict[str, Study] = {}
    for i in range(0, len(wanted), 500):
        chunk = wanted[i:i + 500]
        sql = _FACTS_SQL.format(marks=", ".join("?" for _ in chunk))
        out.update((r["uid"], _study(r)) for r in conn.execute(sql, chunk))
    return out


def grants(conn: sqlite3.Connection, user: Mapping[str, Any] | None, now: float) -> set[str]:
    """Studies the user holds a live break-glass grant for."""
    if not user or user.get("id") is None:
        return set()
    return {r[0] for r in conn.execute(
        "SELECT DISTINCT study_uid FROM break_glass WHERE user_id = ? AND expires_at > ?",
        (user["id"], now))}


def visible(conn: sqlite3.Connection, user: Mapping[str, Any] | None, uids: Iterable[str],
            now: float) -> set[str]:
    """The studies among ``uids`` the user may see: one query for a whole listing."""
    facts, granted = studies(conn, uids), grants(conn, user, now)
    return {uid for uid, st in facts.items() if decide(user, st, uid in granted)}


# -- in a request --------------------------------------------------------------------------------
class Refused(Exception):
    """The caller may not see the study (403), or there is no such study (404)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def break_glass_hint(study_uid: str) -> str:
    return (f" (if you must, open it through break-glass with a reason: "
            f"/break-glass?study={study_uid})")


def check_study(study_uid: str, action: str) -> Study:
    """The study's facts if the caller may see it; else audit the denial and raise Refused.

    ``action`` names what was tried (``report.addendum``, ``consult.create``…): the
    denial is audited under it with outcome ``denied``.
    """
    facts = studies(get_db(), [study_uid]).get(study_uid)
    if facts is None:
        raise Refused(404, f"no study {study_uid}")
    user = auth.current_user()
    decision = decide(user, facts, auth.has_break_glass(study_uid))
    if not decision:
        deny(action, study_uid, decision.reason)
        raise Refused(403, decision.reason + break_glass_hint(study_uid))
    return facts


def may_see(study_uid: str) -> bool | None:
    """Whether the caller may see the study, without auditing; None for an unknown study."""
    facts = studies(get_db(), [study_uid]).get(study_uid)
    if facts is None:
        return None
    return bool(decide(auth.current_user(), facts, auth.has_break_glass(study_uid)))


def caller_scope_sql(column: str) -> tuple[str, list[Any]] | None:
    """:func:`scope_sql` for the signed-in caller of this request."""
    return scope_sql(get_db(), auth.current_user(), auth.now(), column)


def visible_to_caller(uids: Iterable[str]) -> set[str]:
    """:func:`visible` for the signed-in caller of this request."""
    return visible(get_db(), auth.current_user(), uids, auth.now())


def deny(action: str, study_uid: str, reason: str) -> None:
    """Audit a refused access to patient data (who, what, from where, why)."""
    auth.audit_event(action, study_uid, outcome="denied",
                     detail={"reason": reason, "path": request.path, "method": request.method})


def patient_data(kind: str) -> Callable:
    """Mark a view as touching patient data; ``kind`` says what its URL names.

    ``study``, ``item``, ``report``, ``finding`` or ``consult`` (one object: the view calls
    :func:`check_study`), or ``list`` (a listing filtered by :func:`visible`). The
    permission test finds the marked views in the URL map and tries each as outsiders.
    """
    if kind not in PATIENT_DATA_KINDS:
        raise ValueError(f"unknown patient data kind {kind!r}")

    def mark(view: Callable) -> Callable:
        view.patient_data = kind  # type: ignore[attr-defined]
        return view

    return mark


# "patient": a registration of the desk (the view checks the desk's roles; it names no study).
PATIENT_DATA_KINDS = ("study", "item", "report", "finding", "consult", "list", "patient")

# Routes behind a sign-in that carry no patient data, with the reason. A new route must be
# marked @patient_data or listed here, or tests/test_permissions.py fails.
NO_PATIENT_DATA: dict[str, str] = {
    "ui.dashboard": "turnaround figures per reader, no patient",
    "ui.dashboard_json": "turnaround figures per reader, no patient",
    "api.turnaround": "turnaround figures, no patient",
    "api.inbox": "notifications carry site, priority, modality and a link only",
    "api.mark_read": "marks the caller's own notifications",
    "notify.ack_page": "the caller's own message: site, priority, modality, a link only",
    "notify.ack": "acknowledges the caller's own message",
    "notify.contacts_page": "the caller's own email and phone, no patient",
    "notify.set_contacts": "sets the caller's own email and phone",
    "notify.verify_contact": "verifies the caller's own contact point",
    "reports.critical_open": "ids of open findings for the page's badge, no patient",
    "consults.summary": "call quality figures, no patient",
    "consults.join_link": "an invite token is the guest's right to the lobby; no study shown",
    "viewer.viewer_index": "the OHIF page; its head start for a study only if permissions.may_see",
    "viewer.viewer_config": "the viewer's configuration script",
    "viewer.viewer_file": "the viewer's static build",
    "admin.users": "accounts, no patient",
    "admin.set_disabled": "accounts, no patient",
    "admin.unlock": "accounts (lifts a sign-in lockout), no patient",
    "admin.audit_trail": "the admins' oversight of every access: the whole trail, by design",
    "admin.break_glass_list": "the admins' oversight of every grant: all of them, by design",
    "auth_views.home": "a redirect to the caller's area",
    "auth_views.change_password": "the caller's own password",
    "auth_views.break_glass": "asks for and records a grant (a typed reason); names no patient",
    "auth_views.login": "sign-in",
    "auth_views.login_form": "sign-in",
    "auth_views.logout": "sign-out",
    "auth_views.totp": "the second factor of sign-in",
    "status_page.status_html": "health figures; no patient identity leaves in them",
    "status_page.status_json": "health figures; no patient identity leaves in them",
    "status_page.prometheus_metrics": "counters and histograms, no patient",
    "patients.register": "registers what the caller typed and answers only that new record",
    "patients.trauma": "issues a new temporary identity; answers only that new record",
}

# Endpoints anyone may call without signing in, with the reason. Views of our
# own are marked with @auth.public instead; these belong to Flask or to
# blueprints that monitoring must reach without an account.
PUBLIC_ENDPOINTS: dict[str, str] = {
    "static": "CSS and JS of the login page",
    "health.livez": "process liveness for the supervisor and systemd",
    "health.readyz": "readiness for the supervisor, load balancers and responders",
}

# Navigation links: (href, label, roles that see it). A link is shown only if
# the app has a route for it (areas are optional modules).
NAV: list[tuple[str, str, tuple[str, ...]]] = [
    ("/worklist", "Worklist", READERS),
    ("/critical", "Critical findings", ("site_staff", "responder", "admin")),
    ("/patients", "Registration", ("site_staff", "responder", "admin")),
    ("/reports", "Reports", ("site_staff",)),
    ("/consults", "Consults", CONSULT_HOSTS),
    ("/dashboard", "Turnaround", DASHBOARD),
    ("/status", "Status", OPERATORS),
    ("/admin/users", "Users", ADMINS),
    ("/admin/audit", "Audit trail", ADMINS),
    ("/admin/break-glass", "Break-glass", ADMINS),
    ("/notify/contacts", "My contact points", ALL),
]
