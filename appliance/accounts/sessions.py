"""Who is calling, and may they: sessions, API tokens, roles, CSRF, idle logoff, audit.

Every view is wrapped in :func:`require` (or listed as public in
``appliance.permissions``); a test walks ``app.url_map`` and fails for a
route that is neither.

Two ways in:

* a browser session: the signed Flask cookie holds only a random session id
  (``sid``) and the CSRF token; the session itself is a row in ``sessions``,
  so logout, idle logoff and disabling a user take effect at once. A reader
  whose role needs TOTP has a session that is not *complete* until the code
  is entered; until then it opens nothing.
* ``Authorization: Bearer fat_…`` (``appliance token create``) for scripts and
  DICOMweb clients. Such requests carry no cookie, so they need no CSRF token.

Background requests (the worklist's refresh) send ``X-Background: 1`` and do
not count as activity, otherwise a page left open would never be logged off.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flask import (
    Flask,
    current_app,
    g,
    has_app_context,
    has_request_context,
    jsonify,
    redirect,
    render_template,
    request,
    session,
)
from flask.typing import ResponseReturnValue
from werkzeug.wrappers import Response

from appliance.accounts import tokens
from appliance.accounts import users as accounts
from appliance.accounts.roles import READERS as READER_ROLES
from appliance.core import audit
from appliance.web import get_db

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
TOUCH_EVERY_S = 30  # last_seen is written at most this often per session
SECRET_KEY_FILE = "web-session.key"
ANY_ROLE = ("*",)  # what require() with no roles records on the view


# -- clock ----------------------------------------------------------------------------
def now() -> float:
    """The time; tests put a fake clock in ``app.config["CLOCK"]`` to age sessions."""
    if has_app_context():
        clock = current_app.config.get("CLOCK")
        if clock is not None:
            return float(clock())
    return time.time()


def auth_cfg() -> dict[str, Any]:
    return current_app.config["SITE"]["auth"]


# -- request facts -----------------------------------------------------------------------
def client_address() -> str:
    """The caller's address, as gunicorn saw it (no proxy is trusted)."""
    if not has_request_context():
        return ""
    return request.remote_addr or ""


def wants_json() -> bool:
    """API and DICOMweb paths, and anything that did not ask for HTML, get JSON errors."""
    if request.path.startswith(("/api/", "/dicom-web/")):
        return True
    return "text/html" not in request.headers.get("Accept", "")


def is_background() -> bool:
    return request.headers.get("X-Background") == "1"


def hash_sid(sid: str) -> str:
    return hashlib.sha256(sid.encode("utf-8")).hexdigest()


# -- users ----------------------------------------------------------------------------------
def _public_user(row: sqlite3.Row | dict) -> dict[str, Any]:
    return {"id": row["id"], "username": row["username"], "role": row["role"],
            "tags": row["tags"], "display_name": row["display_name"]}


def needs_totp(user: sqlite3.Row | dict) -> bool:
    """An enrolled user always confirms; readers must when the site says so."""
    if user["totp_secret"]:
        return True
    return bool(auth_cfg()["totp_required_for_readers"]) and user["role"] in READER_ROLES


# -- sessions --------------------------------------------------------------------------------
def start_session(user: sqlite3.Row | dict, complete: bool) -> str:
    """Create a server-side session for ``user`` and put its id in a fresh cookie.

    The old cookie contents are dropped (no session fixation) and a new CSRF
    token is issued.
    """
    sid = secrets.token_urlsafe(32)
    t = now()
    get_db().execute(
        "INSERT INTO sessions (id, user_id, created_at, last_seen, address, user_agent,"
        " second_factor) VALUES (?,?,?,?,?,?,?)",
        (hash_sid(sid), user["id"], t, t, client_address(),
         request.headers.get("User-Agent", "")[:200], int(complete)),
    )
    session.clear()
    session["sid"] = sid
    session["csrf"] = secrets.token_urlsafe(32)
    g.pop("auth", None)
    return sid


def end_session(reason: str) -> bool:
    """End the caller's session (logout, idle, expiry) and clear the cookie.

    True when this call ended it (two concurrent requests cannot both end it).
    """
    sid, ended = session.get("sid"), False
    if sid:
        ended = get_db().execute(
            "UPDATE sessions SET ended_at = ?, end_reason = ? WHERE id = ? AND ended_at IS NULL",
            (now(), reason, hash_sid(sid)),
        ).rowcount == 1
    session.clear()
    g.pop("auth", None)
    return ended


def end_user_sessions(conn: sqlite3.Connection, user_id: int, reason: str,
                      at: float | None = None) -> int:
    """End every open session of a user (disabled, password reset)."""
    return accounts.end_sessions(conn, user_id, reason, at)


def pending_session() -> sqlite3.Row | None:
    """The caller's open session row joined with its user, complete or not."""
    sid = session.get("sid")
    if not sid:
        return None
    return get_db().execute(
        "SELECT s.id AS sid_hash, s.created_at, s.last_seen, s.second_factor, s.totp_pending,"
        " u.* FROM sessions s JOIN users u ON u.id = s.user_id"
        " WHERE s.id = ? AND s.ended_at IS NULL",
        (hash_sid(sid),),
    ).fetchone()


def mark_second_factor() -> None:
    sid = session.get("sid")
    if sid:
        get_db().execute(
            "UPDATE sessions SET second_factor = 1, totp_pending = NULL, last_seen = ? WHERE id = ?",
            (now(), hash_sid(sid)),
        )
    g.pop("auth", None)


class _Auth:
    """What :func:`_authenticate` found: a user, how, or why not."""

    def __init__(self, user: dict[str, Any] | None = None, via: str = "", why: str = "",
                 must_change: bool = False, token_id: int | None = None):
        self.user, self.via, self.why = user, via, why
        self.must_change, self.token_id = must_change, token_id


def _from_token(header: str) -> _Auth:
    token = header[7:].strip()
    row = tokens.verify(get_db(), token, now=now())
    if row is None:
        return _Auth(why="invalid or expired token")
    return _Auth(_public_user(row), via="token", token_id=row["token_id"])


def _from_session() -> _Auth:
    row = pending_session()
    if row is None:
        return _Auth(why="not signed in" if not session.get("sid") else "session ended")
    cfg, t = auth_cfg(), now()
    if row["disabled"]:
        end_session("disabled")
        return _Auth(why="account disabled")
    # last_seen is written at most every TOUCH_EVERY_S, so it may be that much older than
    # the last action: wait that much longer, so nobody is signed out before their time.
    if t - row["last_seen"] > cfg["idle_timeout_min"] * 60 + TOUCH_EVERY_S:
        _log_off(row, "idle")
        return _Auth(why="signed out after inactivity")
    if t - row["created_at"] > cfg["session_max_hours"] * 3600:
        _log_off(row, "expired")
        return _Auth(why="session expired")
    if not row["second_factor"]:
        return _Auth(why="second factor required")
    if not is_background() and t - row["last_seen"] >= TOUCH_EVERY_S:
        get_db().execute("UPDATE sessions SET last_seen = ? WHERE id = ?", (t, row["sid_hash"]))
    return _Auth(_public_user(row), via="session", must_change=bool(row["must_change_password"]))


def _log_off(row: sqlite3.Row, reason: str) -> None:
    """End a session the appliance closed itself, audited once."""
    if end_session(reason):
        audit.record(get_db(), row["username"], "auth.logout", row["username"],
                     source=client_address(), detail={"reason": reason}, ts=now())


def _authenticate() -> _Auth:
    """Authenticate the request once; the answer is kept on ``g``."""
    if "auth" not in g:
        header = request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            g.auth = _from_token(header)
        elif header:
            g.auth = _Auth(why="unsupported Authorization scheme (use Bearer)")
        else:
            g.auth = _from_session()
    return g.auth


def current_user() -> dict[str, Any] | None:
    """``dict(id, username, role, tags, display_name)`` of the caller, or None."""
    if not has_request_context():
        return None
    return _authenticate().user


def via_token() -> bool:
    return has_request_context() and _authenticate().via == "token"


# -- responses -----------------------------------------------------------------------------
def _error(status: int, message: str, template: str) -> ResponseReturnValue:
    if wants_json():
        resp = jsonify(error=message)
        resp.status_code = status
        if status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="appliance"'
        return resp
    return render_template(template, message=message), status


def _unauthenticated(auth: _Auth) -> ResponseReturnValue:
    if wants_json():
        return _error(401, auth.why or "authentication required", "error.html")
    target = request.full_path if request.query_string else request.path
    if auth.why == "second factor required":
        return redirect("/login/totp?next=" + quote(target, safe=""))
    notice = "&idle=1" if auth.why == "signed out after inactivity" else ""
    return redirect("/login?next=" + quote(target, safe="") + notice)


def _forbidden(user: dict[str, Any], roles: tuple[str, ...]) -> ResponseReturnValue:
    audit_event("access.denied", request.path, outcome="denied",
                detail={"method": request.method, "needs": list(roles)})
    return _error(403, f"forbidden: this needs the role {' or '.join(roles)}", "error.html")


def require(*roles: str) -> Callable:
    """Decorate a view: signed in (session or Bearer token) and, if given, one of ``roles``.

    No credentials → 401 (JSON, or a redirect to /login for an HTML page);
    a role not listed → 403. The roles are recorded on the view as
    ``auth_roles`` for the permission table test.
    """
    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any):
            auth = _authenticate()
            if auth.user is None:
                return _unauthenticated(auth)
            if roles and auth.user["role"] not in roles:
                return _forbidden(auth.user, roles)
            if (auth.must_change and not wants_json() and request.method == "GET"
                    and request.path != "/account/password"):
                return redirect("/account/password?next=" + quote(request.path, safe=""))
            return view(*args, **kwargs)

        wrapped.auth_roles = tuple(roles) if roles else ANY_ROLE  # type: ignore[attr-defined]
        return wrapped

    return decorate


def public(view: Callable) -> Callable:
    """Mark a view as open to anyone (login page, health); the permission test accepts it."""
    view.auth_public = True  # type: ignore[attr-defined]
    return view


# -- audit ------------------------------------------------------------------------------------
def audit_event(action: str, obj: str = "", outcome: str = "ok",
                detail: dict[str, Any] | None = None) -> int:
    """Record an audit row for the current caller (who, what, from where).

    Every access to patient data goes through here: a study view, an image
    retrieval, a report action, an export, a break-glass.
    """
    user = current_user() if has_request_context() else None
    extra = dict(detail or {})
    if has_request_context() and _authenticate().via == "token":
        extra.setdefault("token_id", _authenticate().token_id)
    return audit.record(get_db(), user["username"] if user else "anonymous", action, obj,
                        source=client_address(), outcome=outcome, detail=extra, ts=now())


# -- CSRF ---------------------------------------------------------------------------------------
def csrf_token() -> str:
    """The session's CSRF token (created on first use); forms and JS send it back."""
    token = session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def csrf_ok() -> bool:
    sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token") or ""
    expected = session.get("csrf") or ""
    return bool(expected) and hmac.compare_digest(sent.encode(), expected.encode())


def _csrf_guard() -> ResponseReturnValue | None:
    """Refuse a state-changing browser request without the session's CSRF token.

    Bearer requests carry no cookie, so a forged cross-site request cannot
    ride them. A request with no cookie at all falls through to require()
    (401); the login form checks its token itself.
    """
    if request.method not in UNSAFE_METHODS:
        return None
    if request.headers.get("Authorization", "")[:7].lower() == "bearer ":
        return None
    if not session.get("sid") and not session.get("csrf"):
        return None
    if csrf_ok():
        return None
    return _error(400, "missing or invalid CSRF token (reload the page and try again)",
                  "error.html")


# -- break-glass -------------------------------------------------------------------------------
class BreakGlassError(Exception):
    pass


def break_glass(study_uid: str, reason: str) -> int:
    """Open a study outside the caller's pool or site: allowed, with a typed reason, audited.

    Returns the grant id; the grant lasts ``auth.break_glass_hours``. Admins
    see every grant on /admin/break-glass.
    """
    user = current_user()
    if user is None:
        raise BreakGlassError("sign in first")
    reason = " ".join((reason or "").split())
    if len(reason) < 10:
        raise BreakGlassError("type a reason of at least 10 characters")
    if not study_uid or len(study_uid) > 64:
        raise BreakGlassError("no study given")
    t = now()
    from appliance.core.db import transaction

    with transaction(get_db()) as conn:
        cur = conn.execute(
            "INSERT INTO break_glass (ts, user_id, study_uid, reason, address, expires_at)"
            " VALUES (?,?,?,?,?,?)",
            (t, user["id"], study_uid, reason[:500], client_address(),
             t + auth_cfg()["break_glass_hours"] * 3600),
        )
        audit_event("study.break_glass", study_uid, detail={"reason": reason[:500]})
    return cur.lastrowid


def has_break_glass(study_uid: str) -> bool:
    """Whether the caller holds a live break-glass grant for this study."""
    user = current_user()
    if user is None:
        return False
    return get_db().execute(
        "SELECT 1 FROM break_glass WHERE user_id = ? AND study_uid = ? AND expires_at > ? LIMIT 1",
        (user["id"], study_uid, now()),
    ).fetchone() is not None


# -- app wiring --------------------------------------------------------------------------------
def load_secret_key(keys_dir: Path) -> bytes:
    """Flask's signing key, generated once into ``keys/`` (0600); never in git or config."""
    return accounts.key_file(keys_dir, SECRET_KEY_FILE)


STRICT_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
              "connect-src 'self'; form-action 'self'; frame-ancestors 'self'; base-uri 'none'")


def strict_csp(resp: Response) -> Response:
    """Content-Security-Policy for pages with no inline script or style (sign-in, worklist,
    admin): an injected ``<script>`` would not run. Blueprints opt in with
    ``bp.after_request(auth.strict_csp)``."""
    if resp.mimetype == "text/html":
        resp.headers.setdefault("Content-Security-Policy", STRICT_CSP)
    return resp


def nav_links(user: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The navigation a role sees (links to areas it may open)."""
    from appliance.accounts import permissions

    if user is None:
        return []
    paths = current_app.extensions.get("nav_paths")
    if paths is None:
        paths = {rule.rule for rule in current_app.url_map.iter_rules()}
        current_app.extensions["nav_paths"] = paths
    return [(href, label) for href, label, roles in permissions.NAV
            if user["role"] in roles and href in paths]


def init_app(app: Flask) -> None:
    """Secret key, CSRF guard and template globals; called once when auth_views registers."""
    if not app.config.get("SECRET_KEY"):
        app.secret_key = load_secret_key(app.config["SITE"].keys_dir)
    app.before_request(_csrf_guard)

    @app.context_processor
    def _template_globals() -> dict[str, Any]:
        user = current_user()
        return {"current_user": user, "csrf_token": csrf_token, "nav": nav_links(user),
                "site_name": current_app.config["SITE"]["site"]["name"]}

    @app.after_request
    def _no_store(resp):
        # Pages and API answers with patient data must not linger in shared browser
        # caches; static assets (the viewer's 50 MB) stay cacheable.
        if resp.mimetype in ("text/html", "application/json", "text/event-stream"):
            resp.headers.setdefault("Cache-Control", "no-store")
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "SAMEORIGIN")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        return resp
