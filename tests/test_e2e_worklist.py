"""End to end in a real browser: a CT pushed with dcmtk's storescu lands on the worklist of a
radiologist who signs in with TOTP (Debian's chromium, driven by playwright, against
``appliance web`` = gunicorn over HTTPS) and claims it in one click.

Screenshots of the worklist before and after the claim go to the test artifacts.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pyotp
import requests
from conftest import require_module, require_tool
from dicom_data import write_series

from appliance.accounts import users as accounts
from appliance.core import config
from appliance.reading import read_queue, worklist

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PASSWORD = "reader-password-e2e"


def test_radiologist_signs_in_with_totp_sees_countdown_and_claims(dicom_site, dcmtk, artifacts,
                                                                  tmp_path):
    chromium = require_tool("chromium", "/usr/bin/chromium")
    sync_api = require_module("playwright.sync_api")
    site = dicom_site
    # 1. A head CT arrives from the "scanner".
    study_uid, _, paths = write_series(tmp_path / "ct", 8, modality="CT", body_part="HEAD",
                                       patient_name="E2E^STROKE",
                                       study_description="CT HEAD STROKE E2E")
    push = subprocess.run([dcmtk["storescu"], "-aec", site.ae_title, "127.0.0.1",
                           str(site.dicom_port), *map(str, paths)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TCP_NODELAY": "1"})
    assert push.returncode == 0, push.stderr
    # 2. The read queue sweep makes its read item (its clock moved past the quiet period).
    cfg = config.load(site.data_dir)
    read_queue.sweep(cfg, now=time.time() + cfg["worker"]["quiet_period_s"] + 1)
    conn = site.db()
    item = worklist.item_for_study(conn, study_uid)
    assert item is not None and item["priority"] == "stat"
    accounts.add_user(conn, "drgrey", "radiologist", PASSWORD, display_name="Dr Grey")
    conn.close()
    # 3. The web app, as deployed: gunicorn, HTTPS with the site's certificate.
    site.start("web", wait_port=site.web_port)
    base = f"https://127.0.0.1:{site.web_port}"

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(ignore_https_errors=True,
                                       viewport={"width": 1400, "height": 700}).new_page()
            page.goto(base + "/worklist")
            assert "/login" in page.url
            page.fill("input[name=username]", "drgrey")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(re.compile(r"/login/totp"))
            secret = page.inner_text("[data-testid=totp-secret]").strip()
            assert page.locator("[data-testid=totp-qr]").evaluate("img => img.naturalWidth") > 100
            page.screenshot(path=str(artifacts / "totp-enrol.png"))
            page.fill("input[name=code]", pyotp.TOTP(secret).now())
            page.click("form[action='/login/totp'] button[type=submit]")
            page.wait_for_url(re.compile(r"/worklist"))

            row = page.locator("tr[data-testid=item]").first
            assert "E2E STROKE" in row.inner_text() and "stat" in row.inner_text()
            countdown = row.locator("[data-testid=countdown]")
            page.wait_for_function(
                "() => /\\d+:\\d\\d/.test(document.querySelector('[data-testid=countdown]')"
                ".textContent)")
            first = countdown.inner_text()
            assert re.fullmatch(r"(\d+:)?\d+:\d\d", first), first
            assert (row.get_attribute("class") or "") in ("green", "amber", "breached")
            page.wait_for_function(  # it is live: the text changes as the seconds pass
                f"() => document.querySelector('[data-testid=countdown]').textContent !== '{first}'",
                timeout=15000)
            page.screenshot(path=str(artifacts / "worklist.png"), full_page=True)

            row.locator("button[data-action=claim]").click()
            page.wait_for_function(
                "() => document.querySelector('tr[data-testid=item]').textContent"
                ".includes('claimed · you')", timeout=20000)
            assert page.locator("tr[data-testid=item] button[data-action=release]").count() == 1
            href = page.locator("tr[data-testid=item] a").first.get_attribute("href")
            assert href == f"/viewer?StudyInstanceUIDs={study_uid}"
            report = page.locator("tr[data-testid=item] a.report-link")
            assert report.get_attribute("href").startswith("/reports/item/")
            page.screenshot(path=str(artifacts / "worklist-claimed.png"), full_page=True)
        finally:
            browser.close()

    # A script with an API token reads the same worklist over HTTPS (the site's CA).
    token = site.cli("token", "create", "--user", "drgrey", check=True).stdout.strip()
    api = requests.Session()
    api.trust_env = False  # REQUESTS_CA_BUNDLE must not replace the site's CA
    r = api.get(base + "/worklist/items", headers={"Authorization": f"Bearer {token}"},
                verify=str(site.data_dir / "tls" / "ca.crt"), timeout=30)
    assert r.status_code == 200 and r.json()["items"][0]["study_uid"] == study_uid
    assert api.get(base + "/worklist/items", verify=str(site.data_dir / "tls" / "ca.crt"),
                   timeout=30).status_code == 401
    site.stop("web")
    # No password, TOTP key or token in any log.
    for log in (site.data_dir / "logs").iterdir():
        text = log.read_text(errors="replace")
        for secret_value in (PASSWORD, secret, token):
            assert secret_value not in text, f"a secret leaked into {log.name}"

    conn = site.db()
    claimed = worklist.item_for_study(conn, study_uid)
    user = conn.execute("SELECT id, totp_secret FROM users WHERE username='drgrey'").fetchone()
    conn.close()
    assert claimed["state"] == "claimed" and claimed["claimed_by"] == "drgrey"
    assert accounts.open_totp(site.data_dir / "keys", user["totp_secret"], user["id"]) == secret
