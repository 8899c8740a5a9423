"""The report pages through Flask's test client: editor, autosave with CSRF, signing,
critical findings acknowledged by site staff, printable page and PDF, who may do what."""

from __future__ import annotations

import json
import re

import pytest
from reporting_site import ingest_study
from test_auth import HTML, PASSWORD, AuthApp, login, make_auth_app

from appliance.core import config, db
from appliance.reading import read_queue, worklist
from appliance.reports import delivery as report_delivery

JSON = {"Accept": "application/json"}


@pytest.fixture
def web(tmp_path):
    a = make_auth_app(tmp_path, yaml_edit=lambda t: t.replace("formats: [sr]", "formats: [print]"))
    for name, role in (("dr.ray", "radiologist"), ("dr.lee", "radiologist"),
                       ("nurse.kim", "site_staff")):
        a.add_user(name, role, display_name={"dr.ray": "Dr Ray Osei"}.get(name, name))
    study_uid = ingest_study(a, 2, study_description="CT HEAD STROKE", patient_id="P-9",
                             patient_name="MOYO^TANDI", accession="A-9")
    conn = a.db()
    cfg = config.load(a.data_dir)
    read_queue.run_once(conn, cfg.workflows_dir, a.clock() - 60, 30.0)
    item_id = conn.execute("SELECT id FROM read_items").fetchone()[0]
    conn.close()
    return a, item_id, study_uid


def _client(a: AuthApp, user: str):
    c = a.client()
    login(a, c, user, PASSWORD)
    return c


def _csrf(client, path: str) -> str:
    page = client.get(path, headers=HTML).get_data(as_text=True)
    return re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)


def _claim(a, client, item_id):
    token = _csrf(client, "/worklist")
    r = client.post(f"/worklist/{item_id}/claim", headers={**JSON, "X-CSRF-Token": token})
    assert r.status_code == 200, r.get_data(as_text=True)
    return token


def _open_report(a, client, item_id) -> int:
    r = client.get(f"/reports/item/{item_id}", headers=HTML)
    assert r.status_code == 302, r.get_data(as_text=True)
    return int(r.headers["Location"].rsplit("/", 1)[1])


def test_report_journey_through_the_pages(web):
    a, item_id, study_uid = web
    ray = _client(a, "dr.ray")
    # Not claimed yet: no draft is started for this reader.
    assert ray.get(f"/reports/item/{item_id}", headers=HTML).status_code == 409
    token = _claim(a, ray, item_id)
    rid = _open_report(a, ray, item_id)
    page = ray.get(f"/reports/{rid}", headers=HTML).get_data(as_text=True)
    assert "MOYO TANDI" in page and 'data-testid="region-M6"' in page  # the stroke template
    assert 'data-testid="template-select"' in page

    body = {"revision": 0, "fields": {"haemorrhage": "absent", "aspects": ["M1"]},
            "findings": "Subtle hypodensity of the left M1 cortex.", "impression": "ASPECTS 9."}
    # Without the CSRF header the save is refused and nothing changes.
    r = ray.post(f"/reports/{rid}/autosave", json=body, headers=JSON)
    assert r.status_code == 400 and "CSRF" in r.get_json()["error"]
    r = ray.post(f"/reports/{rid}/autosave", json=body, headers={**JSON, "X-CSRF-Token": token})
    assert r.status_code == 200 and r.get_json()["revision"] == 1
    r = ray.post(f"/reports/{rid}/autosave", json={**body, "revision": 1,
                                                   "fields": {"haemorrhage": "huge"}},
                 headers={**JSON, "X-CSRF-Token": token})
    assert r.status_code == 400 and "is not one of" in r.get_json()["error"]
    r = ray.post(f"/reports/{rid}/autosave", json=body, headers={**JSON, "X-CSRF-Token": token})
    assert r.status_code == 409  # a stale revision (another tab) is a conflict

    # Sign what this page saved: a wrong revision is refused.
    r = ray.post(f"/reports/{rid}/sign", json={"level": "final", "revision": 0},
                 headers={**JSON, "X-CSRF-Token": token})
    assert r.status_code == 409
    r = ray.post(f"/reports/{rid}/sign", json={"level": "preliminary", "revision": 1},
                 headers={**JSON, "X-CSRF-Token": token})
    assert r.get_json() == {"version_id": 1, "status": "preliminary"}
    r = ray.post(f"/reports/{rid}/critical", data={"description": "Early left MCA infarct",
                                                  "csrf_token": token}, headers=HTML)
    assert r.status_code == 302
    r = ray.post(f"/reports/{rid}/sign", json={"level": "final", "revision": 1},
                 headers={**JSON, "X-CSRF-Token": token})
    assert r.get_json()["status"] == "final"
    r = ray.post(f"/reports/{rid}/sign", json={"level": "final"},
                 headers={**JSON, "X-CSRF-Token": token})
    assert r.status_code == 409 and "already signed final" in r.get_json()["error"]

    conn = a.db()
    assert worklist.get_item(conn, item_id)["state"] == "final"
    report_delivery.run_due(config.load(a.data_dir), now=a.clock(), conn=conn)
    assert worklist.get_item(conn, item_id)["state"] == "delivered"
    page = ray.get(f"/reports/{rid}", headers=HTML).get_data(as_text=True)
    assert 'data-testid="signed-text"' in page and "ASPECTS: 9/10" in page
    assert 'id="report-editor"' not in page  # locked: no editor any more
    assert re.search(r'data-testid="delivery-print">.*?<td>delivered</td>', page, re.S)
    assert 'data-testid="item-state">delivered<' in page

    # Site staff: the critical finding, acknowledged once, with who and when.
    kim = _client(a, "nurse.kim")
    crit = kim.get("/critical", headers=HTML).get_data(as_text=True)
    assert "Early left MCA infarct" in crit and "MOYO TANDI" in crit
    fid = int(re.search(r'id="finding-(\d+)"', crit).group(1))
    ktoken = re.search(r'name="csrf_token" value="([^"]+)"', crit).group(1)
    assert kim.get("/critical/open", headers=JSON).get_json() == {"open": [fid]}
    r = kim.post(f"/critical/{fid}/acknowledge", data={"note": "told Dr Obi",
                                                       "csrf_token": ktoken}, headers=HTML)
    assert r.status_code == 302
    crit = kim.get("/critical", headers=HTML).get_data(as_text=True)
    assert re.search(r'data-testid="acknowledged">nurse.kim · ', crit)
    r = kim.post(f"/critical/{fid}/acknowledge", data={"csrf_token": ktoken}, headers=JSON)
    assert r.status_code == 409
    assert kim.get("/critical/open", headers=JSON).get_json() == {"open": []}

    results = kim.get("/reports", headers=HTML).get_data(as_text=True)
    assert results.count('data-testid="report-row"') == 1 and "⚠ acknowledged" in results
    assert 'href="/critical"' in results and 'href="/reports"' in results  # in the navigation

    # Paper: a printable page with print CSS, and a PDF.
    printed = kim.get(f"/reports/{rid}/print", headers=HTML).get_data(as_text=True)
    assert "@media print" in printed and "Subtle hypodensity" in printed
    assert "Signed <b>final</b> by <b>Dr Ray Osei</b>" in printed
    r = kim.get(f"/reports/{rid}.pdf")
    assert r.mimetype == "application/pdf" and r.data.startswith(b"%PDF-")

    # Addendum from the page.
    r = ray.post(f"/reports/{rid}/addendum", data={"text": "Also: old right PCA infarct.",
                                                   "csrf_token": token}, headers=HTML)
    add_id = int(r.headers["Location"].rsplit("/", 1)[1])
    r = ray.post(f"/reports/{add_id}/sign", json={"level": "final"},
                 headers={**JSON, "X-CSRF-Token": token})
    assert r.status_code == 200
    printed = kim.get(f"/reports/{rid}/print", headers=HTML).get_data(as_text=True)
    assert f"ADDENDUM to report {rid}" in printed

    actions = [r[0] for r in conn.execute(
        "SELECT action FROM audit WHERE action LIKE 'report.%' OR action LIKE 'critical.%'")]
    for action in ("report.create", "report.save", "report.view", "report.sign_preliminary",
                   "report.sign_final", "critical.flag", "critical.view", "critical.acknowledge",
                   "report.print", "report.pdf", "report.addendum", "report.deliver"):
        assert action in actions, action
    conn.close()


def test_who_may_do_what_on_reports(web):
    a, item_id, _study = web
    ray = _client(a, "dr.ray")
    token = _claim(a, ray, item_id)
    rid = _open_report(a, ray, item_id)

    lee = _client(a, "dr.lee")
    ltoken = _csrf(lee, "/worklist")
    r = lee.post(f"/reports/{rid}/autosave", json={"revision": 0, "findings": "mine now"},
                 headers={**JSON, "X-CSRF-Token": ltoken})
    assert r.status_code == 403 and "being written by dr.ray" in r.get_json()["error"]
    assert lee.get(f"/reports/{rid}", headers=HTML).status_code == 200  # may read, not edit
    assert 'id="report-editor"' not in lee.get(f"/reports/{rid}",
                                               headers=HTML).get_data(as_text=True)

    kim = _client(a, "nurse.kim")
    ktoken = _csrf(kim, "/critical")
    assert kim.get(f"/reports/{rid}", headers=HTML).status_code == 403  # a draft is not a result
    for path, data in ((f"/reports/{rid}/autosave", {"revision": 0}),
                       (f"/reports/{rid}/sign", {"level": "final"}),
                       (f"/reports/{rid}/critical", {"description": "x"})):
        assert kim.post(path, json=data, headers={**JSON, "X-CSRF-Token": ktoken}
                        ).status_code == 403
    assert ray.post("/critical/1/acknowledge", json={}, headers={
        **JSON, "X-CSRF-Token": token}).status_code == 403
    # A reader outside the item's pool reads the report only through break-glass, audited.
    a.add_user("dr.neuro", "neurologist")
    conn = a.db()
    conn.execute("UPDATE read_items SET pool_roles = 'radiologist' WHERE id = ?", (item_id,))
    conn.close()
    neuro = _client(a, "dr.neuro")
    r = neuro.get(f"/reports/{rid}", headers=JSON)
    assert r.status_code == 403 and "break-glass" in r.get_json()["error"]
    ntoken = _csrf(neuro, f"/break-glass?study={_study}")
    r = neuro.post("/break-glass", data={"study": _study, "reason": "Stroke consult requested",
                                         "next": f"/reports/{rid}", "csrf_token": ntoken},
                   headers=HTML)
    assert r.status_code == 302 and r.headers["Location"] == f"/reports/{rid}"
    assert neuro.get(f"/reports/{rid}", headers=HTML).status_code == 200
    assert neuro.get("/critical", headers=HTML).status_code == 403  # the site's list
    admin = a.client()
    assert admin.get(f"/reports/{rid}", headers=JSON).status_code == 401
    conn = db.connect(a.data_dir / "appliance.db")
    assert conn.execute("SELECT revision FROM reports WHERE id = ?", (rid,)).fetchone()[0] == 0
    conn.close()


def test_next_reader_takes_over_a_released_draft_and_broken_site_templates_are_named(web):
    a, item_id, _study = web
    (a.data_dir / "report_templates").mkdir()
    (a.data_dir / "report_templates" / "broken.yaml").write_text("id: x\nfields: [{key: y}]\n")
    ray = _client(a, "dr.ray")
    token = _claim(a, ray, item_id)
    rid = _open_report(a, ray, item_id)
    r = ray.post(f"/reports/{rid}/autosave", json={"revision": 0, "findings": "Started."},
                 headers={**JSON, "X-CSRF-Token": token})
    assert r.status_code == 200
    r = ray.post(f"/worklist/{item_id}/release", json={}, headers={**JSON, "X-CSRF-Token": token})
    assert r.status_code == 200

    lee = _client(a, "dr.lee")
    ltoken = _claim(a, lee, item_id)
    assert _open_report(a, lee, item_id) == rid
    page = lee.get(f"/reports/{rid}", headers=HTML).get_data(as_text=True)
    assert 'id="report-editor"' in page and "Started." in page
    assert re.search(r'data-testid="template-problem">Site template skipped: .*broken.yaml', page)
    r = lee.post(f"/reports/{rid}/autosave", json={"revision": 2, "findings": "Taken over."},
                 headers={**JSON, "X-CSRF-Token": ltoken})
    assert r.status_code == 200
    r = ray.post(f"/reports/{rid}/autosave", json={"revision": 3, "findings": "mine"},
                 headers={**JSON, "X-CSRF-Token": token})
    assert r.status_code == 403
    conn = a.db()
    moves = [json.loads(r[0]) for r in conn.execute(
        "SELECT detail FROM audit WHERE action = 'report.take_over'")]
    conn.close()
    assert moves == [{"from": "dr.ray", "study_uid": _study}]


def test_report_page_says_images_are_still_arriving(web):
    a, item_id, _study_uid = web
    conn = a.db()
    conn.execute("UPDATE read_items SET arriving = 1 WHERE id = ?", (item_id,))
    conn.commit()
    ray = _client(a, "dr.ray")
    _claim(a, ray, item_id)  # a STAT study may be claimed and reported while it arrives
    rid = _open_report(a, ray, item_id)
    page = ray.get(f"/reports/{rid}", headers=HTML).get_data(as_text=True)
    assert 'data-testid="arriving"' in page and "Images are still arriving" in page
    conn.execute("UPDATE read_items SET arriving = 0 WHERE id = ?", (item_id,))
    conn.commit()
    conn.close()
    assert 'data-testid="arriving"' not in ray.get(f"/reports/{rid}", headers=HTML).get_data(
        as_text=True)
