"""OHIF in Chromium loads a head CT progressively from HTJ2K byte ranges and ends at full quality.

A 24-slice 512×512 signed head CT phantom is pushed with storescu and the
worker's HTJ2K sweep runs. OHIF (our app-config) shows the middle slice whole
first, then our retrieve stages walk the stack: every slice's first bytes as
a preview (cornerstone's quality status SUBRESOLUTION), then the rest of each
codestream. The test ends when cornerstone's cache holds every slice at
FULL_RESOLUTION, checks the byte ranges on the wire, and compares the pixels
cornerstone decoded (its own OpenJPH build) with the stored ones.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import numpy as np
import phantoms
import pydicom
from conftest import require_module, require_tool
from pydicom.uid import generate_uid
from test_viewer_e2e import CHROMIUM_ARGS, PASSWORD, VIEWPORT_JS, _sign_in, _spki

from appliance.accounts import users as accounts
from appliance.core import config
from appliance.dicomweb import htj2k, htj2k_cache
from appliance.dicomweb import metadata as dicomweb_metadata
from appliance.reading import read_queue

SLICES = 24
FULL_RESOLUTION, SUBRESOLUTION = 8, 6  # cornerstone3D Enums.ImageQualityStatus

QUALITY_JS = f"""() => {{
  const v = ({VIEWPORT_JS})();
  return v.getImageIds().map(id => window.cornerstone.cache.getImageQuality(id));
}}"""

PIXELS_JS = f"""(index) => {{
  const v = ({VIEWPORT_JS})();
  const id = v.getImageIds()[index];
  const image = window.cornerstone.cache.getImage(id);
  return {{ sop: window.cornerstone.metaData.get('sopCommonModule', id).sopInstanceUID,
           quality: image.imageQualityStatus, pixels: Array.from(image.getPixelData()) }};
}}"""


def _wait_loaded(page, ranges: list, console: list) -> None:
    """Wait for the progressive loader's first pass; on a timeout say where it stood."""
    try:
        page.wait_for_function("() => window.applianceProgressive"
                               " && window.applianceProgressive.loads.length", timeout=60_000)
    except Exception:
        state = page.evaluate("() => JSON.stringify(window.applianceProgressive || null)")
        raise AssertionError(f"no progressive load: {state[:500]} requests {ranges[:6]}"
                             f" console {console[-15:]}") from None


def test_ohif_loads_the_stack_progressively_and_ends_at_full_quality(
        dicom_site, dcmtk, tmp_path):
    chromium = require_tool("chromium", "/usr/bin/chromium")
    require_tool(htj2k.TOOL)
    sync_api = require_module("playwright.sync_api")
    from appliance.dicomweb import viewer

    if not viewer.installed():
        require_tool("OHIF (provisioning/fetch-viewer.sh, make viewer)",
                     str(viewer.VIEWER_DIR / "index.html"))
    site = dicom_site
    study, series = generate_uid(), generate_uid()
    paths = {}
    for i in range(SLICES):
        ds = phantoms.ct(study, series, i)
        paths[ds.SOPInstanceUID] = phantoms.write(ds, tmp_path / "ct", f"ct{i:03d}")
    push = subprocess.run([dcmtk["storescu"], "-aec", site.ae_title, "127.0.0.1",
                           str(site.dicom_port), *map(str, paths.values())],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TCP_NODELAY": "1"})
    assert push.returncode == 0, push.stderr
    cfg = config.load(site.data_dir)
    read_queue.sweep(cfg, now=time.time() + cfg["worker"]["quiet_period_s"] + 1)
    while dicomweb_metadata.sweep(cfg):  # what the worker does seconds after ingest
        pass
    while htj2k_cache.sweep(cfg):
        pass
    conn = site.db()
    accounts.add_user(conn, "drhouse", "radiologist", PASSWORD)
    conn.close()
    site.start("web", wait_port=site.web_port)
    base = f"https://127.0.0.1:{site.web_port}"

    with sync_api.sync_playwright() as pw:
        spki = f"--ignore-certificate-errors-spki-list={_spki(site.data_dir / 'tls' / 'server.crt')}"
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=[*CHROMIUM_ARGS, spki])
        try:
            page = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
            ranges = []
            page.on("request", lambda r: ranges.append((r.url, r.headers.get("range")))
                    if "/frames/" in r.url else None)
            console = []
            page.on("console", lambda m: console.append(m.text[:300]))
            _sign_in(page, base)
            page.goto(f"{base}/viewer?StudyInstanceUIDs={study}")
            _wait_loaded(page, ranges, console)
            try:
                page.wait_for_function(
                    "() => { const l = window.applianceProgressive.loads[0];"
                    " return Object.keys(l.full).length + l.errors >= l.total - 1"
                    f" && l.total === {SLICES}; }}", timeout=90_000)
            except Exception:
                state = page.evaluate("() => { const l = window.applianceProgressive.loads[0];"
                                      " return [l.total, Object.keys(l.preview).length,"
                                      " Object.keys(l.full).length, l.errors,"
                                      " JSON.stringify(Object.fromEntries(Object.entries("
                                      "window.cornerstone.imageLoadPoolManager.getRequestPool()"
                                      ").map(([t, g]) => [t, Object.fromEntries(Object.entries(g)"
                                      ".map(([p, a]) => [p, a.length]))]))),"
                                      " JSON.stringify(window.cornerstone.imageLoadPoolManager"
                                      ".numRequests)]; }")
                raise AssertionError(f"stuck at {state}: requests {ranges[-6:]} console"
                                     f" {console[-15:]}") from None
            # Every slice is at full quality in cornerstone's cache: what OHIF shows.
            page.wait_for_function(f"() => ({QUALITY_JS})().every(q => q === {FULL_RESOLUTION})",
                                   timeout=30_000)
            # Read the record after that wait, once each slice our loader previewed has its
            # full load recorded: the wait above lets one be outstanding (the slice OHIF
            # itself loads may never pass through our loader), and a record read too early
            # lacks the last one.
            page.wait_for_function("() => { const l = window.applianceProgressive.loads[0];"
                                   " return l.errors > 0 || Object.keys(l.preview)"
                                   ".every(k => k in l.full); }", timeout=30_000)
            load = page.evaluate("() => window.applianceProgressive.loads[0]")
            assert load["errors"] == 0
            # The previews came first, from byte ranges of HTJ2K codestreams.
            # Most slices show a preview first (on loopback some are whole before their turn).
            assert len(load["preview"]) >= SLICES // 2, load
            assert all(t <= load["full"][i] for i, t in load["preview"].items())  # preview first
            htj2k_ranges = [h for u, h in ranges if "accept=" in u and h]
            assert any(h == "bytes=0-16383" for h in htj2k_ranges), ranges[:5]
            assert any(re.fullmatch(r"bytes=16384-", h) for h in htj2k_ranges), ranges[:5]
            # What cornerstone decoded is the stored pixels (signed, Bits Stored 12).
            for index in (0, SLICES // 2, SLICES - 1):
                got = page.evaluate(PIXELS_JS, index)
                stored = pydicom.dcmread(paths[got["sop"]]).pixel_array
                assert got["quality"] == FULL_RESOLUTION
                assert np.array_equal(np.array(got["pixels"]).reshape(stored.shape), stored)
        finally:
            browser.close()
