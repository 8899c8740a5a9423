"""Report states, locks, addenda, templates and critical findings, on a real data directory.

Time is a parameter everywhere (``now=``): escalations are driven by a fake
clock, never by sleeping.
"""

from __future__ import annotations

import sqlite3

import pytest
from reporting_site import (
    add_users,
    ingest_study,
    local_site,
    set_reports_config,
    site_config,
)

from appliance.core import audit, db
from appliance.reading import read_queue, worklist
from appliance.reports import critical_findings
from appliance.reports import delivery as report_delivery
from appliance.reports import model as reports
from appliance.reports.model import ReportError

T0 = 1_900_000_000.0
TEMPLATES = reports.load_templates()


@pytest.fixture
def setup(tmp_path):
    site = local_site(tmp_path)
    add_users(site)
    study_uid = ingest_study(site, 2, study_description="CT HEAD STROKE")
    conn = db.connect(site.data_dir / "appliance.db")
    yield site, conn, study_uid
    conn.close()


def _draft(conn, study_uid, author="dr.ray", item_id=None, template="ct-head-stroke"):
    return reports.create(conn, study_uid=study_uid, author=author, template_id=template,
                          templates=TEMPLATES, read_item_id=item_id, now=T0)


def _fill(conn, rid, revision=0, actor="dr.ray", **kw):
    values = {"fields": {"haemorrhage": "present"}, "findings": "Left basal ganglia bleed.",
              "impression": "Acute intracerebral haemorrhage."}
    values.update(kw)
    return reports.autosave(conn, rid, actor=actor, templates=TEMPLATES, base_revision=revision,
                            now=T0 + 10, **values)


# -- templates ------------------------------------------------------------------------------
def test_shipped_templates_and_their_choice():
    assert {"ct-head-stroke", "ct-chest", "cr-chest", "generic"} <= set(TEMPLATES)
    aspects = TEMPLATES["ct-head-stroke"].field("aspects")
    assert aspects.type == "aspects" and [c for c, _ in aspects.regions] == [
        "C", "L", "IC", "I", "M1", "M2", "M3", "M4", "M5", "M6"]
    pick = reports.choose_template
    assert pick(TEMPLATES, "CT", "HEAD", "CT HEAD STROKE").id == "ct-head-stroke"
    assert pick(TEMPLATES, "CT", "CHEST", "CT THORAX").id == "ct-chest"
    assert pick(TEMPLATES, "CR", "CHEST", "").id == "cr-chest"
    assert pick(TEMPLATES, "MR", "KNEE", "").id == "generic"
    assert pick(TEMPLATES, "CT", "KNEE", "").id == "generic"


def test_a_broken_template_names_the_file_and_the_problem(tmp_path):
    (tmp_path / "bad.yaml").write_text("id: bad\nfields:\n  - {key: x, type: choice}\n")
    with pytest.raises(ReportError, match=r"bad.yaml: fields\[0\]: field x: a choice needs"):
        reports.load_templates(tmp_path)
    (tmp_path / "bad.yaml").write_text("id: [unclosed\n")
    with pytest.raises(ReportError, match="bad.yaml: not valid YAML"):
        reports.load_templates(tmp_path)


def test_site_templates_replace_shipped_ones_and_broken_ones_are_skipped_with_a_reason(
        tmp_path):
    (tmp_path / "cr.yaml").write_text(
        "id: cr-chest\ntitle: Site CXR\nmatch: {modalities: [CR]}\n"
        "fields: [{key: tb, label: TB signs, type: choice, options: [none, possible]}]\n")
    (tmp_path / "zz.yaml").write_text("id: zz\nfields: [{key: a, type: aspects}]\n")
    problems: list[str] = []
    templates = reports.load_templates(tmp_path, problems)
    assert templates["cr-chest"].title == "Site CXR" and "ct-head-stroke" in templates
    assert "zz" not in templates and len(problems) == 1 and "exactly 10 regions" in problems[0]


def test_aspects_score_in_the_signed_text():
    t = TEMPLATES["ct-head-stroke"]
    text = reports.render_text(t, {"haemorrhage": "absent", "aspects": ["C", "M3"]}, "", "x")
    assert "ASPECTS: 8/10 (early ischaemic change: C caudate, M3 posterior MCA cortex)" in text
    text = reports.render_text(t, {"aspects": []}, "", "x")
    assert "ASPECTS: 10/10 (no early ischaemic change)" in text


# -- states -----------------------------------------------------------------------------------
def test_draft_autosave_and_a_stale_tab_gets_a_conflict(setup):
    _site, conn, study_uid = setup
    rid = _draft(conn, study_uid)
    assert _fill(conn, rid, 0) == 1
    assert _fill(conn, rid, 1, impression="Bleed, 12 ml.") == 2
    with pytest.raises(ReportError, match="changed since you opened it") as e:
        _fill(conn, rid, 1, impression="older tab")
    assert e.value.status == 409
    assert reports.get_report(conn, rid)["impression"] == "Bleed, 12 ml."


def test_switching_template_keeps_the_answers_that_fit(setup):
    _site, conn, study_uid = setup
    rid = _draft(conn, study_uid)
    _fill(conn, rid, 0, fields={"haemorrhage": "absent", "aspects": ["C"]})
    reports.autosave(conn, rid, actor="dr.ray", templates=TEMPLATES, base_revision=1,
                     template_id="generic", fields={"haemorrhage": "absent", "aspects": ["C"]})
    report = reports.get_report(conn, rid)
    assert (report["template_id"], report["fields"]) == ("generic", {})
    assert report["impression"] == "Acute intracerebral haemorrhage."  # free text stays


def test_bad_input_is_refused_and_changes_nothing(setup):
    _site, conn, study_uid = setup
    rid = _draft(conn, study_uid)
    _fill(conn, rid, 0)
    before = reports.get_report(conn, rid)
    for fields, message in (({"haemorrhage": "maybe"}, "is not one of"),
                            ({"no_such": "x"}, "unknown field"),
                            ({"aspects": ["M9"]}, "expected a list of regions")):
        with pytest.raises(ReportError, match=message):
            _fill(conn, rid, 1, fields=fields)
    with pytest.raises(ReportError, match="at most 20000"):
        _fill(conn, rid, 1, findings="x" * 20_001)
    assert reports.get_report(conn, rid) == before
    with pytest.raises(ReportError, match="no study"):
        _draft(conn, "1.2.3.4")


def test_preliminary_then_final_locks_the_text(setup):
    _site, conn, study_uid = setup
    rid = _draft(conn, study_uid)
    with pytest.raises(ReportError, match="fill in before signing: Intracranial haemorrhage"):
        reports.sign(conn, rid, actor="dr.ray", level="final", templates=TEMPLATES)
    _fill(conn, rid, 0)
    prelim = reports.sign(conn, rid, actor="dr.ray", level="preliminary", templates=TEMPLATES,
                          now=T0 + 20)
    with pytest.raises(ReportError, match="already signed preliminary"):
        reports.sign(conn, rid, actor="dr.ray", level="preliminary", templates=TEMPLATES)
    _fill(conn, rid, 1, impression="Acute haemorrhage, 12 ml, no midline shift.")  # towards final
    final = reports.sign(conn, rid, actor="dr.ray", level="final", templates=TEMPLATES,
                         now=T0 + 30)

    v1, v2 = reports.versions(conn, rid)
    assert (v1["id"], v1["level"], v1["signed_by"], v1["signer_name"], v1["signed_at"]) == (
        prelim, "preliminary", "dr.ray", "Dr Ray Osei", T0 + 20)
    assert "Acute intracerebral haemorrhage." in v1["text"]  # what was signed stays as signed
    assert (v2["id"], v2["level"], v2["signed_at"]) == (final, "final", T0 + 30)
    assert "12 ml, no midline shift" in v2["text"]
    assert reports.get_report(conn, rid)["status"] == "final"

    with pytest.raises(ReportError, match="already signed final") as e:
        reports.sign(conn, rid, actor="dr.ray", level="final", templates=TEMPLATES)
    assert e.value.status == 409
    with pytest.raises(ReportError, match="final and locked"):
        _fill(conn, rid, 2, impression="changed")
    # Not even SQL can change a final report or a signed version.
    with pytest.raises(sqlite3.IntegrityError, match="final report is locked"):
        conn.execute("UPDATE reports SET impression = 'x' WHERE id = ?", (rid,))
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE report_versions SET text = 'x' WHERE id = ?", (final,))
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM report_versions WHERE id = ?", (prelim,))
    with pytest.raises(sqlite3.IntegrityError, match="cannot be deleted"):
        conn.execute("DELETE FROM reports WHERE id = ?", (rid,))
    assert reports.final_version(conn, rid)["text"] == v2["text"]


def test_addendum_is_a_new_linked_report_signed_final(setup):
    _site, conn, study_uid = setup
    rid = _draft(conn, study_uid)
    _fill(conn, rid, 0)
    with pytest.raises(ReportError, match="only a final report takes addenda"):
        reports.add_addendum(conn, rid, actor="dr.ray", text="x")
    reports.sign(conn, rid, actor="dr.ray", level="final", templates=TEMPLATES)
    original = reports.final_version(conn, rid)

    add = reports.add_addendum(conn, rid, actor="dr.lee", text="Also a small left SDH.")
    row = reports.get_report(conn, add)
    assert (row["kind"], row["parent_id"], row["status"], row["author"]) == (
        "addendum", rid, "draft", "dr.lee")
    with pytest.raises(ReportError, match="signed final only"):
        reports.sign(conn, add, actor="dr.lee", level="preliminary", templates=TEMPLATES)
    reports.sign(conn, add, actor="dr.lee", level="final", templates=TEMPLATES)
    text = reports.final_version(conn, add)["text"]
    assert text.startswith(f"ADDENDUM to report {rid}") and "small left SDH" in text
    assert reports.final_version(conn, rid) == original  # the original is untouched
    assert [a["id"] for a in reports.addenda(conn, rid)] == [add]
    with pytest.raises(ReportError, match="to the original report"):
        reports.add_addendum(conn, add, actor="dr.lee", text="x")


def test_only_the_author_edits_and_signs(setup):
    _site, conn, study_uid = setup
    rid = _draft(conn, study_uid)
    with pytest.raises(ReportError, match="being written by dr.ray") as e:
        _fill(conn, rid, 0, actor="dr.lee")
    assert e.value.status == 403
    _fill(conn, rid, 0)
    with pytest.raises(ReportError, match="being written by dr.ray"):
        reports.sign(conn, rid, actor="dr.lee", level="final", templates=TEMPLATES)


def test_every_report_action_is_audited(setup):
    _site, conn, study_uid = setup
    rid = _draft(conn, study_uid)
    _fill(conn, rid, 0)
    reports.sign(conn, rid, actor="dr.ray", level="preliminary", templates=TEMPLATES)
    reports.sign(conn, rid, actor="dr.ray", level="final", templates=TEMPLATES)
    add = reports.add_addendum(conn, rid, actor="dr.ray", text="Addendum text.")
    reports.sign(conn, add, actor="dr.ray", level="final", templates=TEMPLATES)
    fid = critical_findings.flag(conn, rid, actor="dr.ray", description="Acute haemorrhage",
                                 ack_minutes=15)
    critical_findings.acknowledge(conn, fid, actor="nurse.kim")
    actions = [(r["actor"], r["action"], r["object"]) for r in audit.rows(conn)
               if r["action"].startswith(("report.", "critical."))]
    assert actions == [
        ("dr.ray", "report.create", f"report:{rid}"),
        ("dr.ray", "report.save", f"report:{rid}"),
        ("dr.ray", "report.sign_preliminary", f"report:{rid}"),
        ("dr.ray", "report.sign_final", f"report:{rid}"),
        ("dr.ray", "report.addendum", f"report:{add}"),
        ("dr.ray", "report.sign_final", f"report:{add}"),
        ("dr.ray", "critical.flag", f"critical:{fid}"),
        ("nurse.kim", "critical.acknowledge", f"critical:{fid}"),
    ]
    assert audit.verify(conn)[0]


# -- with the read queue ----------------------------------------------------------------------
def _read_item(site, conn) -> int:
    cfg = site_config(site)
    last = conn.execute("SELECT MAX(last_received) FROM studies").fetchone()[0]
    read_queue.run_once(conn, cfg.workflows_dir, last + 3600, float(cfg["worker"][
        "quiet_period_s"]))
    item_id = conn.execute("SELECT id FROM read_items").fetchone()[0]
    return item_id


def test_signing_moves_the_read_item_and_delivery_completes_it(setup):
    site, conn, study_uid = setup
    cfg = set_reports_config(site, formats="[print]")
    item_id = _read_item(site, conn)
    rid = _draft(conn, study_uid, item_id=item_id)
    assert _draft(conn, study_uid, item_id=item_id) == rid  # one report per read item
    _fill(conn, rid, 0)
    # Nobody claimed the item: signing is refused and nothing was signed.
    with pytest.raises(ReportError) as e:
        report_delivery.sign(conn, cfg, rid, actor="dr.ray", level="preliminary",
                             templates=TEMPLATES, now=T0 + 20)
    assert e.value.status in (403, 409)
    assert reports.versions(conn, rid) == [] and reports.get_report(conn, rid)["status"] == "draft"

    worklist.claim(conn, item_id, "dr.ray", T0 + 15)
    report_delivery.sign(conn, cfg, rid, actor="dr.ray", level="preliminary",
                         templates=TEMPLATES, now=T0 + 20)
    assert worklist.get_item(conn, item_id)["state"] == "preliminary"
    report_delivery.sign(conn, cfg, rid, actor="dr.ray", level="final", templates=TEMPLATES,
                         now=T0 + 30)
    assert worklist.get_item(conn, item_id)["state"] == "final"
    assert [d["format"] for d in report_delivery.for_item(conn, item_id)] == ["print"]

    assert report_delivery.run_due(cfg, now=T0 + 31) == {"delivered": 1, "failed": 0}
    assert worklist.get_item(conn, item_id)["state"] == "delivered"
    assert list((site.data_dir / "reports" / "print").glob("*.pdf"))


# -- critical findings --------------------------------------------------------------------------
def _inbox(conn, user):
    from appliance.core import notifications

    return [n["subject"] for n in notifications.inbox(conn, user)]


def test_critical_finding_reaches_site_staff_and_is_acknowledged_once(setup):
    _site, conn, study_uid = setup
    rid = _draft(conn, study_uid)
    with pytest.raises(ReportError, match="only the reporting reader"):
        critical_findings.flag(conn, rid, actor="dr.lee", description="bleed", ack_minutes=15)
    fid = critical_findings.flag(conn, rid, actor="dr.ray", ack_minutes=15, now=T0,
                                 description="Acute left ICH with 6 mm midline shift")
    for staff in ("nurse.kim", "nurse.ali"):
        assert _inbox(conn, staff) == ["Critical finding: acknowledge now on /critical"]
    assert [f["id"] for f in critical_findings.listing(conn, open_only=True)] == [fid]

    critical_findings.acknowledge(conn, fid, actor="nurse.ali", note="Told Dr Obi", now=T0 + 90)
    row = critical_findings.get(conn, fid)
    assert (row["acknowledged_by"], row["acknowledged_at"], row["ack_note"]) == (
        "nurse.ali", T0 + 90, "Told Dr Obi")
    assert critical_findings.listing(conn, open_only=True) == []
    assert "Critical finding acknowledged by nurse.ali" in _inbox(conn, "dr.ray")
    with pytest.raises(ReportError, match="already acknowledged by nurse.ali") as e:
        critical_findings.acknowledge(conn, fid, actor="nurse.kim", now=T0 + 100)
    assert e.value.status == 409
    with pytest.raises(sqlite3.IntegrityError, match="cannot be changed"):
        conn.execute("UPDATE critical_findings SET acknowledged_by = 'x' WHERE id = ?", (fid,))


def test_unacknowledged_critical_finding_escalates_on_a_fake_clock(setup):
    site, conn, study_uid = setup
    cfg = set_reports_config(site, critical_ack_minutes=10)
    item_id = _read_item(site, conn)
    # The workflow ladder's on-call people hear about it too.
    conn.execute("INSERT OR REPLACE INTO escalation_steps (item_id, step_index, action, target,"
                 " fire_at) VALUES (?, 99, 'notify_on_call', '{\"users\": [\"dr.lee\"]}', ?)",
                 (item_id, T0 + 1e9))
    rid = _draft(conn, study_uid, item_id=item_id)
    fid = critical_findings.flag(conn, rid, actor="dr.ray", description="Tension pneumothorax",
                                 ack_minutes=10, now=T0)
    assert critical_findings.escalate_due(conn, cfg, now=T0 + 599) == 0
    assert critical_findings.escalate_due(conn, cfg, now=T0 + 600) == 1
    assert critical_findings.escalate_due(conn, cfg, now=T0 + 600) == 0  # once per level
    row = critical_findings.get(conn, fid)
    assert (row["escalation_level"], row["next_escalation_at"]) == (1, T0 + 1200)
    subject = "UNACKNOWLEDGED critical finding (10 min): acknowledge on /critical"
    for person in ("nurse.kim", "resp.jo", "admin", "dr.lee"):
        assert subject in _inbox(conn, person), person

    report_delivery.sweep(cfg, now=T0 + 1200)  # the worker's sweep runs the same step
    assert critical_findings.get(conn, fid)["escalation_level"] == 2
    critical_findings.acknowledge(conn, fid, actor="nurse.kim", now=T0 + 1300)
    assert critical_findings.escalate_due(conn, cfg, now=T0 + 99_999) == 0
    levels = [r["detail"]["level"] for r in audit.rows(conn) if r["action"] == "critical.escalate"]
    assert levels == [1, 2]


def test_pdf_embeds_a_unicode_font_only_when_the_text_needs_it():
    from appliance.reports import documents as report_documents

    def doc(name: str):
        version = {"text": "CT HEAD\n\nIMPRESSION\nNo bleed.\n", "level": "final",
                   "signer_name": "Dr Ray Osei", "signed_at": T0, "sha256": "ab" * 32}
        return report_documents.SignedReport(
            version=version, report={"id": 1, "kind": "report", "study_uid": "1.2.3"},
            study={"patient_name": name, "patient_id": "P1", "study_description": "CT HEAD"},
            site_name="Field site", series_uid="", sop_uid="")

    latin = report_documents.render_pdf(doc("MÜLLER^JOSÉ"))
    assert latin.startswith(b"%PDF-") and b"DejaVu" not in latin
    if (report_documents.FONT_DIR / "DejaVuSans.ttf").exists():
        cyrillic = report_documents.render_pdf(doc("ИВАНОВА^АННА"))
        assert cyrillic.startswith(b"%PDF-") and b"DejaVu" in cyrillic
