"""The relay of last resort relays: two aiortc endpoints that cannot reach each other (each
hides every ICE candidate from the other, so their own connection fails) get their media
through ``appliance media serve`` joined as relay (MediaRelay forwarding, re-encoded), end to
end both ways; a third endpoint beyond the relay's capacity is refused with the clear message,
and the two already relayed carry on."""

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

from appliance import config, consults, media, media_jobs, turn

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
