"""The readers' worklist and the turnaround dashboard (HTML, plus the JSON their pages poll).

The worklist is the read items of ``appliance.worklist``, soonest due first,
each with a live SLA countdown (green, amber past half the SLA, red when
breached) computed in the browser from ``due_at`` and the server's clock.
The page refreshes its rows every few seconds with ``X-Background: 1`` so
that an unattended worklist is still logged off when idle, and with the last
``ETag`` so that an unchanged worklist answers 304 (``appliance.reading.freshness``).
A study still arriving (a STAT study listed before it is complete) says so. Claim and release
are one click (a JSON POST with the CSRF header).

Opening a study outside one's pool or site goes through the break-glass page first;
``scope=all`` lists such items without naming their patients
(``appliance.accounts.permissions`` decides).
"""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

from flask import Blueprint, abort, current_app, jsonify, render_template, request, session
from flask.typing import ResponseReturnValue

from appliance.accounts import permissions
from appliance.accounts import sessions as auth
from appliance.reading import freshness, worklist
from appliance.web import get_db

bp = Blueprint("ui", __name__)
bp.after_request(auth.strict_csp)
POLL_MS = 5000
LIST_AUDIT_EVERY_S = 300
PAGE_LIMIT = 100  # the soonest due; filters narrow the rest (a reader works from the top)
FILTER_STATES = {"open": ["queued", "claimed", "preliminary"], "queued": ["queued"],
                 "claimed": ["claimed"], "mine": ["claimed", "preliminary"]}


@bp.errorhandler(400)
def _bad_request(e) -> ResponseReturnValue:
    """Bad filters: JSON for the page's refresh and scripts, the usual page otherwise."""
    if auth.wants_json():
        return jsonify(error=e.description), 400
    return e


def viewer_url(study_uid: str) -> str:
    return "/viewer?StudyInstanceUIDs=" + quote(study_uid, safe="")


PATIENT_FIELDS = ("patient_name", "patient_id", "description", "accession")


def _body_parts(study_uids: list[str]) -> dict[str, str]:
    if not study_uids:
        return {}
    marks = ",".join("?" for _ in study_uids)
    return {r[0]: r[1] or "" for r in get_db().execute(
        "SELECT study_uid, group_concat(DISTINCT body_part) FROM series"
        f" WHERE study_uid IN ({marks}) AND body_part != '' GROUP BY study_uid", study_uids)}


def row_view(item: dict[str, Any], user: dict[str, Any], body_part: str,
             eligible: bool) -> dict[str, Any]:
    """What the page shows of one read item (and nothing it does not need).

    ``eligible``: the caller may see the study (``permissions``); a row they may not
    see (``scope=all``) keeps its place, priority and break-glass link but names no
    patient.
    """
    open_url = viewer_url(item["study_uid"])
    if not eligible:
        open_url = ("/break-glass?study=" + quote(item["study_uid"], safe="")
                    + "&next=" + quote(open_url, safe=""))
    return {
        "id": item["id"], "study_uid": item["study_uid"], "state": item["state"],
        "priority": item["priority"], "modalities": item["modalities"], "body_part": body_part,
        "site": item.get("institution_name") or "", "images": item.get("num_instances") or 0,
        "late": item["late"], "arriving": item["arriving"], "due_at": item["due_at"], "first_received": item["first_received"],
        "sla_minutes": item["sla_minutes"], "breached": item["breached"],
        "claimed_by": item["claimed_by"], "claim_expires_at": item["claim_expires_at"],
        "mine": item["claimed_by"] == user["username"], "eligible": eligible,
        "hold": item["hold"], "pool": item["pool"]["name"],
        "patient_name": (item.get("patient_name") or "").replace("^", " ").strip(),
        "patient_id": item.get("patient_id") or "", "description": item.get("study_description") or "",
        "accession": item.get("accession_number") or "", "open_url": open_url,
    } | ({} if eligible else dict.fromkeys(PATIENT_FIELDS, ""))


def query_items(args: Any, user: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows for the filters in ``args`` (state, priority, modality, scope, breached)."""
    state = args.get("state") or "open"
    if state not in FILTER_STATES:
        abort(400, f"unknown state filter {state!r}")
    try:
        items = worklist.list_items(
            get_db(), state=FILTER_STATES[state], priority=args.get("priority") or None,
            modality=args.get("modality") or None,
            breached=True if args.get("breached") == "1" else None,
            claimed_by=user["username"] if state == "mine" else None,
            eligible_for=None if args.get("scope") == "all" else user, limit=PAGE_LIMIT,
        )
    except worklist.WorklistError as e:
        abort(400, str(e))
    seen = worklist.visible_items(get_db(), items, user, auth.now())
    if args.get("scope") != "all":
        items = [i for i in items if i["study_uid"] in seen]  # in the pool, not the site
    parts = _body_parts([i["study_uid"] for i in items if i["study_uid"] in seen])
    return [row_view(i, user, parts.get(i["study_uid"], ""), i["study_uid"] in seen)
            for i in items]


def sla_class(row: dict[str, Any], now: float) -> str:
    """green, amber past half the SLA, breached when flagged or due (as worklist.js)."""
    if row["breached"] or now >= row["due_at"]:
        return "breached"
    return "amber" if row["due_at"] - now < row["sla_minutes"] * 30 else "green"


@bp.get("/worklist")
@auth.require(*permissions.READERS)
@permissions.patient_data("list")
def worklist_page() -> ResponseReturnValue:
    user = auth.current_user()
    rows = query_items(request.args, user)
    _audit_list_view(rows)
    now = auth.now()
    # Attributes (Jinja tries getattr before [] on every ``r.x``) and the SLA colour
    # computed here, not by a template macro per row (a third of the render).
    return render_template("reading/worklist.html", now=now, filters=request.args,
                           rows=[SimpleNamespace(**r, sla_class=sla_class(r, now))
                                 for r in rows],
                           poll_ms=POLL_MS, priorities=("stat", "urgent", "routine"),
                           limit=PAGE_LIMIT)


@bp.get("/worklist/items")
@auth.require(*permissions.READERS)
@permissions.patient_data("list")
def worklist_items() -> ResponseReturnValue:
    """The rows the page polls; ``304`` when nothing the caller would see has changed
    (``If-None-Match`` with the last ``ETag``: ``appliance.reading.freshness``)."""
    user = auth.current_user()
    tag = freshness.etag(get_db(), "ui.items", user, request.args, auth.now())
    if freshness.unchanged(tag):
        return freshness.not_modified(tag)  # no rows sent: nothing to audit
    rows = query_items(request.args, user)
    _audit_list_view(rows)
    return freshness.tagged(jsonify(now=auth.now(), items=rows), tag)


def _audit_list_view(rows: list[dict[str, Any]]) -> None:
    """Audit who saw the worklist (it names patients): the first load, then at most every
    ``LIST_AUDIT_EVERY_S`` per browser session while the page keeps refreshing.

    One row per refresh would be thousands of identical rows a day per reader, and a
    synchronous fsync on every poll; scripts (Bearer tokens) are audited on every call.
    """
    t = auth.now()
    last = session.get("wl_audit_at", 0) if not auth.via_token() else 0
    if t - last < LIST_AUDIT_EVERY_S:
        return
    auth.audit_event("worklist.view", "", detail={"rows": len(rows),
                                                  "filters": dict(request.args),
                                                  "studies": [r["study_uid"] for r in rows[:20]]})
    if not auth.via_token():
        session["wl_audit_at"] = t


def _claim_action(item_id: int, action: str) -> ResponseReturnValue:
    user = auth.current_user()
    try:
        permissions.check_study(worklist.get_item(get_db(), item_id)["study_uid"],
                                f"read_item.{action}")
    except worklist.WorklistError as e:
        return jsonify(error=str(e)), e.status
    except permissions.Refused as e:
        return jsonify(error=e.message), e.status
    try:
        if action == "claim":
            lease_s = float(current_app.config["SITE"]["worker"]["claim_lease_s"])
            item = worklist.claim(get_db(), item_id, user, now=auth.now(), lease_s=lease_s,
                                  source=auth.client_address())
        else:
            item = worklist.release(get_db(), item_id, user, now=auth.now(),
                                    reason=(request.get_json(silent=True) or {}).get("reason", ""),
                                    source=auth.client_address())
    except worklist.WorklistError as e:
        return jsonify(error=str(e)), e.status
    item = worklist.get_item(get_db(), item_id)
    parts = _body_parts([item["study_uid"]])
    return jsonify(now=auth.now(),
                   item=row_view(item, user, parts.get(item["study_uid"], ""), True))


@bp.post("/worklist/<int:item_id>/claim")
@auth.require(*permissions.READERS)
@permissions.patient_data("item")
def claim(item_id: int) -> ResponseReturnValue:
    return _claim_action(item_id, "claim")


@bp.post("/worklist/<int:item_id>/release")
@auth.require(*permissions.READERS)
@permissions.patient_data("item")
def release(item_id: int) -> ResponseReturnValue:
    return _claim_action(item_id, "release")


# -- turnaround dashboard -------------------------------------------------------------------------
def today_start(t: float) -> float:
    """Local midnight of the appliance's clock: "today" as the site lives it."""
    local = dt.datetime.fromtimestamp(t).astimezone()
    return local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def per_reader(since: float, until: float) -> list[dict[str, Any]]:
    """Reads per reader in the window: count, median minutes from claim to read, within SLA."""
    rows = get_db().execute(
        "SELECT claimed_by AS reader, read_at - coalesce(claimed_at, first_received) AS work,"
        " read_at <= due_at AS in_sla FROM read_items"
        " WHERE read_at >= ? AND read_at < ? AND claimed_by IS NOT NULL", (since, until),
    ).fetchall()
    by: dict[str, list] = {}
    for r in rows:
        by.setdefault(r["reader"], []).append(r)
    out = []
    for reader, group in sorted(by.items()):
        work = sorted(r["work"] / 60 for r in group)
        out.append({"reader": reader, "read": len(group),
                    "median_minutes": round(work[(len(work) - 1) // 2], 1),
                    "within_sla": sum(1 for r in group if r["in_sla"])})
    return out


def dashboard_data() -> dict[str, Any]:
    t = auth.now()
    since = today_start(t)
    stats = worklist.turnaround(get_db(), since, t + 1)
    stats["per_reader"] = per_reader(since, t + 1)
    stats["now"] = t
    return stats


@bp.get("/dashboard")
@auth.require(*permissions.DASHBOARD)
def dashboard() -> ResponseReturnValue:
    return render_template("reading/dashboard.html", d=dashboard_data(), poll_ms=POLL_MS * 2)


@bp.get("/dashboard/data")
@auth.require(*permissions.DASHBOARD)
def dashboard_json() -> ResponseReturnValue:
    return jsonify(dashboard_data())
