"""End to end in Chromium: a radiologist opens a pushed 300-slice CT head from the worklist in OHIF.

Debian's ``/usr/bin/chromium`` driven by Python playwright (never ``playwright
install``) against ``appliance web`` over HTTPS. The study holds a 2-image
localizer series (series 1, what OHIF's default protocol would hang) and the
300-slice axial stack: our CT head (stroke) hanging protocol must hang the
axial stack, in the brain window W80/L40, at its middle slice, without a
click. The CT's InstanceNumbers are a permutation of its slice positions, so
"slice 150" is checked by position (what OHIF orders by), not by number. The
window presets still work (Soft tissue, then Brain back to 0..79), a length
measurement is drawn, and a chest CT opens with OHIF's default protocol. The
viewer page's head start (appliance/viewer_preload.py) is checked too: it
fetched exactly the searches, metadata and first image OHIF then asked for.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pyotp
import pytest
from conftest import require_module, require_tool
from dicom_data import make_instance
from pydicom.uid import generate_uid

from appliance.accounts import users as accounts
from appliance.core import config
from appliance.dicomweb import metadata as dicomweb_metadata
from appliance.reading import read_queue

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--use-gl=swiftshader", "--enable-unsafe-swiftshader"]
PASSWORD = "reader-password-viewer"
SLICES, SIZE = 300, 256
VIEWPORT_JS = ("() => { const e = window.cornerstone && window.cornerstone.getRenderingEngines()[0];"
               " return e ? e.getViewports()[0] : null; }")


def _localizer(out: Path, study: str) -> list[Path]:
    """Two lateral scout images, series 1: what a scanner sends before the axial stack."""
    series, paths = generate_uid(), []
    for i in range(2):
        ds = make_instance(study, series, i, rows=SIZE, cols=SIZE, patient_name="VIEWER^E2E",
                           study_description="CT HEAD STROKE VIEWER", body_part="HEAD",
                           series_description="SCOUT")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        ds.ImagePositionPatient = [float(i), -64.0, 64.0]
        path = out / f"scout{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _chest_ct(out: Path, count: int = 20) -> str:
    """A small chest CT in its own soft-tissue window (W400/L40): OHIF's default protocol."""
    study, series = generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        ds = make_instance(study, series, i, rows=64, cols=64, patient_name="CHEST^E2E",
                           study_description="CT CHEST", body_part="CHEST",
                           series_description="AXIAL 1MM")
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.save_as(out / f"chest{i:03d}.dcm", enforce_file_format=True)
    return study


def _head_ct(out: Path) -> tuple[str, str, list[Path]]:
    """A 300-slice CT head phantom: skull ring, brain, a bar whose length encodes the slice."""
    study, series = generate_uid(), generate_uid()
    y, x = np.mgrid[-SIZE // 2:SIZE // 2, -SIZE // 2:SIZE // 2]
    r = (x / (SIZE * 0.40)) ** 2 + (y / (SIZE * 0.46)) ** 2
    base = np.where(r < 1, 1024 + 35, 0).astype(np.uint16)
    base[(r >= 0.85) & (r < 1)] = 1024 + 1200
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(SLICES):
        ds = make_instance(study, series, i, rows=SIZE, cols=SIZE, patient_name="VIEWER^E2E",
                           study_description="CT HEAD STROKE VIEWER", body_part="HEAD",
                           series_description="AXIAL 0.5MM")
        ds.SeriesNumber = 2
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = (i * 7) % SLICES + 1  # not the position order
        ds.WindowCenter, ds.WindowWidth = 300, 1500  # so picking Brain visibly changes the VOI
        img = base.copy()
        img[SIZE // 2 - 3:SIZE // 2 + 3, 40:40 + (i * (SIZE - 80)) // SLICES] = 1024 + 70
        ds.PixelData = img.tobytes()
        path = out / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, series, paths + _localizer(out, study)


def _spki(cert_path: Path) -> str:
    """base64 SHA-256 of a certificate's public key (Chromium's SPKI pin format)."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def _sign_in(page, base: str) -> None:
    page.goto(base + "/worklist")
    page.fill("input[name=username]", "drhouse")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/login/totp"))
    secret = page.inner_text("[data-testid=totp-secret]").strip()
    page.fill("input[name=code]", pyotp.TOTP(secret).now())
    page.click("form[action='/login/totp'] button[type=submit]")
    page.wait_for_url(re.compile(r"/worklist"))


def _pick_preset(page, name: str) -> None:
    """The viewport's window/level menu → Modality Window Presets → ``name`` (e.g. Brain)."""
    page.locator("[data-cy=windowLevelMenu-btn]").first.click()
    page.get_by_text("Modality Window Presets").first.click()
    page.get_by_text(re.compile(rf"^{name}")).first.click()


def _wait_voi_width(page, low: float, high: float) -> dict:
    """Wait until the viewport's VOI range is between ``low`` and ``high`` wide; return it."""
    page.wait_for_function(
        f"() => {{ const r = ({VIEWPORT_JS})().getProperties().voiRange;"
        f" return r && r.upper - r.lower >= {low} && r.upper - r.lower <= {high}; }}",
        timeout=10_000)
    return page.evaluate(f"() => ({VIEWPORT_JS})().getProperties().voiRange")


def _hung(page) -> dict:
    """What the hanging protocol put on screen: protocol name, series, slice index, VOI."""
    return page.evaluate(
        f"() => {{ const v = ({VIEWPORT_JS})(); const id = v.getCurrentImageId();"
        " const hp = window.services.hangingProtocolService.getActiveProtocol();"
        " return { protocol: hp.protocol && hp.protocol.name, index: v.getCurrentImageIdIndex(),"
        " count: v.getImageIds().length, voi: v.getProperties().voiRange,"
        " series: window.cornerstone.metaData.get('generalSeriesModule', id).seriesInstanceUID"
        " }; }")


PRELOADS_JS = """() => {
  const text = Array.from(document.scripts).map(s => s.textContent)
    .find(t => t.startsWith('[["/dicom-web/'));
  const urls = text ? JSON.parse(text.slice(0, text.indexOf('.forEach'))).map(p => p[0]) : [];
  const seen = performance.getEntriesByType('resource').filter(e => e.name.includes('/dicom-web/'));
  return urls.map(u => [u, seen.filter(e => e.name === location.origin + u)
                                .map(e => [e.initiatorType, e.transferSize])]);
}"""


BULKDATA_JS = """async () => {
  const ds = window.services.displaySetService.getActiveDisplaySets()
    .find(d => d.numImageFrames > 10);
  const pixel = ds.instances[0].PixelData;
  const data = await pixel.retrieveBulkData();
  const buffer = Array.isArray(data) ? data[0] : data;
  return { uri: pixel.BulkDataURI, bytes: buffer.byteLength };
}"""


def _shown_sop(page) -> str:
    return page.evaluate(f"() => window.cornerstone.metaData.get('sopCommonModule',"
                         f" ({VIEWPORT_JS})().getCurrentImageId()).sopInstanceUID")


def _check_preloads(page, frame_sop: str, cached: bool = True) -> None:
    """The page fetched ahead exactly what OHIF then asked for (and OHIF got it from the cache)."""
    preloads = page.evaluate(PRELOADS_JS)
    assert len(preloads) >= 5, preloads  # study, series, priors searches, metadata, a frame
    frames = [u for u, _ in preloads if "/frames/" in u]
    assert len(frames) == 1 and f"/instances/{frame_sop}/frames/1" in frames[0], frames
    for url, entries in preloads:
        ohif = entries[1:]  # the first is our own fetch at the top of the page
        assert ohif, f"OHIF never asked for {url}"
        if cached:
            assert min(size for _, size in ohif) == 0, f"OHIF fetched {url} again: {entries}"


def _wait_first_image(page, count: int) -> None:
    page.wait_for_function(
        f"() => {{ const v = ({VIEWPORT_JS})(); return v && v.getCurrentImageId"
        f" && v.getCurrentImageId() && v.getImageIds().length === {count}"
        " && v.getImageData && v.getImageData(); }", timeout=60_000)


def _scroll_to(page, index: int) -> None:
    """Mouse-wheel to ``index`` (one slice a notch), then arrow keys for any notch lost."""
    current = page.evaluate(f"() => ({VIEWPORT_JS})().getCurrentImageIdIndex()")
    for _ in range(index - current):
        page.mouse.wheel(0, 100)
    for _ in range(50):
        current = page.evaluate(f"() => ({VIEWPORT_JS})().getCurrentImageIdIndex()")
        if current == index:
            return
        page.keyboard.press("ArrowDown" if current < index else "ArrowUp")
    raise AssertionError(f"could not scroll to slice {index + 1} (at {current + 1})")


def test_ct_head_hangs_axial_in_brain_window_reader_scrolls_measures_chest_gets_default(
        dicom_site, dcmtk, artifacts, tmp_path):
    chromium = require_tool("chromium", "/usr/bin/chromium")
    sync_api = require_module("playwright.sync_api")
    from appliance.dicomweb import viewer

    if not viewer.installed():
        require_tool("OHIF (provisioning/fetch-viewer.sh, make viewer)",
                     str(viewer.VIEWER_DIR / "index.html"))
    site = dicom_site
    study_uid, axial_uid, paths = _head_ct(tmp_path / "ct")
    chest_uid = _chest_ct(tmp_path / "chest")
    push = subprocess.run([dcmtk["storescu"], "-aec", site.ae_title, "127.0.0.1",
                           str(site.dicom_port), "+sd", *map(str, paths),
                           str(tmp_path / "chest")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TCP_NODELAY": "1"})
    assert push.returncode == 0, push.stderr
    cfg = config.load(site.data_dir)
    read_queue.sweep(cfg, now=time.time() + cfg["worker"]["quiet_period_s"] + 1)
    while dicomweb_metadata.sweep(cfg):  # what the worker does seconds after ingest
        pass
    conn = site.db()
    accounts.add_user(conn, "drhouse", "radiologist", PASSWORD)
    conn.close()
    site.start("web", wait_port=site.web_port)
    base = f"https://127.0.0.1:{site.web_port}"

    with sync_api.sync_playwright() as pw:
        # Trust the site's certificate like an installed CA: with a certificate error
        # Chromium keeps nothing in its HTTP cache, and the viewer relies on it.
        spki = f"--ignore-certificate-errors-spki-list={_spki(site.data_dir / 'tls' / 'server.crt')}"
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=[*CHROMIUM_ARGS, spki])
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            _sign_in(page, base)
            # A chest CT keeps OHIF's default: first slice, the file's own W400/L40. It is
            # opened first: OHIF's first start in a browser sets its language cookie, and
            # our responses vary by Cookie, so only later openings find the preloads cached.
            chest = page.context.new_page()
            chest.goto(f"{base}/viewer?StudyInstanceUIDs={chest_uid}")
            _wait_first_image(chest, 20)
            hung = _hung(chest)
            assert hung["protocol"] == "Default" and hung["index"] == 0
            assert hung["voi"]["upper"] - hung["voi"]["lower"] == pytest.approx(399, abs=1)
            _check_preloads(chest, _shown_sop(chest), cached=False)
            chest.close()

            link = page.locator(f"a[href='/viewer?StudyInstanceUIDs={study_uid}']").first
            link.click()
            page.wait_for_url(re.compile(r"/viewer\?StudyInstanceUIDs="))
            _wait_first_image(page, SLICES)

            # Hung by our protocol without a click: the axial stack (not series 1, the
            # localizer), the brain window, the middle slice.
            hung = _hung(page)
            _check_preloads(page, _shown_sop(page))
            # Our path-only BulkDataURIs (never built from the Host header): OHIF makes them
            # absolute under its DICOMweb root and fetches the pixel data through them.
            bulk = page.evaluate(BULKDATA_JS)
            assert bulk["uri"].startswith(base + "/dicom-web/studies/"), bulk
            assert bulk["bytes"] == SIZE * SIZE * 2, bulk
            assert hung["protocol"] == "CT head (stroke)"
            assert hung["series"] == axial_uid and hung["count"] == SLICES
            assert hung["index"] in (SLICES // 2 - 1, SLICES // 2)
            # W80/L40 with the DICOM linear function: 40 - 0.5 -/+ (80 - 1) / 2 = 0 .. 79.
            assert hung["voi"]["lower"] == pytest.approx(0) and hung["voi"]["upper"] in (79, 80)

            # Scroll to the 150th slice by position with the mouse wheel over the image.
            pane = page.locator("[data-cy=viewport-pane]").first
            box = pane.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            _scroll_to(page, 149)
            zs = page.evaluate(
                f"() => {{ const v = ({VIEWPORT_JS})(); const z = id => window.cornerstone"
                ".metaData.get('imagePlaneModule', id).imagePositionPatient[2];"
                " return [z(v.getImageIds()[0]), z(v.getCurrentImageId())]; }")
            # The 150th position from either end (OHIF orders along the slice normal),
            # which is not InstanceNumber 150.
            assert zs[0] in (0.0, (SLICES - 1) * 0.5)
            assert abs(zs[1] - zs[0]) == pytest.approx(149 * 0.5)

            # The presets still work: Soft tissue (W400), then Brain (W80) again.
            _pick_preset(page, "Soft tissue")
            _wait_voi_width(page, 300, 500)
            _pick_preset(page, "Brain")
            voi = _wait_voi_width(page, 70, 90)
            assert voi["lower"] == pytest.approx(0) and voi["upper"] in (79, 80)

            page.locator("[data-cy=Length-btn], [data-cy=Length]").first.click()
            page.mouse.move(box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.5)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.65, box["y"] + box["height"] * 0.5,
                            steps=8)
            page.mouse.up()
            page.wait_for_function(
                "() => window.cornerstoneTools.annotation.state.getAllAnnotations()"
                ".some(a => a.metadata.toolName === 'Length' && a.data.cachedStats"
                " && Object.values(a.data.cachedStats).some(s => s.length > 0))",
                timeout=10_000)
            page.screenshot(path=str(artifacts / "viewer-ct-slice150-brain-length.png"))

        finally:
            browser.close()
