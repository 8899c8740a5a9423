"""Signing in and out: password (argon2id), TOTP second factor, password change, break-glass.

Rate limits and lockout are computed from ``login_attempts``: failures for
an unknown username count exactly like failures for a real one, and the
password of an unknown user is still checked against a dummy hash, so neither
the answers nor their timing tell an attacker which accounts exist. Guessing
at a name locks out only the guesser's address (see ``accounts.users``), and
an admin lifts a lockout with ``appliance user unlock`` or on /admin/users.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pyotp
import segno
from flask import Blueprint, current_app, redirect, render_template, request, session
from flask.typing import ResponseReturnValue
from werkzeug.urls import iri_to_uri
from werkzeug.wrappers import Response

from appliance.accounts import permissions
from appliance.accounts import sessions as auth
from appliance.accounts import users as accounts
from appliance.core import audit
from appliance.web import get_db

bp = Blueprint("auth_views", __name__)
bp.record_once(lambda state: auth.init_app(state.app))
bp.after_request(auth.strict_csp)

_DUMMY_HASH: list[str] = []  # computed once: equal work for unknown users


def safe_next(target: str | None, default: str = "/") -> str:
    """``target`` if it can only be a path on this site, else ``default``: no open redirect.

    Checking the text as received is not enough: Werkzeug drops tabs and newlines when it
    writes the Location header (``/%09/evil`` → ``//evil``), browsers read ``\\`` as ``/``
    and strip whitespace. So only plain printable ASCII is accepted (our own links are
    percent-encoded), and the path must still start with a single ``/`` after Werkzeug's
    normalisation and after percent-decoding, with no scheme, host or dot segments.
    """
    if not target or not all(0x21 <= ord(c) <= 0x7E and c != "\\" for c in target):
        return default
    written = iri_to_uri(target)
    if written != target:
        return default
    for form in (written, unquote(written)):
        if not _same_origin_path(form):
            return default
    return written


def _same_origin_path(path: str) -> bool:
    """One absolute path: no scheme, no host, no ``//`` start, no backslash or control
    character, no ``.``/``..`` segment (a browser would fold ``/.//x`` into ``//x``)."""
    parts = urlsplit(path)
    if parts.scheme or parts.netloc or not path.startswith("/") or path.startswith("//"):
        return False
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c == "\\" for c in path):
        return False
    return not any(seg in (".", "..") for seg in parts.path.split("/"))


def unknown_key(username: str) -> str:
    """How a name that is no account is recorded: people type their password into the
    user name field, so it is kept only as a short hash (still enough to lock it out)."""
    return "unknown:" + hashlib.sha256(username.lower().encode("utf-8")).hexdigest()[:12]


def _dummy_hash() -> str:
    if not _DUMMY_HASH:
        _DUMMY_HASH.append(accounts.hash_password("not-a-real-password-0000"))
    return _DUMMY_HASH[0]


# -- attempts, rate limits, lockout ----------------------------------------------------------
def _record_attempt(username: str, ok: bool, reason: str) -> None:
    get_db().execute(
        "INSERT INTO login_attempts (ts, username, address, ok, reason) VALUES (?,?,?,?,?)",
        (auth.now(), username, auth.client_address(), int(ok), reason),
    )


def _refusal(username: str) -> tuple[int, str] | None:
    """(status, message) when this attempt must be refused before the password is checked.

    In this order: the address's own limit (its refused attempts count too, so a hammering
    address stays refused), the account's budget (only attempts actually checked count,
    so a refused address spends none of it), then the lockout of this account for this
    address.
    """
    cfg, t, conn, address = auth.auth_cfg(), auth.now(), get_db(), auth.client_address()
    window = t - cfg["attempt_window_min"] * 60
    by_address = conn.execute(
        "SELECT count(*) FROM login_attempts WHERE address = ? AND ts > ? AND ok = 0",
        (address, window),
    ).fetchone()[0]
    if by_address >= cfg["attempts_per_address"]:
        return 429, "too many failed sign-ins from this address; wait a few minutes"
    if (accounts.checked_attempts(conn, username, window) >= cfg["attempts_per_account"]
            and not accounts.known_address(conn, username, address)):
        return 429, "too many sign-in attempts for this account; wait a few minutes"
    if _locked_here(conn, username, t):
        return 423, (f"this account is locked after repeated failures; try again in "
                     f"{cfg['lockout_min']:g} minutes or ask an administrator")
    return None


def _locked_here(conn: sqlite3.Connection, username: str, t: float) -> bool:
    """Whether this account is locked for the caller's address."""
    cfg = auth.auth_cfg()
    return accounts.failures_in_a_row(conn, username, auth.client_address(),
                                      t - cfg["lockout_min"] * 60) >= cfg["lockout_after_failures"]


def _fail(username: str, reason: str, action: str = "auth.login") -> None:
    _record_attempt(username, False, reason)
    audit.record(get_db(), username, action, username, source=auth.client_address(),
                 outcome="fail", detail={"reason": reason}, ts=auth.now())


# -- login --------------------------------------------------------------------------------------
def _login_page(error: str = "", status: int = 200, username: str = "", notice: str = "") -> ResponseReturnValue:
    nxt = safe_next(request.values.get("next"))
    return render_template("accounts/login.html", error=error, username=username, next=nxt,
                           notice=notice), status


@bp.get("/login")
@auth.public
def login_form() -> ResponseReturnValue:
    if auth.current_user() is not None:
        return redirect(safe_next(request.args.get("next")))
    notice = "You were signed out after a period of inactivity." if request.args.get("idle") else ""
    return _login_page(notice=notice)


@bp.post("/login")
@auth.public
def login() -> ResponseReturnValue:
    username = (request.form.get("username") or "").strip()[:64]
    password = request.form.get("password") or ""
    if not auth.csrf_ok():
        return _login_page("your sign-in form expired; please try again", 400, username)
    if not username or not password:
        return _login_page("enter your user name and password", 400, username)
    user = get_db().execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
    key = username if user else unknown_key(username)
    refused = _refusal(key)
    if refused:
        _record_attempt(key, False, "locked" if refused[0] == 423 else "rate")
        audit.record(get_db(), key, "auth.login", key, source=auth.client_address(),
                     outcome="refused", detail={"reason": refused[1]}, ts=auth.now())
        return _login_page(refused[1], refused[0], username)
    ok = accounts.check_password(user["password_hash"] if user else _dummy_hash(), password)
    if not ok or user is None or user["disabled"]:
        _fail(key, "password" if (user is None or not ok) else "disabled")
        return _login_page("wrong user name or password", 401, username)
    if accounts.needs_rehash(user["password_hash"]):
        get_db().execute("UPDATE users SET password_hash = ? WHERE id = ?",
                         (accounts.hash_password(password), user["id"]))
    complete = not auth.needs_totp(user)
    auth.start_session(user, complete)
    if complete:
        _succeed(user, "password")
        return redirect(safe_next(request.form.get("next")))
    return redirect("/login/totp?next=" + _quoted_next())


def _succeed(user: sqlite3.Row, factors: str) -> None:
    _record_attempt(user["username"], True, "ok")
    get_db().execute("UPDATE users SET last_login_at = ? WHERE id = ?", (auth.now(), user["id"]))
    audit.record(get_db(), user["username"], "auth.login", user["username"],
                 source=auth.client_address(), detail={"factors": factors}, ts=auth.now())


def _quoted_next() -> str:
    return quote(safe_next(request.values.get("next")), safe="")


# -- TOTP -------------------------------------------------------------------------------------------
def _totp_page(row: sqlite3.Row, secret: str | None, error: str = "", status: int = 200) -> ResponseReturnValue:
    enrol = not row["totp_secret"]
    # The site's name as issuer: a reader of several appliances tells their codes apart.
    issuer = current_app.config["SITE"]["site"]["name"] or "Field appliance"
    uri = pyotp.TOTP(secret).provisioning_uri(name=row["username"], issuer_name=issuer) if enrol else ""
    qr = segno.make(uri, error="m").svg_data_uri(scale=5) if enrol else ""
    return render_template("accounts/totp.html", enrol=enrol, secret=secret if enrol else "", uri=uri,
                           qr=qr, error=error, next=safe_next(request.values.get("next")),
                           action="/login/totp"), status


def _keys_dir() -> Path:
    return current_app.config["SITE"].keys_dir


def _pending_secret(row: sqlite3.Row) -> str:
    """The key being enrolled, kept (sealed) on the session row until a code proves it works."""
    if row["totp_pending"]:
        return accounts.open_totp(_keys_dir(), row["totp_pending"], row["id"])
    secret = pyotp.random_base32()
    get_db().execute("UPDATE sessions SET totp_pending = ? WHERE id = ?",
                     (accounts.seal_totp(_keys_dir(), secret, row["id"]), row["sid_hash"]))
    return secret


def _user_secret(row: sqlite3.Row) -> str:
    """The enrolled key, or the one being enrolled."""
    if row["totp_secret"]:
        return accounts.open_totp(_keys_dir(), row["totp_secret"], row["id"])
    return _pending_secret(row)


def matching_step(secret: str, code: str, t: float) -> int | None:
    """The 30 s time step the code belongs to (now, or one step either side), or None."""
    code = "".join(code.split())
    if len(code) != 6 or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret)
    for offset in (0, -1, 1):
        when = t + offset * totp.interval
        if pyotp.utils.strings_equal(totp.at(when), code):
            return int(when // totp.interval)
    return None


@bp.route("/login/totp", methods=["GET", "POST"])
@auth.public
def totp() -> ResponseReturnValue:
    row = auth.pending_session()
    if row is None:
        return redirect("/login")
    if row["second_factor"]:
        return redirect(safe_next(request.values.get("next")))
    secret = _user_secret(row)
    if request.method == "GET":
        return _totp_page(row, secret)
    if not auth.csrf_ok():
        return _totp_page(row, secret, "the form expired; try again", 400)
    if _locked_here(get_db(), row["username"], auth.now()):
        auth.end_session("locked")
        return _login_page("this account is locked after repeated failures", 423, row["username"])
    step = matching_step(secret, request.form.get("code") or "", auth.now())
    if step is None or (row["totp_last_step"] is not None and step <= row["totp_last_step"]):
        _fail(row["username"], "totp", "auth.login.totp")
        return _totp_page(row, secret, "that code is wrong or was already used", 401)
    conn = get_db()
    if not row["totp_secret"]:
        conn.execute("UPDATE users SET totp_secret = ? WHERE id = ?",
                     (accounts.seal_totp(_keys_dir(), secret, row["id"]), row["id"]))
        audit.record(conn, row["username"], "auth.totp.enrol", row["username"],
                     source=auth.client_address(), ts=auth.now())
    conn.execute("UPDATE users SET totp_last_step = ? WHERE id = ?", (step, row["id"]))
    auth.mark_second_factor()
    _succeed(row, "password+totp")
    return redirect(safe_next(request.form.get("next")))


# -- logout ------------------------------------------------------------------------------------------
@bp.post("/logout")
@auth.public
def logout() -> ResponseReturnValue:
    row = auth.pending_session()
    if row is not None:
        audit.record(get_db(), row["username"], "auth.logout", row["username"],
                     source=auth.client_address(), detail={"reason": "user"}, ts=auth.now())
    auth.end_session("logout")
    return redirect("/login")


# -- home, password ------------------------------------------------------------------------------------
@bp.get("/")
@auth.require()
def home() -> ResponseReturnValue:
    """Each role lands on its first area."""
    links = auth.nav_links(auth.current_user())
    return redirect(links[0][0] if links else "/account/password")


@bp.route("/account/password", methods=["GET", "POST"])
@auth.require()
def change_password() -> ResponseReturnValue:
    user = auth.current_user()
    row = get_db().execute("SELECT * FROM users WHERE id = ?", (user["id"],)).fetchone()
    page = {"must_change": bool(row["must_change_password"]),
            "next": safe_next(request.values.get("next"))}
    if request.method == "GET":
        return render_template("accounts/password.html", **page)
    error = _password_problem(row, request.form)
    if error:
        return render_template("accounts/password.html", error=error, **page), 400
    conn, t = get_db(), auth.now()
    conn.execute("UPDATE users SET password_hash = ?, must_change_password = 0,"
                 " password_changed_at = ? WHERE id = ?",
                 (accounts.hash_password(request.form["new"]), t, row["id"]))
    current = session.get("sid")
    conn.execute("UPDATE sessions SET ended_at = ?, end_reason = 'password changed'"
                 " WHERE user_id = ? AND ended_at IS NULL AND id != ?",
                 (t, row["id"], auth.hash_sid(current or "")))
    auth.audit_event("account.password.change", row["username"])
    return redirect(page["next"])


def _password_problem(row: sqlite3.Row, form: Any) -> str:
    if not accounts.check_password(row["password_hash"], form.get("current") or ""):
        return "the current password is wrong"
    new = form.get("new") or ""
    if len(new) < 10:
        return "the new password must be at least 10 characters"
    if new != form.get("again"):
        return "the two new passwords differ"
    if new == form.get("current"):
        return "choose a password different from the current one"
    return ""


# -- break-glass ---------------------------------------------------------------------------------------
@bp.route("/break-glass", methods=["GET", "POST"])
@auth.require(*permissions.READERS, "site_staff")
def break_glass() -> Response | tuple:
    """Type a reason to open a study outside one's pool or site; then go on to ``next``."""
    study = (request.values.get("study") or "").strip()
    nxt = safe_next(request.values.get("next"),
                    "/viewer?StudyInstanceUIDs=" + quote(study, safe=""))
    if request.method == "GET":
        return render_template("accounts/break_glass.html", study_uid=study, next=nxt)
    try:
        auth.break_glass(study, request.form.get("reason") or "")
    except auth.BreakGlassError as e:
        return render_template("accounts/break_glass.html", study_uid=study, next=nxt, error=str(e)), 400
    return redirect(nxt)
