"""End to end in a real browser, the report half of the journey: a stroke CT pushed with
storescu, claimed by a radiologist who signs in with TOTP (chromium via playwright against
``appliance web``), who writes the report from the stroke template, flags a critical finding
and signs final; a site staff user sees and acknowledges the finding; the worker
(``appliance worker``) delivers the SR into the site PACS (Debian's Orthanc).

Screenshots of the report editor, the signed report and the site's critical findings page
go to the test artifacts.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pyotp
from conftest import require_tool
from dicom_data import write_series
from orthanc import orthanc  # noqa: F401  (fixture)
from reporting_site import set_reports_config

from appliance.accounts import users as accounts
from appliance.core import config
from appliance.reading import read_queue, worklist

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PASSWORD = "reader-password-e2e"


def _sign_in(page, base: str, username: str, totp: bool) -> None:
    page.goto(base + "/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    if totp:
        page.wait_for_url(re.compile(r"/login/totp"))
        secret = page.inner_text("[data-testid=totp-secret]").strip()
        page.fill("input[name=code]", pyotp.TOTP(secret).now())
        page.click("form[action='/login/totp'] button[type=submit]")
    page.wait_for_url(lambda url: "/login" not in url)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_reader_reports_flags_and_signs_staff_acknowledge_pacs_receives(
        dicom_site, dcmtk, orthanc, artifacts, tmp_path):  # noqa: F811
    chromium = require_tool("chromium", "/usr/bin/chromium")
    from playwright import sync_api

    site = dicom_site
    site.cli("ae", "add", "SITEPACS", "--host", "127.0.0.1", "--port", str(orthanc.dicom_port),
             check=True)
    set_reports_config(site, deliver_to="SITEPACS", formats="[sr]")
    study_uid, _, paths = write_series(tmp_path / "ct", 6, modality="CT", body_part="HEAD",
                                       patient_name="E2E^REPORT", patient_id="E2E-1",
                                       study_description="CT HEAD STROKE E2E")
    push = subprocess.run([dcmtk["storescu"], "-aec", site.ae_title, "127.0.0.1",
                           str(site.dicom_port), *map(str, paths)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"})
    assert push.returncode == 0, push.stderr
    cfg = config.load(site.data_dir)
    read_queue.sweep(cfg, now=time.time() + cfg["worker"]["quiet_period_s"] + 1)
    conn = site.db()
    accounts.add_user(conn, "drgrey", "radiologist", PASSWORD, display_name="Dr Grey")
    accounts.add_user(conn, "nurse.amy", "site_staff", PASSWORD, display_name="Amy Staff")
    item = worklist.item_for_study(conn, study_uid)
    conn.close()
    site.start("web", wait_port=site.web_port)
    site.start("worker")
    base = f"https://127.0.0.1:{site.web_port}"

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            ctx = browser.new_context(ignore_https_errors=True,
                                      viewport={"width": 1300, "height": 900})
            page = ctx.new_page()
            _sign_in(page, base, "drgrey", totp=True)
            page.goto(base + "/worklist")
            page.locator("tr[data-testid=item] button[data-action=claim]").first.click()
            page.wait_for_function("() => document.querySelector('tr[data-testid=item]')"
                                   ".textContent.includes('claimed · you')", timeout=10000)

            page.goto(base + f"/reports/item/{item['id']}")
            page.wait_for_selector("#report-editor")
            assert page.locator("[data-testid=template-select]").input_value() == "ct-head-stroke"
            # Another template and back: the page saves the choice and shows its fields.
            page.select_option("[data-testid=template-select]", "generic")
            page.wait_for_selector("[data-testid=region-M1]", state="detached")
            page.select_option("[data-testid=template-select]", "ct-head-stroke")
            page.wait_for_selector("[data-testid=region-M1]")
            page.select_option("[data-testid=field-haemorrhage]", "absent")
            page.select_option("[data-testid=field-side]", "left")
            page.check("[data-testid=region-I]")
            page.check("[data-testid=region-M2]")
            assert page.inner_text("[data-testid=aspects-score]") == "8"
            page.fill("[data-testid=findings]", "Loss of the left insular ribbon; M2 cortex "
                      "hypodense. Hyperdense left MCA.")
            page.fill("[data-testid=impression]", "Acute left MCA infarct, ASPECTS 8. "
                      "No haemorrhage: thrombolysis not excluded by CT.")
            page.wait_for_function("() => /^saved \\(revision [1-9]/.test(document"
                                   ".querySelector('[data-testid=save-state]').textContent)",
                                   timeout=10000)
            page.screenshot(path=str(artifacts / "report-editor.png"), full_page=True)

            page.fill("[data-testid=critical-description]", "Acute left MCA infarct within the "
                      "thrombolysis window")
            page.click("[data-testid=flag-critical]")
            page.wait_for_selector("text=not yet acknowledged")
            page.click("[data-testid=sign-final]")
            page.wait_for_function("() => document.querySelector('[data-testid=report-status]')"
                                   ".textContent === 'final'", timeout=15000)
            assert "ASPECTS: 8/10" in page.inner_text("[data-testid=signed-text]")
            page.screenshot(path=str(artifacts / "report-signed.png"), full_page=True)

            staff = browser.new_context(ignore_https_errors=True,
                                        viewport={"width": 1300, "height": 700}).new_page()
            _sign_in(staff, base, "nurse.amy", totp=False)
            staff.goto(base + "/critical")
            row = staff.locator("tr[data-testid=finding]").first
            assert "thrombolysis window" in row.inner_text() and "E2E REPORT" in row.inner_text()
            staff.screenshot(path=str(artifacts / "critical-findings.png"), full_page=True)
            staff.fill("[data-testid=ack-note]", "Told the stroke team")
            staff.click("[data-testid=acknowledge]")
            staff.wait_for_selector("[data-testid=acknowledged]")
            assert "nurse.amy" in staff.inner_text("[data-testid=acknowledged]")
        finally:
            browser.close()

    # The worker's sweep sends the SR; the item is delivered.
    ids = _wait(orthanc.instances, 60, "the SR in Orthanc")
    tags = orthanc.simplified_tags(ids[0])
    assert tags["StudyInstanceUID"] == study_uid and tags["PatientID"] == "E2E-1"
    assert tags["Modality"] == "SR" and tags["VerificationFlag"] == "VERIFIED"

    def delivered():
        conn = site.db()
        try:
            return worklist.item_for_study(conn, study_uid)["state"] == "delivered"
        finally:
            conn.close()

    _wait(delivered, 30, "the read item to be delivered")
    conn = site.db()
    ack = conn.execute("SELECT acknowledged_by, ack_note FROM critical_findings").fetchone()
    conn.close()
    assert tuple(ack) == ("nurse.amy", "Told the stroke team")
