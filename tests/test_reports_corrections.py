"""A final report superseded by an identity correction: marked, and shown where people look.

One trauma identity with a signed final report, linked to the real patient, unlinked, linked
again, through the reconciliation functions the desk and the CLI call (real study store,
real report signatures and delivery outbox).  Each correction is a signed addendum and leaves
an append-only mark on what it supersedes, in the link's transaction; the newest correction
wins.  Read through Flask's test client with signed-in users (the report page and its banner,
the JSON API, the list, the printable page, an outsider refused and audited) and through the
CLI (``patient show``, ``reports deliveries``).  A replayed link marks nothing.
"""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
from reporting_site import ingest_study
from test_auth import HTML, PASSWORD, AuthApp, login, make_auth_app
from test_patients import _cli

from appliance.core import config, db
from appliance.patients import reconciliation, registry
from appliance.reports import corrections
from appliance.reports import delivery as report_delivery
from appliance.reports import model as reports

JSON = {"Accept": "application/json"}


@pytest.fixture
def world(tmp_path):
    a = make_auth_app(tmp_path, yaml_edit=lambda t: t.replace("formats: [sr]", "formats: [print]"))
    for name, role, tags in (("dr.ray", "radiologist", ""), ("nurse.kim", "site_staff", ""),
                             ("nurse.out", "site_staff", "site:Other Hospital")):
        a.add_user(name, role, tags=tags)
    cfg = config.load(a.data_dir)
    conn = db.open_db(cfg.db_path)
    desk = registry.Site.from_config(cfg)
    temp = registry.register_trauma(conn, desk, actor="desk", sex_code="F", age_band="adult")
    registry.register(conn, desk, actor="desk", name="Moyo^Tandi", patient_id="MRN-7",
                      birth="1970-01-01", sex_code="F")
    study = ingest_study(a, 2, patient_id=temp["patient_id"], patient_name=temp["name"],
                         accession="T-1")
    rid = _sign(conn, cfg, study)
    yield a, cfg, conn, temp["patient_id"], rid
    conn.close()


def _sign(conn: sqlite3.Connection, cfg: config.Config, study_uid: str) -> int:
    templates = reports.load_templates()
    rid = reports.create(conn, study_uid=study_uid, author="dr.ray", template_id="generic",
                         templates=templates)
    reports.autosave(conn, rid, actor="dr.ray", templates=templates, base_revision=0,
                     findings="Small left frontal contusion.", impression="Contusion.")
    report_delivery.sign(conn, cfg, rid, actor="dr.ray", level="final", templates=templates)
    return rid


def _client(a: AuthApp, user: str):
    c = a.client()
    login(a, c, user, PASSWORD)
    return c


def _marks(conn: sqlite3.Connection) -> list[tuple]:
    return [tuple(r) for r in conn.execute(
        "SELECT report_id, addendum_id, link_id, action, patient_id FROM report_supersessions"
        " ORDER BY id")]


def _banner(page: str) -> str | None:
    m = re.search(r'data-testid="superseded-banner".*?</section>', page, re.S)
    return m.group(0) if m else None


def _link(cfg, conn, temp: str) -> dict:
    return reconciliation.link(cfg, conn, temp, "MRN-7", actor="desk", reason="family")


def test_link_marks_the_original_and_every_reader_sees_it(world):
    a, cfg, conn, temp, rid = world
    signed = dict(conn.execute("SELECT * FROM reports WHERE id = ?", (rid,)).fetchone())
    result = _link(cfg, conn, temp)
    (add,) = result["reports_reissued"]
    assert _marks(conn) == [(rid, add, result["link"], "link", "MRN-7")]
    # The signed report itself is untouched (its row is locked); the addendum is signed final.
    assert dict(conn.execute("SELECT * FROM reports WHERE id = ?", (rid,)).fetchone()) == signed
    assert reports.get_report(conn, add)["status"] == "final"
    audit = conn.execute("SELECT actor, detail FROM audit WHERE action = 'report.superseded'"
                         " AND object = ?", (f"report:{rid}",)).fetchall()
    assert [(r[0], json.loads(r[1])["by_addendum"]) for r in audit] == [("desk", add)]

    kim = _client(a, "nurse.kim")
    page = kim.get(f"/reports/{rid}", headers=HTML).get_data(as_text=True)
    banner = _banner(page)
    assert banner and f'href="/reports/{add}"' in banner
    assert "Superseded by the identity correction of" in banner
    assert f"(<a href=\"/reports/{add}\" data-testid=\"superseded-link\">addendum {add}</a>)" \
        in banner and "the patient is now MRN-7 (MOYO TANDI)" in banner
    assert _banner(kim.get(f"/reports/{add}", headers=HTML).get_data(as_text=True)) is None

    body = kim.get(f"/api/v1/reports/{rid}", headers=JSON).get_json()
    assert body["status"] == "final" and body["versions"][0]["level"] == "final"
    assert {k: body["superseded_by"][k] for k in ("addendum_id", "link_id", "action",
                                                  "patient_id", "by")} == \
        {"addendum_id": add, "link_id": result["link"], "action": "link",
         "patient_id": "MRN-7", "by": "desk"}
    assert kim.get(f"/api/v1/reports/{add}", headers=JSON).get_json()["superseded_by"] is None
    assert re.search(rf'data-testid="superseded-{rid}">superseded by addendum {add}<',
                     kim.get("/reports", headers=HTML).get_data(as_text=True))
    printed = kim.get(f"/reports/{rid}/print", headers=HTML).get_data(as_text=True)
    assert 'data-testid="print-superseded"' in printed and f"(addendum {add})" in printed
    views = conn.execute("SELECT count(*) FROM audit WHERE action = 'report.view' AND"
                         " actor = 'nurse.kim' AND object = ?", (f"report:{rid}",)).fetchone()[0]
    assert views == 2  # the page and the JSON, each audited

    # Another site's staff: refused by the one permission function, audited, nothing shown.
    out = _client(a, "nurse.out")
    r = out.get(f"/api/v1/reports/{rid}", headers=JSON)
    assert r.status_code == 403 and "MRN-7" not in r.get_data(as_text=True)
    assert conn.execute("SELECT count(*) FROM audit WHERE actor = 'nurse.out' AND outcome ="
                        " 'denied' AND action = 'report.view'").fetchone()[0] == 1


def test_a_replayed_link_marks_nothing(world):
    a, cfg, conn, temp, rid = world
    _link(cfg, conn, temp)
    before = (_marks(conn), conn.execute("SELECT count(*) FROM reports").fetchone()[0],
              conn.execute("SELECT count(*) FROM audit").fetchone()[0])
    again = _link(cfg, conn, temp)
    assert again["replayed"] is True
    assert (_marks(conn), conn.execute("SELECT count(*) FROM reports").fetchone()[0],
            conn.execute("SELECT count(*) FROM audit").fetchone()[0]) == before
    assert len(before[0]) == 1


def test_unlink_and_relink_chain_the_corrections_newest_wins(world, monkeypatch, capsys):
    a, cfg, conn, temp, rid = world
    first = _link(cfg, conn, temp)
    (add1,) = first["reports_reissued"]
    undone = reconciliation.unlink(cfg, conn, temp, actor="desk", reason="wrong family")
    (add2,) = undone["reports_reissued"]
    link = first["link"]
    assert _marks(conn) == [(rid, add1, link, "link", "MRN-7"),
                            (rid, add2, link, "unlink", temp), (add1, add2, link, "unlink", temp)]
    assert "the link was undone" in reports.get_report(conn, add2)["findings"]

    kim = _client(a, "nurse.kim")
    for superseded in (rid, add1):  # the original and the link's correction both point on
        banner = _banner(kim.get(f"/reports/{superseded}", headers=HTML).get_data(as_text=True))
        assert banner and f"addendum {add2}</a>" in banner and f"now {temp}" in banner
    assert _banner(kim.get(f"/reports/{add2}", headers=HTML).get_data(as_text=True)) is None
    page = kim.get(f"/reports/{rid}", headers=HTML).get_data(as_text=True)
    assert re.search(rf'data-testid="addendum-{add1}">.*?superseded by <a href="/reports/'
                     rf'{add2}">', page, re.S)
    assert re.search(rf'data-testid="addendum-{add2}">.*?<b>current</b>', page, re.S)
    body = kim.get(f"/api/v1/reports/{add1}", headers=JSON).get_json()
    assert (body["superseded_by"]["addendum_id"], body["superseded_by"]["action"]) == \
        (add2, "unlink")
    assert [(c["addendum_id"], c["replaced_by"]) for c in body["corrections"]] == \
        [(add1, add2), (add2, None)]

    # Linked again: a third correction, a new link; it supersedes the original and the unlink's.
    again = _link(cfg, conn, temp)
    (add3,) = again["reports_reissued"]
    assert _marks(conn)[3:] == [(rid, add3, again["link"], "link", "MRN-7"),
                                (add2, add3, again["link"], "link", "MRN-7")]
    chain = kim.get(f"/api/v1/reports/{rid}", headers=JSON).get_json()
    assert chain["superseded_by"]["addendum_id"] == add3
    assert [c["replaced_by"] for c in chain["corrections"]] == [add2, add3, None]

    # The CLI: the patient's record lists the reports and what supersedes them.
    code, out, err = _cli(monkeypatch, capsys, a.data_dir, "patient", "show", "MRN-7")
    assert code == 0, err
    assert re.search(rf"report {rid} +final.*\n +superseded by the identity correction of .*"
                     rf"\(addendum {add3}, link #{again['link']}\): the patient is now MRN-7"
                     r" \(MOYO TANDI\)", out), out
    code, out, _ = _cli(monkeypatch, capsys, a.data_dir, "patient", "show", "MRN-7", "--json")
    shown = {r["id"]: r["superseded_by"] for r in json.loads(out)["reports"]}
    assert {k: (v or {}).get("addendum_id") for k, v in shown.items()} == \
        {rid: add3, add1: add3, add2: add3, add3: None}
    code, out, _ = _cli(monkeypatch, capsys, a.data_dir, "reports", "deliveries", "--all",
                        "--json")
    assert {r["report_id"]: r["superseded_by"] for r in json.loads(out)} == \
        {rid: add3, add1: add3, add2: add3, add3: None}
    code, out, _ = _cli(monkeypatch, capsys, a.data_dir, "reports", "deliveries", "--all")
    assert f"report {rid} is superseded by identity correction addendum {add3}" in out
    assert "MRN-7" not in out  # that listing names no patient


def test_the_mark_stands_or_falls_with_the_link(world, monkeypatch):
    """A correction that fails undoes the link's rows with it: never a link without marks."""
    a, cfg, conn, temp, rid = world

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(corrections, "_mark", broken)
    with pytest.raises(sqlite3.OperationalError):
        _link(cfg, conn, temp)
    assert conn.execute("SELECT count(*) FROM patient_links").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM reports WHERE kind = 'addendum'").fetchone()[0] == 0
    assert registry.find(conn, temp)["merged_into"] is None
    assert _marks(conn) == []


def test_marks_are_append_only_and_a_bad_correction_writes_nothing(world):
    a, cfg, conn, temp, rid = world
    _link(cfg, conn, temp)
    for sql in ("UPDATE report_supersessions SET patient_id = 'X'",
                "DELETE FROM report_supersessions"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(sql)
    study = reports.get_report(conn, rid)["study_uid"]
    count = conn.execute("SELECT count(*) FROM reports").fetchone()[0]
    for bad, message in ((corrections.Correction(1, "rename", "MRN-7", "", "x"), "unknown"),
                         (corrections.Correction(1, "link", " ", "", "x"), "names the patient")):
        with pytest.raises(reports.ReportError, match=message):
            corrections.issue(conn, cfg, [study], bad, actor="desk")
    assert conn.execute("SELECT count(*) FROM reports").fetchone()[0] == count
    assert len(_marks(conn)) == 1
