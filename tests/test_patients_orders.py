"""Orders meet studies: a scanner takes its patient from the worklist (dcmtk findscu -W),
pushes the study with those values (storescu), and the study is linked to its order; the
reader sees the reason for exam and clinical details on the report page (Chromium against
the real ``appliance web``).  A scanner that ignored the worklist and typed a misspelt name
is flagged "disagrees with the order", and a study with no order "unordered", on the desk.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time

import pydicom
from conftest import require_tool
from dicom_data import write_series
from test_e2e_reports import CHROMIUM_ARGS, PASSWORD, _sign_in

from appliance.accounts import users as accounts
from appliance.core import config, db
from appliance.patients import registry, studies
from appliance.reading import read_queue, worklist

NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def _push(site, dcmtk, paths) -> None:
    r = subprocess.run([dcmtk["storescu"], "-aet", "CT1", "-aec", site.ae_title, "127.0.0.1",
                        str(site.dicom_port), *map(str, paths)], capture_output=True,
                       text=True, timeout=60, env=NODELAY)
    assert r.returncode == 0, r.stderr


def test_study_from_the_worklist_is_linked_and_the_reader_sees_the_reason(
        dicom_site, dcmtk, artifacts, tmp_path):
    chromium = require_tool("chromium", "/usr/bin/chromium")
    from playwright import sync_api

    site = dicom_site
    config.edit_known_aes(site.data_dir, lambda items: items.append(
        {"name": "CT1", "worklist": True}))
    cfg = config.load(site.data_dir)
    desk = registry.Site.from_config(cfg)
    conn = db.open_db(cfg.db_path)
    patient = registry.register(conn, desk, actor="desk", name="Okafor^Ada", birth="1970-01-01",
                                sex_code="F")
    order = registry.add_order(conn, desk, patient["id"], actor="desk", procedure="CTHEAD",
                               priority="STAT", station_ae="CT1",
                               reason="Head injury, GCS 13 after a fall",
                               clinical_details="On warfarin; vomited twice",
                               scheduled=dt.datetime.now())
    typo = registry.register(conn, desk, actor="desk", name="Mensah^Kofi", birth="1970-01-01",
                             sex_code="F")
    typo_order = registry.add_order(conn, desk, typo["id"], actor="desk", procedure="CTCHEST",
                                    station_ae="CT1")
    accounts.add_user(conn, "drgrey", "radiologist", PASSWORD)
    accounts.add_user(conn, "desk.amy", "site_staff", PASSWORD)
    conn.close()

    # The scanner asks its worklist and takes the patient from it.
    out = tmp_path / "mwl"
    out.mkdir()
    subprocess.run(["findscu", "-W", "-aet", "CT1", "-aec", site.ae_title, "-X", "-od", str(out),
                    "-k", "PatientName", "-k", "PatientID", "-k", "AccessionNumber",
                    "-k", "StudyInstanceUID", "-k", f"AccessionNumber={order['accession']}",
                    "127.0.0.1", str(site.dicom_port)], check=True, timeout=60, env=NODELAY)
    (answer,) = [pydicom.dcmread(p) for p in out.iterdir()]
    linked_uid, _, paths = write_series(
        tmp_path / "ct", 3, study_uid=str(answer.StudyInstanceUID),
        patient_name=str(answer.PatientName), patient_id=str(answer.PatientID),
        accession=str(answer.AccessionNumber), study_description="CT HEAD")
    _push(site, dcmtk, paths)
    # A scanner that ignored the worklist: its accession typed right, the name misspelt.
    typo_uid, _, paths = write_series(tmp_path / "typo", 2, patient_name="MENSA^KOFI",
                                      patient_id=typo["patient_id"],
                                      accession=typo_order["accession"])
    _push(site, dcmtk, paths)
    stray_uid, _, paths = write_series(tmp_path / "stray", 2, patient_name="WHO^KNOWS",
                                       patient_id="X1", accession="")
    _push(site, dcmtk, paths)

    counts = studies.sweep(cfg)
    assert counts == {"linked": 1, "mismatch": 1, "unordered": 1}
    assert studies.sweep(cfg) == {"linked": 0, "mismatch": 0, "unordered": 0}  # idempotent
    conn = db.connect(cfg.db_path)
    assert studies.study_order(conn, linked_uid)["flag"] == "linked"
    mismatch = studies.study_order(conn, typo_uid)
    assert mismatch["flag"] == "mismatch"
    assert mismatch["differences"] == {"patient_name": ["MENSA^KOFI", "MENSAH^KOFI"]}
    assert studies.study_order(conn, stray_uid)["flag"] == "unordered"
    conn.close()
    read_queue.sweep(cfg, now=time.time() + cfg["worker"]["quiet_period_s"] + 1)
    conn = db.connect(cfg.db_path)
    item = worklist.item_for_study(conn, linked_uid)
    typo_item = worklist.item_for_study(conn, typo_uid)
    conn.close()

    site.start("web", wait_port=site.web_port)
    base = f"https://127.0.0.1:{site.web_port}"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(ignore_https_errors=True,
                                       viewport={"width": 1300, "height": 900}).new_page()
            _sign_in(page, base, "drgrey", totp=True)
            for it in (item, typo_item):
                r = page.request.post(f"{base}/api/v1/worklist/items/{it['id']}/claim",
                                      headers={"X-CSRF-Token": page.locator(
                                          "meta[name=csrf-token]").get_attribute("content")})
                assert r.status == 200, r.text()
            page.goto(base + f"/reports/item/{item['id']}")
            page.wait_for_selector("[data-testid=order]")
            assert page.inner_text("[data-testid=order-reason]") == \
                "Head injury, GCS 13 after a fall"
            assert page.inner_text("[data-testid=order-clinical]") == "On warfarin; vomited twice"
            assert page.locator("[data-testid=order-flag]").count() == 0
            page.screenshot(path=str(artifacts / "report-order-reason.png"), full_page=True)
            page.goto(base + f"/reports/item/{typo_item['id']}")
            assert "disagree with the order" in page.inner_text("[data-testid=order-flag]")

            staff = browser.new_context(ignore_https_errors=True).new_page()
            _sign_in(staff, base, "desk.amy", totp=False)
            staff.goto(base + "/patients")
            rows = staff.locator("tr[data-testid=flagged-row]")
            assert rows.count() == 2
            text = staff.inner_text("[data-testid=flagged]")
            assert "unordered" in text and "MENSA^KOFI (order: MENSAH^KOFI)" in text
            staff.screenshot(path=str(artifacts / "desk-flagged.png"), full_page=True)
        finally:
            browser.close()
