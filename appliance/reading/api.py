"""``/api/v1``: the worklist as JSON for scripts, other tools and the reader app.

Authenticated by the web app's session or a bearer token (``appliance.web.auth``);
every response that names a patient is audited (who, what, from where).  The
domain rules (pools, leases, the state machine) live in ``appliance.worklist``;
this module only maps HTTP to it and its errors to status codes.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, request

from appliance.accounts import permissions
from appliance.accounts import sessions as auth
from appliance.core import notifications
from appliance.reading import freshness, worklist
from appliance.web import get_db

bp = Blueprint("api", __name__, url_prefix="/api/v1")

WORKLIST_ROLES = tuple(dict.fromkeys(permissions.READERS + permissions.OPERATORS))
# What /state may set: the report code moves an item to preliminary and final when a report
# is signed, the delivery code to delivered when the site's PACS accepted it.
API_STATES = ("cancelled", "queued")
PATIENT_FIELDS = ("patient_id", "patient_name", "accession_number", "study_description")
TRUE = ("1", "true", "yes")
FALSE = ("0", "false", "no")


def _error(message: str, status: int):
    resp = jsonify(error=message)
    resp.status_code = status
    return resp


def _flag(name: str) -> bool | None:
    value = (request.args.get(name) or "").lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    if value:
        raise worklist.WorklistError(f"{name} must be true or false, got {value!r}")
    return None


def _int_arg(name: str, default: int) -> int:
    value = request.args.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise worklist.WorklistError(f"{name} must be a whole number, got {value!r}") from None


def _lease_s() -> float:
    return float(current_app.config["SITE"]["worker"].get("claim_lease_s",
                                                          worklist.DEFAULT_LEASE_S))


@bp.errorhandler(worklist.WorklistError)
def _worklist_error(e: worklist.WorklistError):
    return _error(str(e), e.status)


@bp.errorhandler(permissions.Refused)
def _refused(e: permissions.Refused):
    return _error(e.message, e.status)


def _checked_item(item_id: int, action: str) -> dict[str, Any]:
    """The item, if the caller may see its study (else 403, audited, or 404)."""
    item = worklist.get_item(get_db(), item_id)
    permissions.check_study(item["study_uid"], action)
    return item


def _redacted(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items of studies the caller may not see keep their place but name no patient."""
    seen = worklist.visible_items(get_db(), items, auth.current_user(), auth.now())
    return [i if i["study_uid"] in seen else
            {**i, **dict.fromkeys(PATIENT_FIELDS, None), "restricted": True} for i in items]


@bp.get("/worklist/items")
@auth.require(*WORKLIST_ROLES)
@permissions.patient_data("list")
def list_items():
    """Read items soonest due first; filters: state, priority, modality, pool, breached,
    mine, eligible (only what the caller may claim), limit, offset. Tagged (``ETag``):
    ``If-None-Match`` with the last tag answers 304 when nothing listed changed."""
    user = auth.current_user()
    eligible = _flag("eligible")
    mine = _flag("mine")
    tag = freshness.etag(get_db(), "api.items", user, request.args, auth.now())
    if freshness.unchanged(tag):
        return freshness.not_modified(tag)  # nothing sent: nothing to audit
    items = worklist.list_items(
        get_db(), state=request.args.get("state") or None,
        priority=request.args.get("priority") or None,
        modality=request.args.get("modality") or None, pool=request.args.get("pool") or None,
        breached=_flag("breached"), hold=_flag("hold"),
        claimed_by=user["username"] if mine else None,
        eligible_for=user if eligible else None,
        limit=_int_arg("limit", 100), offset=_int_arg("offset", 0),
    )
    items = _redacted(items)
    if eligible:
        items = [i for i in items if not i.get("restricted")]
    auth.audit_event("worklist.list", "", detail={"rows": len(items),
                                                  "filters": dict(request.args)})
    return freshness.tagged(jsonify(now=auth.now(), count=len(items), items=items), tag)


@bp.get("/worklist/items/<int:item_id>")
@auth.require(*WORKLIST_ROLES)
@permissions.patient_data("item")
def get_item(item_id: int):
    item = _checked_item(item_id, "read_item.view")
    auth.audit_event("read_item.view", item["study_uid"], detail={"item_id": item_id})
    return jsonify(now=auth.now(), item=item)


@bp.get("/worklist/items/<int:item_id>/history")
@auth.require(*WORKLIST_ROLES)
@permissions.patient_data("item")
def item_history(item_id: int):
    _checked_item(item_id, "read_item.history")
    rows = worklist.history(get_db(), item_id)
    return jsonify(item_id=item_id, history=rows)


def _body() -> dict[str, Any]:
    return request.get_json(silent=True) or {}


@bp.post("/worklist/items/<int:item_id>/claim")
@auth.require(*permissions.READERS)
@permissions.patient_data("item")
def claim(item_id: int):
    _checked_item(item_id, "read_item.claim")
    item = worklist.claim(get_db(), item_id, auth.current_user(), auth.now(), _lease_s(),
                          source=auth.client_address())
    return jsonify(now=auth.now(), item=item)


@bp.post("/worklist/items/<int:item_id>/renew")
@auth.require(*permissions.READERS)
@permissions.patient_data("item")
def renew(item_id: int):
    _checked_item(item_id, "read_item.renew")
    item = worklist.renew(get_db(), item_id, auth.current_user(), auth.now(), _lease_s(),
                          source=auth.client_address())
    return jsonify(now=auth.now(), item=item)


@bp.post("/worklist/items/<int:item_id>/release")
@auth.require(*WORKLIST_ROLES)
@permissions.patient_data("item")
def release(item_id: int):
    _checked_item(item_id, "read_item.release")
    item = worklist.release(get_db(), item_id, auth.current_user(), auth.now(),
                            reason=str(_body().get("reason", ""))[:500],
                            source=auth.client_address())
    return jsonify(now=auth.now(), item=item)


@bp.post("/worklist/items/<int:item_id>/state")
@auth.require(*WORKLIST_ROLES)
@permissions.patient_data("item")
def set_state(item_id: int):
    """Cancel or re-queue an item: ``{"state": "cancelled", "note": "duplicate"}``.

    Only these: ``final`` without a signed report would stop the escalation and count
    a read within SLA that nobody made, ``delivered`` would say a PACS accepted what it
    never got. Signing (``/reports``) and delivery move an item there.
    """
    _checked_item(item_id, "read_item.state")
    body = _body()
    state = body.get("state")
    if not isinstance(state, str):
        return _error("give the new state as {\"state\": ...}", 400)
    if state not in API_STATES:
        return _error(f"state {state!r} cannot be set here: only {' or '.join(API_STATES)}"
                      " (preliminary and final are set by signing the report at"
                      f" /reports/item/{item_id}, delivered by report delivery)", 409)
    item = worklist.transition(get_db(), item_id, state, auth.current_user(), auth.now(),
                               detail={"note": str(body.get("note", ""))[:500]},
                               source=auth.client_address())
    return jsonify(now=auth.now(), item=item)


@bp.post("/worklist/items/<int:item_id>/release-hold")
@auth.require(*permissions.OPERATORS)
@permissions.patient_data("item")
def release_hold(item_id: int):
    """Manual triage done: a study a rule held (``hold: true``) may now be claimed."""
    _checked_item(item_id, "read_item.release_hold")
    item = worklist.release_hold(get_db(), item_id, auth.current_user()["username"], auth.now(),
                                 note=str(_body().get("note", ""))[:500])
    return jsonify(now=auth.now(), item=item)


@bp.get("/metrics/turnaround")
@auth.require(*permissions.DASHBOARD)
def turnaround():
    """Counts, p50/p90 minutes to read and the share within SLA over a window.

    ``since``/``until`` are epoch seconds; default is the last ``hours`` (24).
    """
    now = auth.now()
    try:
        hours = float(request.args.get("hours", 24))
        until = float(request.args.get("until", now + 1))  # a read this second counts
        since = float(request.args.get("since", until - hours * 3600))
    except ValueError:
        return _error("since, until and hours must be numbers", 400)
    if since >= until:
        return _error("since must be before until", 400)
    return jsonify(worklist.turnaround(get_db(), since, until))


@bp.get("/notifications")
@auth.require()
def inbox():
    user = auth.current_user()
    rows = notifications.inbox(get_db(), user["username"], unread_only=_flag("unread") or False,
                               limit=max(1, min(_int_arg("limit", 100), 500)))
    return jsonify(notifications=rows)


@bp.post("/notifications/read")
@auth.require()
def mark_read():
    ids = _body().get("ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        return _error("give {\"ids\": [notification ids]}", 400)
    changed = notifications.mark_read(get_db(), auth.current_user()["username"], ids, auth.now())
    return jsonify(marked=changed)
