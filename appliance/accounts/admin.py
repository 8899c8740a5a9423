"""Admin pages: users (disable/enable, unlock), the audit trail with filters, break-glass openings.

Only ``admin`` opens these. Looking at the audit trail is itself audited
(it names patients' studies), and so is every change made here.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from flask import Blueprint, abort, redirect, render_template, request
from flask.typing import ResponseReturnValue

from appliance.accounts import permissions
from appliance.accounts import sessions as auth
from appliance.accounts import users as accounts
from appliance.core import audit
from appliance.web import get_db

bp = Blueprint("admin", __name__, url_prefix="/admin")
bp.after_request(auth.strict_csp)
PAGE = 100
AUDIT_FILTERS = ("actor", "action", "object", "source", "outcome")


def fmt_time(ts: float | None) -> str:
    if not ts:
        return "–"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _day_start(text: str, end: bool = False) -> float | None:
    """``YYYY-MM-DD`` (UTC) → epoch at that day's start (or the next day's with ``end``)."""
    if not text:
        return None
    try:
        day = dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC)
    except ValueError:
        abort(400, f"bad date {text!r}: use YYYY-MM-DD")
    return (day + dt.timedelta(days=1 if end else 0)).timestamp()


@bp.get("/users")
@auth.require(*permissions.ADMINS)
def users() -> ResponseReturnValue:
    conn, t, cfg = get_db(), auth.now(), auth.auth_cfg()
    rows = accounts.list_users(conn)
    for row in rows:
        row["blocks"] = accounts.sign_in_blocks(conn, row["username"], t, cfg)
    return render_template("accounts/admin_users.html", users=rows, fmt_time=fmt_time,
                           roles=accounts.ROLES)


@bp.post("/users/<username>/disabled")
@auth.require(*permissions.ADMINS)
def set_disabled(username: str) -> ResponseReturnValue:
    disabled = request.form.get("disabled") == "1"
    me = auth.current_user()
    if disabled and me and me["username"] == username:
        abort(400, "you cannot disable your own account")
    conn = get_db()
    try:
        accounts.set_disabled(conn, username, disabled)
    except accounts.AccountError as e:
        abort(404, str(e))
    auth.audit_event("user.disable" if disabled else "user.enable", username)
    return redirect("/admin/users")


@bp.post("/users/<username>/unlock")
@auth.require(*permissions.ADMINS)
def unlock(username: str) -> ResponseReturnValue:
    """Lift a lockout someone else's guessing put on this account (and its attempt budget)."""
    conn, t = get_db(), auth.now()
    try:
        held = accounts.sign_in_blocks(conn, username, t, auth.auth_cfg())
        accounts.unlock(conn, username, "admin:" + auth.current_user()["username"], t)
    except accounts.AccountError as e:
        abort(404, str(e))
    auth.audit_event("user.unlock", username, detail=held)
    return redirect("/admin/users")


def audit_query(args: Any) -> tuple[str, list[Any]]:
    """WHERE clause and parameters for the audit filters of the page (substring match)."""
    where, params = [], []
    for key in AUDIT_FILTERS:
        value = (args.get(key) or "").strip()
        if value:
            column = "object" if key == "object" else key
            where.append(f"{column} LIKE ? ESCAPE '\\'")
            params.append("%" + value.replace("\\", "\\\\").replace("%", "\\%")
                          .replace("_", "\\_") + "%")
    since, until = _day_start(args.get("since", "")), _day_start(args.get("until", ""), end=True)
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if until is not None:
        where.append("ts < ?")
        params.append(until)
    return (" WHERE " + " AND ".join(where)) if where else "", params


@bp.get("/audit")
@auth.require(*permissions.ADMINS)
def audit_trail() -> ResponseReturnValue:
    conn = get_db()
    where, params = audit_query(request.args)
    try:
        before = int(request.args.get("before") or 0)
    except ValueError:
        abort(400, "bad page")
    if before:
        where = (where + " AND" if where else " WHERE") + " id < ?"
        params.append(before)
    rows = [dict(r) for r in conn.execute(
        "SELECT id, ts, actor, action, object, source, outcome, detail FROM audit"
        f"{where} ORDER BY id DESC LIMIT ?", (*params, PAGE))]
    for r in rows:
        r["detail"] = json.loads(r["detail"]) if r["detail"] not in ("", "{}") else {}
    chain_ok, chain_msg, _ = audit.verify(conn) if request.args.get("verify") else (None, "", 0)
    auth.audit_event("audit.view", "", detail={k: request.args[k] for k in request.args
                                               if k in AUDIT_FILTERS + ("since", "until")})
    nxt = rows[-1]["id"] if len(rows) == PAGE else None
    return render_template("accounts/admin_audit.html", rows=rows, fmt_time=fmt_time, filters=request.args,
                           next_before=nxt, chain_ok=chain_ok, chain_msg=chain_msg,
                           fields=AUDIT_FILTERS)


@bp.get("/break-glass")
@auth.require(*permissions.ADMINS)
def break_glass_list() -> ResponseReturnValue:
    rows = [dict(r) for r in get_db().execute(
        "SELECT b.id, b.ts, b.study_uid, b.reason, b.address, b.expires_at, u.username,"
        " u.display_name, u.role, s.patient_name, s.patient_id, s.study_description"
        " FROM break_glass b JOIN users u ON u.id = b.user_id"
        " LEFT JOIN studies s ON s.study_uid = b.study_uid ORDER BY b.id DESC LIMIT 500")]
    auth.audit_event("break_glass.review", "", detail={"rows": len(rows)})
    return render_template("accounts/admin_break_glass.html", rows=rows, fmt_time=fmt_time,
                           now=auth.now())
