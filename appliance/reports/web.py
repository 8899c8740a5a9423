"""Reports in the browser: the editor, signatures, addenda, critical findings, printable pages.

- ``/reports/item/<id>``: the report of a read item; the reader holding the
  item's claim gets a draft from the template that fits the study.
- ``/reports/<id>``: the editor (template fields + free text, autosaved as
  JSON with the CSRF header) while it is the author's draft, else the signed
  report with its versions, addenda, critical findings and delivery state.
- ``/critical``: the site staff's list of critical findings, open ones
  first, each acknowledged with one click (who and when are recorded).
- ``/reports/<id>/print`` and ``/reports/<id>.pdf``: the signed report for a
  site on paper (HTML with print CSS, or a PDF made in pure Python).
- ``/api/v1/reports/<id>``: the same report as JSON, with ``superseded_by`` when an
  identity correction superseded it (:mod:`appliance.reports.corrections`), which the page
  and the printable page show as a banner.

Every view of a report is an access to patient data and is audited; every
change is audited by the domain functions in the same transaction.
"""

from __future__ import annotations

import time
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
)

from appliance.accounts import permissions
from appliance.accounts import sessions as auth
from appliance.forwarding import outbox as forward_outbox
from appliance.patients import studies as patient_orders
from appliance.reports import corrections, critical_findings
from appliance.reports import delivery as report_delivery
from appliance.reports import documents as report_documents
from appliance.reports import model as reports
from appliance.reports.model import ReportError
from appliance.web import get_db

bp = Blueprint("reports", __name__)

# Who may read a signed report: the readers, and the site staff it is written for.
VIEWERS = permissions.REPORT_VIEWERS
# The site's list of critical findings: its staff, and the responders and admins to whom
# unacknowledged findings escalate. Readers see the findings of their own reports.
CRITICAL_VIEWERS = (*permissions.SITE_STAFF, *permissions.OPERATORS)
ACKNOWLEDGERS = permissions.SITE_STAFF


def _templates() -> dict[str, reports.Template]:
    """Shipped and site templates; a broken site file is skipped and named on the page."""
    cfg = current_app.config["SITE"]
    problems: list[str] = []
    templates = reports.load_templates(cfg.data_dir / "report_templates", problems)
    g.template_problems = problems
    return templates


def _user() -> dict[str, Any]:
    return auth.current_user()


def _fail(e: Exception, status: int | None = None):
    status = status or getattr(e, "status", 400)
    if auth.wants_json() or request.is_json:
        return jsonify(error=str(e)), status
    return render_template("error.html", message=str(e)), status


def _worklist():
    from appliance.reading import worklist

    return worklist


# -- the report of a read item -------------------------------------------------------------------
@bp.get("/reports/item/<int:item_id>")
@auth.require(*permissions.READERS)
@permissions.patient_data("item")
def for_item(item_id: int):
    """Open the item's report; the claim holder's first visit starts the draft."""
    conn, user = get_db(), _user()
    wl = _worklist()
    try:
        item = wl.get_item(conn, item_id)
        permissions.check_study(item["study_uid"], "report.open")
    except wl.WorklistError as e:
        return _fail(e)
    except permissions.Refused as e:
        return _fail(ReportError(e.message, e.status))
    report = reports.report_for_item(conn, item_id)
    if report is None:
        if item["claimed_by"] != user["username"]:
            return _fail(ReportError("claim this item on the worklist before reporting it", 409))
        study = reports.study_row(conn, item["study_uid"]) or {}
        template = reports.choose_template(_templates(), study.get("modalities", ""),
                                           reports.study_body_parts(conn, item["study_uid"]),
                                           study.get("study_description", ""))
        try:
            rid = reports.create(conn, study_uid=item["study_uid"], author=user["username"],
                                 template_id=template.id, templates=_templates(),
                                 read_item_id=item_id, source=auth.client_address(),
                                 now=auth.now())
        except ReportError as e:
            return _fail(e)
    else:
        rid = report["id"]
        if item["claimed_by"] == user["username"] and report["author"] != user["username"] \
                and report["status"] == "draft":
            reports.take_over(conn, rid, actor=user["username"], source=auth.client_address(),
                              now=auth.now())
    return redirect(f"/reports/{rid}")


def _page_data(conn, report: dict[str, Any]) -> dict[str, Any]:
    templates = _templates()
    template = templates.get(report["template_id"]) or templates["generic"]
    parent = reports.get_report(conn, report["parent_id"]) if report["parent_id"] else None
    item = None
    if report["read_item_id"] is not None:
        try:
            item = _worklist().get_item(conn, report["read_item_id"])
        except Exception:
            item = None
    chain = corrections.chain(conn, report)
    return {
        "report": report, "template": template, "templates": templates,
        "study": reports.study_row(conn, report["study_uid"]) or {},
        "versions": reports.versions(conn, report["id"]),
        "addenda": reports.addenda(conn, report["id"]), "parent": parent,
        "superseded_by": corrections.superseded_by(conn, report), "corrections": chain,
        "correction_of": {c["addendum_id"]: c for c in chain},
        "findings": critical_findings.for_report(conn, report["id"]),
        "deliveries": report_delivery.for_report(conn, report["id"]), "item": item,
        "editable": report["status"] != "final" and report["author"] == _user()["username"],
        "is_reader": _user()["role"] in permissions.READERS,
        "template_problems": g.get("template_problems", []),
        "order": patient_orders.study_order(conn, report["study_uid"]),  # reason for exam
        "forwarding": forward_outbox.study_forwarding(conn, report["study_uid"]),
    }


def _may_read(conn, report: dict[str, Any], action: str = "report.view") -> ReportError | None:
    """Why the caller may not read this report, or None (a denial is audited).

    Exactly as they may open its images (``permissions.check_study``: site, pool,
    their claim, a break-glass grant); site staff read only signed reports.
    """
    try:
        permissions.check_study(report["study_uid"], action)
    except permissions.Refused as e:
        return ReportError(e.message, e.status)
    if _user()["role"] in permissions.SITE_STAFF and report["status"] == "draft":
        return ReportError("this report is not signed yet", 403)
    return None


def _checked_report(rid: int, action: str) -> dict[str, Any]:
    """The report, if the caller may see its study: every report route starts here."""
    conn = get_db()
    report = reports.get_report(conn, rid)
    refusal = _may_read(conn, report, action)
    if refusal is not None:
        raise refusal
    return report


@bp.get("/reports/<int:rid>")
@auth.require(*VIEWERS)
@permissions.patient_data("report")
def page(rid: int):
    conn = get_db()
    try:
        report = reports.get_report(conn, rid)
    except ReportError as e:
        return _fail(e)
    refusal = _may_read(conn, report)
    if refusal is not None:
        return _fail(refusal)
    auth.audit_event("report.view", f"report:{rid}", detail={"study_uid": report["study_uid"]})
    return render_template("reports/report.html", **_page_data(conn, report),
                           fmt_time=fmt_time)


@bp.get("/api/v1/reports/<int:rid>")
@auth.require(*VIEWERS)
@permissions.patient_data("report")
def api_report(rid: int):
    """The report as JSON for scripts and other tools: its signed versions, addenda and, when
    an identity correction superseded it, ``superseded_by`` (the newest correction) and
    ``corrections`` (the chain, oldest first).  The same right as the page, audited alike."""
    try:
        report = _checked_report(rid, "report.view")
    except ReportError as e:
        return _fail(e)
    auth.audit_event("report.view", f"report:{rid}", detail={"study_uid": report["study_uid"],
                                                               "api": True})
    return jsonify(_report_json(get_db(), report))


def _report_json(conn, report: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "kind", "parent_id", "study_uid", "status", "template_id", "author",
            "created_at", "updated_at")
    version_keys = ("id", "level", "signed_by", "signer_name", "signed_at", "sha256", "text")
    return {
        **{k: report[k] for k in keep},
        "versions": [{k: v[k] for k in version_keys} for v in reports.versions(conn, report["id"])],
        "addenda": [{"id": a["id"], "status": a["status"], "author": a["author"]}
                    for a in reports.addenda(conn, report["id"])],
        "superseded_by": corrections.superseded_by(conn, report),
        "corrections": corrections.chain(conn, report),
    }


@bp.app_template_filter("dicom_date")
def dicom_date(value: str | None) -> str:
    """19700101 → 1970-01-01 (anything else unchanged)."""
    value = value or ""
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() \
        else value


def fmt_time(ts: float | None) -> str:
    if not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


# -- changes (JSON for the editor's script, forms where a plain form will do) -------------------
def _body() -> dict[str, Any]:
    if request.is_json:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise ReportError("send a JSON object")
        return data
    return request.form.to_dict()


@bp.post("/reports/<int:rid>/autosave")
@auth.require(*permissions.READERS)
@permissions.patient_data("report")
def autosave(rid: int):
    try:
        _checked_report(rid, "report.autosave")
        data = _body()
        revision = reports.autosave(
            get_db(), rid, actor=_user()["username"], templates=_templates(),
            base_revision=int(data.get("revision", -1)), fields=data.get("fields"),
            findings=data.get("findings"), impression=data.get("impression"),
            template_id=data.get("template_id") or None, source=auth.client_address(),
            now=auth.now())
    except (ReportError, ValueError, TypeError) as e:
        return jsonify(error=str(e)), getattr(e, "status", 400)
    return jsonify(revision=revision, saved_at=auth.now())


@bp.post("/reports/<int:rid>/sign")
@auth.require(*permissions.READERS)
@permissions.patient_data("report")
def sign(rid: int):
    """Sign what the reader sees: the revision sent must be the one stored."""
    conn = get_db()
    try:
        report = _checked_report(rid, "report.sign")
        data = _body()
        if "revision" in data and int(data["revision"]) != report["revision"]:
            raise ReportError("the report changed since this page saved it; reload and sign "
                              "again", 409)
        version_id = report_delivery.sign(
            conn, current_app.config["SITE"], rid, actor=_user()["username"],
            level=str(data.get("level", "")), templates=_templates(),
            source=auth.client_address(), now=auth.now())
    except (ReportError, ValueError) as e:
        return _fail(e)
    if request.is_json:
        return jsonify(version_id=version_id, status=reports.get_report(conn, rid)["status"])
    return redirect(f"/reports/{rid}")


@bp.post("/reports/<int:rid>/addendum")
@auth.require(*permissions.READERS)
@permissions.patient_data("report")
def addendum(rid: int):
    """Start an addendum: the same right as reading the study (pool, site or a grant)."""
    try:
        _checked_report(rid, "report.addendum")
        add_id = reports.add_addendum(get_db(), rid, actor=_user()["username"],
                                      text=_body().get("text", ""),
                                      source=auth.client_address(), now=auth.now())
    except ReportError as e:
        return _fail(e)
    if request.is_json:
        return jsonify(report_id=add_id)
    return redirect(f"/reports/{add_id}")


@bp.post("/reports/<int:rid>/critical")
@auth.require(*permissions.READERS)
@permissions.patient_data("report")
def flag_critical(rid: int):
    cfg = current_app.config["SITE"]
    try:
        _checked_report(rid, "report.critical")
        fid = critical_findings.flag(
            get_db(), rid, actor=_user()["username"], description=_body().get("description", ""),
            ack_minutes=float(cfg["reports"]["critical_ack_minutes"]),
            source=auth.client_address(), now=auth.now())
    except ReportError as e:
        return _fail(e)
    if request.is_json:
        return jsonify(finding_id=fid)
    return redirect(f"/reports/{rid}")


@bp.get("/reports")
@auth.require(*VIEWERS)
@permissions.patient_data("list")
def results():
    """Signed reports, newest first: what the site staff come for ("is the CT read?").

    Readers see the reports they signed.
    """
    user = _user()
    mine = user["role"] != "site_staff"
    rows = [dict(r) for r in get_db().execute(
        "SELECT r.id, r.status, r.kind, r.parent_id, r.author, r.updated_at, r.study_uid,"
        " s.patient_id, s.patient_name, s.accession_number, s.study_description, s.modalities,"
        " (SELECT COUNT(*) FROM critical_findings c WHERE c.report_id = r.id) AS critical,"
        " (SELECT COUNT(*) FROM critical_findings c WHERE c.report_id = r.id"
        "  AND c.acknowledged_at IS NULL) AS critical_open,"
        " (SELECT group_concat(d.format || ' ' || d.state, ', ') FROM deliveries d"
        "  WHERE d.report_id = r.id) AS delivery"
        " FROM reports r LEFT JOIN studies s ON s.study_uid = r.study_uid"
        " WHERE r.status != 'draft' AND (? = 0 OR r.author = ?)"
        " ORDER BY r.updated_at DESC LIMIT 200", (int(mine), user["username"]))]
    seen = permissions.visible_to_caller(r["study_uid"] for r in rows)
    rows = [r for r in rows if r["study_uid"] in seen]  # the staff's own site, the reader's pool
    marks = corrections.for_listing(get_db(), rows)
    for r in rows:
        r["patient_name"] = (r["patient_name"] or "").replace("^", " ").strip()
        r["superseded_by"] = marks.get(r["id"])
    auth.audit_event("report.list", "", detail={"rows": len(rows)})
    return render_template("reports/list.html", rows=rows, fmt_time=fmt_time)


# -- critical findings for the site ---------------------------------------------------------------
def _findings_view(open_only: bool = False) -> list[dict[str, Any]]:
    rows = critical_findings.listing(get_db(), open_only=open_only)
    seen = permissions.visible_to_caller(r["study_uid"] for r in rows)
    rows = [r for r in rows if r["study_uid"] in seen]  # the site's own findings
    for r in rows:
        r["patient_name"] = (r.get("patient_name") or "").replace("^", " ").strip()
        r["flagged"] = fmt_time(r["flagged_at"])
        r["acknowledged"] = fmt_time(r["acknowledged_at"])
    return rows


@bp.get("/critical")
@auth.require(*CRITICAL_VIEWERS)
@permissions.patient_data("list")
def critical_page():
    rows = _findings_view()
    auth.audit_event("critical.view", "", detail={"rows": len(rows)})
    return render_template("reports/critical.html", rows=rows,
                           can_ack=_user()["role"] in ACKNOWLEDGERS)


@bp.get("/critical/open")
@auth.require(*CRITICAL_VIEWERS)
def critical_open():
    """Ids of unacknowledged findings, for the page's background check (no patient data)."""
    rows = critical_findings.listing(get_db(), open_only=True)
    seen = permissions.visible_to_caller(r["study_uid"] for r in rows)
    return jsonify(open=[r["id"] for r in rows if r["study_uid"] in seen])


@bp.post("/critical/<int:fid>/acknowledge")
@auth.require(*ACKNOWLEDGERS)
@permissions.patient_data("finding")
def acknowledge(fid: int):
    try:
        finding = critical_findings.get(get_db(), fid)
        permissions.check_study(finding["study_uid"], "critical.acknowledge")
    except ReportError as e:
        return _fail(e)
    except permissions.Refused as e:
        return _fail(ReportError(e.message, e.status))
    try:
        critical_findings.acknowledge(get_db(), fid, actor=_user()["username"],
                                      note=_body().get("note", ""),
                                      source=auth.client_address(), now=auth.now())
    except ReportError as e:
        return _fail(e)
    if request.is_json:
        return jsonify(acknowledged=fid)
    return redirect(f"/critical#finding-{fid}")


# -- paper ----------------------------------------------------------------------------------------
def _signed(rid: int) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    conn = get_db()
    report = _checked_report(rid, "report.print")
    version = reports.final_version(conn, rid) or reports.latest_version(conn, rid)
    if version is None:
        raise ReportError("this report is not signed yet; only signed reports are printed", 409)
    signed_addenda = [(a, reports.final_version(conn, a["id"]))
                      for a in reports.addenda(conn, rid)]
    return report, version, [{"report": a, "version": v} for a, v in signed_addenda if v]


@bp.get("/reports/<int:rid>/print")
@auth.require(*VIEWERS)
@permissions.patient_data("report")
def printable(rid: int):
    try:
        report, version, adds = _signed(rid)
    except ReportError as e:
        return _fail(e)
    auth.audit_event("report.print", f"report:{rid}", detail={"version_id": version["id"]})
    cfg = current_app.config["SITE"]
    return render_template("reports/print.html", report=report, version=version, addenda=adds,
                           study=reports.study_row(get_db(), report["study_uid"]) or {},
                           superseded_by=corrections.superseded_by(get_db(), report),
                           site=cfg["site"]["name"], fmt_time=fmt_time)


@bp.get("/reports/<int:rid>.pdf")
@auth.require(*VIEWERS)
@permissions.patient_data("report")
def pdf(rid: int):
    try:
        report, version, _adds = _signed(rid)
    except ReportError as e:
        return _fail(e)
    study = reports.study_row(get_db(), report["study_uid"])
    if study is None:
        abort(404)
    doc = report_documents.SignedReport(
        version=version, report=report, study=study,
        site_name=current_app.config["SITE"]["site"]["name"], series_uid="", sop_uid="")
    auth.audit_event("report.pdf", f"report:{rid}", detail={"version_id": version["id"]})
    body = report_documents.render_pdf(doc)
    name = report_delivery.print_file_name(doc)
    return Response(body, mimetype="application/pdf",
                    headers={"Content-Disposition": f'inline; filename="{name}"'})
