"""The relay of last resort relays: two aiortc endpoints that cannot reach each other (each
hides every ICE candidate from the other, so their own connection fails) get their media
through ``appliance media serve`` joined as relay (MediaRelay forwarding, re-encoded), end to
end both ways; a third endpoint beyond the relay's capacity is refused with the clear message,
and the two already relayed carry on; when one of them leaves, its stream is given back and
the third gets in."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

from conftest import require_module, require_tool
from consult_aiortc_client import Endpoint, wait_for_media_participant
from test_consult_media_service import job, start_media
from test_consult_recording_bundle import configure_recording_site

from appliance.consults import media, media_jobs, turn
from appliance.consults import rooms as consults
from appliance.core import config

USERS = [{"id": 1, "username": "nurse", "role": "site_staff"},
         {"id": 2, "username": "neuro", "role": "neurologist"},
         {"id": 3, "username": "resident", "role": "neurologist"}]


def test_relay_carries_media_between_unreachable_endpoints_and_refuses_beyond_capacity(
        site, tmp_path):
    require_module("aiortc")
    require_tool("turnserver", "/usr/bin/turnserver")
    configure_recording_site(site, tmp_path)
    cfg = config.load(site.data_dir)
    cap = media.relay_capacity(cfg["consults"]["relay_max_streams"])
    assert cap == 2  # two endpoints; a third is beyond it
    conn = site.db()
    cid = consults.create_consult(conn, "nurse", title="Relayed consult")
    conn.close()
    coturn = subprocess.Popen(turn.command(cfg), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    service = start_media(site)
    seen: dict[str, object] = {}

    async def scenario() -> None:
        ice = consults.ice_servers(cfg, "127.0.0.1", cid)
        a, b = (Endpoint(cfg, cid, u, ice_servers=ice) for u in USERS[:2])
        c = None
        try:
            # 1. Directly, with no candidate of each other: their connection fails.
            direct = await a.offer(b.pid, strip_candidates=True)
            await asyncio.gather(
                a.run_until(lambda: direct.iceConnectionState in ("failed", "connected"), 20),
                b.run_until(lambda: b.pid in b.pcs or a.pid in b.pcs, 5))
            seen["direct"] = direct.iceConnectionState
            assert a.frames["video"] == 0 and b.frames["video"] == 0
            await direct.close()
            a.pcs.pop(b.pid, None)
            bpc = b.pcs.pop(a.pid, None)
            if bpc is not None:
                await bpc.close()
            # 2. The page asks for the relay (a job row); the service joins as relay.
            db = site.db()
            media_jobs.request(db, cid, "relay", "nurse", 600)
            db.close()
            relay = await wait_for_media_participant(a, "relay")
            t0 = time.monotonic()
            await a.offer(relay)
            await b.offer(relay)
            ok = await asyncio.gather(
                a.run_until(lambda: a.frames["video"] > 60 and a.frames["audio"] > 50, 30),
                b.run_until(lambda: b.frames["video"] > 60 and b.frames["audio"] > 50, 30))
            seen["both_ways_s"] = round(time.monotonic() - t0, 2)
            seen["frames"] = (dict(a.frames), dict(b.frames))
            assert all(ok), seen
            # 3. A third endpoint: refused, with the reason, and nothing else changes.
            c = Endpoint(cfg, cid, USERS[2], ice_servers=ice)
            await c.offer(relay)
            assert await c.run_until(lambda: bool(c.errors), 15), c.errors
            seen["refusal"] = c.errors[0]
            seen["system"] = c.system
            before = (a.frames["video"], b.frames["video"])
            await asyncio.gather(a.run_until(lambda: False, 2), b.run_until(lambda: False, 2))
            seen["after_refusal"] = (a.frames["video"] - before[0], b.frames["video"] - before[1])
            # 4. One relayed endpoint leaves: its stream is given back, the third now gets in.
            await b.close()
            b = None
            await c.offer(relay)  # after the leave's presence event: the relay reads in order
            assert await c.run_until(lambda: c.frames["video"] > 30, 20), c.frames
            seen["third_after_leave"] = dict(c.frames)
        finally:
            for ep in (a, b, c):
                if ep is not None:
                    await ep.close()

    try:
        asyncio.run(scenario())
        db = site.db()
        media_jobs.cancel(db, cid, "relay", "nurse")
        db.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not json.loads(job(site, "relay")["result"]):
            time.sleep(0.2)
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=20) == 0
    finally:
        site.stop_all()
        coturn.terminate()
        coturn.wait(timeout=10)
    print(f"\nrelay: direct ICE {seen['direct']}; media both ways through the relay in"
          f" {seen['both_ways_s']} s; frames {seen['frames']}; refusal: {seen['refusal']}")
    assert seen["direct"] == "failed"
    assert seen["refusal"].startswith("relay refused: 2 stream(s) already relayed, 1 more asked,"
                                      " capacity 2")
    assert any("relay_refused" in s for s in seen["system"])  # the whole consult sees it
    assert min(seen["after_refusal"]) > 20  # the two relayed endpoints carry on
    result = json.loads(job(site, "relay")["result"])
    assert result["forwarded"]["video"] > 120 and result["forwarded"]["audio"] > 100
    assert any("relay refused" in e for e in result["errors"])


def test_two_browsers_with_no_path_fall_back_to_the_relay(site, artifacts):
    """Two Chromium pages that share no ICE candidate (``?nodirect=1``: a site where every
    peer path is blocked) step down to chat, ask for the relay themselves, and get each other's
    video through ``appliance media serve``; the page says video again."""
    chromium = require_tool("chromium", "/usr/bin/chromium")
    require_tool("turnserver", "/usr/bin/turnserver")
    require_module("aiortc")
    sync_api = require_module("playwright.sync_api")
    from test_consult_browser import CHROMIUM_ARGS, PASSWORD, configure_turn, enter

    from appliance.accounts import users as accounts

    configure_turn(site)
    path = site.data_dir / "appliance.yaml"  # the neurologist signs in without TOTP here
    path.write_text(path.read_text().replace("totp_required_for_readers: true",
                                             "totp_required_for_readers: false"))
    cfg = config.load(site.data_dir)
    conn = site.db()
    accounts.add_user(conn, "nurse", "site_staff", PASSWORD, display_name="Nurse Bed 4")
    accounts.add_user(conn, "neuro", "neurologist", PASSWORD, display_name="Dr Neuro")
    cid = consults.create_consult(conn, "nurse", title="No path consult")
    conn.close()
    coturn = subprocess.Popen(turn.command(cfg), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    site.start("web", wait_port=site.web_port)
    start_media(site)
    base = f"https://127.0.0.1:{site.web_port}"
    room = f"{base}/consults/{cid}?nodirect=1"
    try:
        with sync_api.sync_playwright() as pw:
            browsers = [pw.chromium.launch(executable_path=chromium, headless=True,
                                           args=CHROMIUM_ARGS) for _ in range(2)]
            try:
                pages = []
                for browser, user in zip(browsers, ("nurse", "neuro"), strict=True):
                    page = browser.new_context(ignore_https_errors=True).new_page()
                    page.goto(base + "/login")
                    page.fill("input[name=username]", user)
                    page.fill("input[name=password]", PASSWORD)
                    page.click("button[type=submit]")
                    page.wait_for_url(lambda url: "/login" not in url)
                    enter(page, room)
                    pages.append(page)
                t0 = time.monotonic()
                for page in pages:  # no path: the ladder goes down to chat
                    page.wait_for_function("() => window.consult.ladder.some("
                                           "e => e.step === 'chat_only')", timeout=30000)
                chat_at = time.monotonic() - t0
                for page in pages:  # the relay joins; video again, through it
                    page.wait_for_function("() => window.consult.step === 'video' &&"
                                           " window.consult.fps > 5", timeout=30000)
                video_at = time.monotonic() - t0
                roles = pages[0].evaluate("window.consult.roster.map(p => p.role)")
                for page in pages:  # frames through the relay, counted on the element itself
                    page.wait_for_function("""() => {
                        const relay = window.consult.roster.find(p => p.role === 'relay');
                        const v = relay && document.querySelector(
                            `video[data-peer="${relay.id}"]`);
                        return v && v.getVideoPlaybackQuality().totalVideoFrames > 10;
                    }""", timeout=15000)
                carried = [page.evaluate("""() => {
                    const relay = window.consult.roster.find(p => p.role === 'relay');
                    const direct = Object.values(window.consult.peers)
                        .filter(p => p.kind !== 'media');
                    const v = document.querySelector(`video[data-peer="${relay.id}"]`);
                    return {relayFrames: v ? v.getVideoPlaybackQuality().totalVideoFrames : 0,
                            direct: direct.map(p => p.pc.iceConnectionState)};
                }""") for page in pages]
                pages[1].screenshot(path=str(artifacts / "consult-relay-fallback.png"))
            finally:
                for browser in browsers:
                    browser.close()
    finally:
        site.stop_all()
        coturn.terminate()
        coturn.wait(timeout=10)
    print(f"\nno direct path: chat after {chat_at:.1f} s, video through the relay after"
          f" {video_at:.1f} s; {carried}")
    assert "relay" in roles
    for c in carried:
        assert c["relayFrames"] > 10
        assert "connected" not in c["direct"] and "completed" not in c["direct"]
    relay_job = job(site, "relay")
    assert relay_job["requested_by"] in ("nurse", "neuro")
