"""The registration desk's page and JSON API: register, one-click trauma, wristbands.

``/patients`` is the desk (HTML forms, no script needed, so it works on any tablet);
``/api/v1/patients`` and ``/api/v1/patients/trauma`` take JSON (201 with the record)
or the page's form (a redirect back to the desk with the new wristband).  Site staff,
responders and admins register; every listing and wristband is audited.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, redirect, render_template, request

from appliance.accounts import permissions
from appliance.accounts import sessions as auth
from appliance.core import db
from appliance.patients import reconciliation, registry, studies, superseded, wristband
from appliance.patients.registry import RegistrationError
from appliance.web import get_db

bp = Blueprint("patients", __name__)

DESK = (*permissions.SITE_STAFF, *permissions.OPERATORS)


def _site() -> registry.Site:
    return registry.Site.from_config(current_app.config["SITE"])


def _user() -> str:
    return auth.current_user()["username"]


def _body() -> dict[str, Any]:
    if request.is_json:
        body = request.get_json(silent=True)
        return body if isinstance(body, dict) else {}
    return request.form.to_dict()


def _order_of(body: dict[str, Any]) -> dict[str, Any] | None:
    order = body.get("order") if isinstance(body.get("order"), dict) else None
    if order is None and body.get("procedure"):
        order = {k: body.get(k, "") for k in ("procedure", "priority", "reason",
                                               "clinical_details", "station_ae")}
    return order


def _answer(patient: dict[str, Any], order: dict[str, Any] | None):
    if request.is_json:
        return jsonify({"patient": patient, "order": order}), 201
    return redirect(f"/patients?new={patient['id']}", code=303)


def _fail(e: RegistrationError):
    if request.is_json:
        return jsonify({"error": str(e)}), 400
    return _page(error=str(e)), 400


def _add_order(conn, patient: dict[str, Any], order: dict[str, Any] | None):
    if not order:
        return None
    return registry.add_order(
        conn, _site(), patient["id"], actor=_user(), procedure=str(order.get("procedure", "")),
        priority=str(order.get("priority") or "ROUTINE"), reason=str(order.get("reason", "")),
        clinical_details=str(order.get("clinical_details", "")),
        station_ae=str(order.get("station_ae", "")), source=auth.client_address())


@bp.post("/api/v1/patients")
@auth.require(*DESK)
def register():
    body, conn = _body(), get_db()
    try:
        with db.transaction(conn):
            p = registry.register(
                conn, _site(), actor=_user(), name=str(body.get("name", "")),
                patient_id=str(body.get("patient_id", "")),
                birth=str(body.get("birth_date", "")), estimated_age=body.get("age", ""),
                sex_code=str(body.get("sex", "")), source=auth.client_address())
            o = _add_order(conn, p, _order_of(body))
    except RegistrationError as e:
        return _fail(e)
    return _answer(p, o)


@bp.post("/api/v1/patients/trauma")
@auth.require(*DESK)
def trauma():
    body, conn = _body(), get_db()
    try:
        with db.transaction(conn):
            p = registry.register_trauma(conn, _site(), actor=_user(),
                                         sex_code=str(body.get("sex", "")),
                                         age_band=str(body.get("age_band") or "unknown"),
                                         source=auth.client_address())
            o = _add_order(conn, p, _order_of(body))
    except RegistrationError as e:
        return _fail(e)
    return _answer(p, o)


@bp.post("/api/v1/patients/link")
@auth.require(*DESK)
@permissions.patient_data("patient")
def link():
    """Reconcile: ``source`` (a temporary identity, or with ``kind: merge`` any record) is
    ``target``; or ``unlink: true`` undoes ``source``'s link.  JSON or the desk's form."""
    body, conn = _body(), get_db()
    source, target = str(body.get("source", "")).strip(), str(body.get("target", "")).strip()
    cfg = current_app.config["SITE"]
    try:
        if not source or not conn.execute("SELECT 1 FROM patients WHERE patient_id = ?",
                                          (source,)).fetchone():
            return jsonify({"error": "no such patient"}), 404
        if str(body.get("unlink", "")).lower() in ("1", "true", "on"):
            result = reconciliation.unlink(cfg, conn, source, actor=_user(),
                                           reason=str(body.get("reason", "")),
                                           source=auth.client_address())
        else:
            kind = "merge" if body.get("kind") == "merge" else "link"
            result = reconciliation.link(cfg, conn, source, target, actor=_user(),
                                         reason=str(body.get("reason", "")), kind=kind,
                                         source=auth.client_address())
    except RegistrationError as e:
        return _fail(e)
    if request.is_json:
        return jsonify(result)
    return redirect("/patients", code=303)


@bp.get("/api/v1/patients")
@auth.require(*DESK)
@permissions.patient_data("list")
def listing():
    rows = registry.listing(get_db(), temporary_only=request.args.get("temporary") == "1")
    auth.audit_event("patient.list", "", detail={"rows": len(rows)})
    return jsonify(rows)


@bp.get("/api/v1/patients/flagged-studies")
@auth.require(*DESK)
@permissions.patient_data("list")
def flagged_studies():
    """Studies with no order, or whose patient fields disagree with their order's."""
    return jsonify(_flagged())


def _flagged() -> list[dict]:
    rows = studies.flagged(get_db())
    seen = permissions.visible_to_caller(r["study_uid"] for r in rows)
    rows = [r for r in rows if r["study_uid"] in seen]  # the staff's own site
    auth.audit_event("patient.flagged_studies", "", detail={"rows": len(rows)})
    return rows


@bp.get("/api/v1/patients/superseded")
@auth.require(*DESK)
@permissions.patient_data("list")
def superseded_copies():
    """Copies a PACS still holds under a replaced identity (``?all=1``: finished ones too)."""
    return jsonify(_superseded(every=request.args.get("all") == "1"))


def _superseded(every: bool = False, limit: int = 10_000) -> list[dict]:
    """The rows of the caller's own site's studies, audited as a listing."""
    rows = superseded.listing(get_db(), every=every, limit=limit)
    seen = permissions.visible_to_caller({r["study_uid"] for r in rows})
    rows = [r for r in rows if r["study_uid"] in seen]
    auth.audit_event("patient.superseded.list", "", detail={"rows": len(rows)})
    return rows


@bp.get("/patients")
@auth.require(*DESK)
@permissions.patient_data("list")
def desk():
    return _page()


def _page(error: str = ""):
    conn = get_db()
    rows = registry.listing(conn, limit=100)
    new = request.args.get("new", type=int)
    fresh = next((r for r in rows if r["id"] == new), None)
    auth.audit_event("patient.list", "", detail={"rows": len(rows), "page": True})
    return render_template("patients/desk.html", rows=rows, fresh=fresh, error=error,
                           flagged=_flagged(), superseded=_superseded(limit=200),
                           procedures=_site().procedures, bands=list(registry.AGE_BANDS),
                           priorities=registry.PRIORITIES)


@bp.get("/patients/<int:patient_ref>/wristband.pdf")
@auth.require(*DESK)
@permissions.patient_data("patient")
def wristband_pdf(patient_ref: int):
    try:
        p = registry.get(get_db(), patient_ref)
    except RegistrationError:
        return jsonify({"error": "no such patient"}), 404
    auth.audit_event("patient.wristband", p["patient_id"])
    data = wristband.pdf(p, current_app.config["SITE"]["site"]["name"])
    return Response(data, mimetype="application/pdf", headers={
        "Content-Disposition": f'inline; filename="{p["patient_id"]}.pdf"',
        "Cache-Control": "no-store"})
