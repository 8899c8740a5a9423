"""aiortc as the second, independent WebRTC stack: ``appliance media probe`` joins a consult
that a Chromium bedside page is in, as the remote side, through coturn (aioice will not use
127.0.0.1), and receives the bedside camera; then records it after consent, encrypted.
Also the capped relay's refusal."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import require_module, require_tool
from pyrage import x25519
from test_consult_browser import CHROMIUM_ARGS, PASSWORD, configure_turn, enter

from appliance.accounts import users as accounts
from appliance.consults import media, turn
from appliance.consults import rooms as consults
from appliance.core import config


def test_aiortc_probe_joins_a_browser_consult_through_turn(site, artifacts, tmp_path):
    chromium = require_tool("chromium", "/usr/bin/chromium")
    require_tool("turnserver", "/usr/bin/turnserver")
    require_module("aiortc")
    import av
    import pyrage
    sync_api = require_module("playwright.sync_api")
    configure_turn(site)
    identity = x25519.Identity.generate()
    yaml_path = site.data_dir / "appliance.yaml"
    yaml_path.write_text(yaml_path.read_text().replace(
        "recipients: []", f'recipients: ["{identity.to_public()}"]'))
    cfg = config.load(site.data_dir)
    conn = site.db()
    accounts.add_user(conn, "nurse", "site_staff", PASSWORD, display_name="Nurse Bed 4")
    cid = consults.create_consult(conn, "nurse", title="Probe consult")
    conn.close()
    coturn = subprocess.Popen(turn.command(cfg), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    site.start("web", wait_port=site.web_port)
    base = f"https://127.0.0.1:{site.web_port}"
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=CHROMIUM_ARGS)
            try:
                page = browser.new_context(ignore_https_errors=True).new_page()
                page.goto(base + "/login")
                page.fill("input[name=username]", "nurse")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_url(lambda url: "/login" not in url)
                enter(page, f"{base}/consults/{cid}")
                page.wait_for_selector("#call:not([hidden])")
                probe = site.cli("media", "probe", "--consult", str(cid), "--seconds", "6")
                assert probe.returncode == 0, probe.stdout + probe.stderr
                result = json.loads(probe.stdout)
                # The bedside page saw the probe come and go, and kept its own state healthy.
                assert page.evaluate("window.consult.step") in ("connecting", "video")
                # Recording: refused before consent; after it, encrypted to the sync keys.
                refused = site.cli("media", "record", "--consult", str(cid), "--seconds", "2")
                assert refused.returncode == 1 and "consent" in refused.stderr
                page.click("[data-testid=consent]")
                page.wait_for_selector("[data-testid=consent][disabled]")
                rec = site.cli("media", "record", "--consult", str(cid), "--seconds", "4")
                assert rec.returncode == 0, rec.stdout + rec.stderr
                recorded = [Path(line) for line in rec.stdout.split()]
            finally:
                browser.close()
    finally:
        coturn.terminate()
        coturn.wait(timeout=10)
    print(f"\naiortc probe: join {result['join_ms']} ms, {result['frames']} frames,"
          f" {result['fps']} fps, longest gap {result['longest_gap_ms']} ms")
    assert result["errors"] == []
    assert result["join_ms"] is not None and result["join_ms"] < 5000  # the SLO: join < 5 s
    assert result["frames"] > 30 and result["fps"] > 10
    assert result["audio_frames"] > 0
    conn = site.db()
    joined = conn.execute("SELECT body FROM consult_events WHERE kind='ladder'").fetchall()
    roles = conn.execute("SELECT role, state FROM consult_participants WHERE kind='media'") \
        .fetchall()
    audited = conn.execute("SELECT count(*) FROM audit WHERE action='consult.probe'").fetchone()[0]
    conn.close()
    assert any(json.loads(r["body"]).get("join_ms") == result["join_ms"] for r in joined)
    assert [tuple(r) for r in roles] == [("probe", "left"), ("recorder", "left")]
    assert audited == 1
    # One encrypted part (0600), no clear media left behind; it decrypts to real video.
    assert len(recorded) == 1 and recorded[0].name.endswith(".mkv.age")
    assert stat.S_IMODE(recorded[0].stat().st_mode) == 0o600
    assert not list((site.data_dir / "recordings" / ".partial").iterdir())
    clear = tmp_path / "clear.mkv"
    clear.write_bytes(pyrage.decrypt(recorded[0].read_bytes(), [identity]))
    with av.open(str(clear)) as container:
        assert {st.type for st in container.streams} >= {"video", "audio"}
        frames = sum(1 for _ in container.decode(video=0))
    assert frames > 20


def test_relay_is_capped_with_a_clear_refusal(site):
    assert media.relay_capacity(2, cpus=2) == 2
    assert media.relay_capacity(10, cpus=2) == 8  # 80 % of 2 cores at a fifth of a core each
    with pytest.raises(media.MediaError, match="relay refused: 2 stream.*capacity 2"):
        media.check_relay(2, 1, 2, cpus=2)
    r = site.cli("media", "relay-check", "--active", "2", "--streams", "1")
    assert r.returncode == 1 and "relay refused" in r.stderr
    assert site.cli("media", "relay-check", "--streams", "1").returncode == 0
    # Recording without consent is refused before anything joins.
    conn = site.db()
    cid = consults.create_consult(conn, "nurse")
    with pytest.raises(consults.ConsultError, match="consent"):
        consults.join_media(conn, cid, "recorder")
    assert conn.execute("SELECT count(*) FROM consult_participants").fetchone()[0] == 0
    conn.close()
