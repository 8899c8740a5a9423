"""``appliance media serve``: the media service takes its work from the database.

An aiortc endpoint (standing in for the bedside browser, which offers to every media
participant it sees) is in a consult; the service, running as its own process with a
heartbeat, probes it on schedule (join time into the SLO), records it after consent,
is killed with -9 mid-recording (the clear part left behind is sealed as incomplete at the
next start, never left in the clear), takes the recording over, is restarted gracefully
(SIGTERM: the part sealed complete, the job handed back and resumed by the next service),
stops recording when asked, and exits with nothing in the clear.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pyrage
from conftest import require_module, require_tool
from consult_aiortc_client import Endpoint
from test_consult_recording_bundle import configure_recording_site

from appliance.consults import media_jobs, turn
from appliance.consults import recordings as consult_recordings
from appliance.consults import rooms as consults
from appliance.core import components, config
from appliance.health import status_report
from appliance.sync import bundle


def start_media(site) -> subprocess.Popen:
    log = open(site.data_dir / "logs" / "test-media.out", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "media", "serve", "--data-dir",
                             str(site.data_dir)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    site.procs["media"] = proc
    return proc


async def offer_to_media(ep: Endpoint, until, timeout: float) -> bool:
    """Like the consult page: offer to every appliance participant that appears."""
    def done() -> bool:
        for p in ep.roster():
            if p["kind"] == "media" and p["state"] == "admitted" and p["id"] not in ep.pcs:
                asyncio.ensure_future(ep.offer(p["id"]))
                ep.pcs[p["id"]] = None  # offered (replaced by the pc once made)
        return until()
    return await ep.run_until(done, timeout)


def job(site, kind: str) -> dict:
    conn = site.db()
    try:
        r = conn.execute("SELECT * FROM consult_media_jobs WHERE kind = ? ORDER BY id DESC",
                         (kind,)).fetchone()
        return dict(r) if r else {}
    finally:
        conn.close()


def partials(site) -> list:
    return sorted((site.data_dir / "recordings" / ".partial").glob("*.mkv"))


def test_media_service_probes_records_survives_kill9_and_seals(site, tmp_path):
    require_module("aiortc")
    av = require_module("av")
    require_tool("turnserver", "/usr/bin/turnserver")
    key = configure_recording_site(site, tmp_path)
    path = site.data_dir / "appliance.yaml"
    path.write_text(path.read_text().replace("probe_interval_s: 0", "probe_interval_s: 10"))
    cfg = config.load(site.data_dir)
    conn = site.db()
    cid = consults.create_consult(conn, "nurse", title="Served consult")
    conn.close()
    coturn = subprocess.Popen(turn.command(cfg), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    service = start_media(site)
    timeline: dict[str, object] = {}

    async def scenario() -> None:
        ep = Endpoint(cfg, cid, {"id": 1, "username": "nurse", "role": "site_staff"},
                      ice_servers=consults.ice_servers(cfg, "127.0.0.1", cid))
        try:
            # 1. The scheduled probe joins, measures the join, leaves.
            assert await offer_to_media(ep, lambda: job(site, "probe").get("state") == "done",
                                        40), job(site, "probe")
            # 2. Recording after consent, asked for as the page does (a job row).
            db = site.db()
            consults.record_consent(db, cid, "nurse")
            media_jobs.request(db, cid, "record", "nurse", 120)
            db.close()
            assert await offer_to_media(ep, lambda: bool(partials(site)) and
                                        partials(site)[0].stat().st_size > 0, 30)
            recording_from = time.monotonic()
            await ep.run_until(lambda: time.monotonic() - recording_from > 6, 7)
            timeline["first_part"] = partials(site)[0].name
            # 3. kill -9 mid-recording: the clear part is left behind, the job still 'running'.
            os.killpg(service.pid, signal.SIGKILL)
            service.wait()
            timeline["left_behind"] = [p.name for p in partials(site)]
            timeline["job_after_kill"] = job(site, "record")["state"]
            start_media(site)  # 4. restart: seals the part, takes the recording over
            assert await offer_to_media(
                ep, lambda: any(p.name != timeline["first_part"] and p.stat().st_size > 0
                                for p in partials(site)), 40)
            timeline["sealed_after_restart"] = [r["name"] for r in _recordings(site)]
            recording_from = time.monotonic()
            await ep.run_until(lambda: time.monotonic() - recording_from > 5, 6)
            # 5. A graceful restart (SIGTERM): the part is sealed complete, the job handed back
            # to the next service, which records on in a new part.
            site.procs["media"].send_signal(signal.SIGTERM)
            await ep.run_until(lambda: site.procs["media"].poll() is not None, 20)
            timeline["graceful"] = (site.procs["media"].returncode, job(site, "record"),
                                    partials(site), len(_recordings(site)))
            start_media(site)
            assert await offer_to_media(ep, lambda: bool(partials(site)) and
                                        partials(site)[0].stat().st_size > 0, 40)
            recording_from = time.monotonic()
            await ep.run_until(lambda: time.monotonic() - recording_from > 4, 5)
            db = site.db()
            media_jobs.cancel(db, cid, "record", "nurse")  # 6. stopped from the page
            db.close()
            assert await ep.run_until(lambda: bool(json.loads(
                job(site, "record").get("result") or "{}").get("files")), 20)
            timeline["frames"] = dict(ep.frames)
        finally:
            await ep.close()

    try:
        asyncio.run(scenario())
        conn = site.db()
        beat = components.read(conn).get("media")
        shown = status_report.collect(cfg, conn)["components"].get("media")  # /status, /readyz
        conn.close()
        assert beat is not None and beat["up"], beat
        assert shown is not None and shown["up"] and shown["pid"] == site.procs["media"].pid
        assert beat["detail"]["relay_capacity"] >= 1
        site.procs["media"].send_signal(signal.SIGTERM)  # 7. stop, nothing left to hand back
        assert site.procs["media"].wait(timeout=20) == 0
    finally:
        site.stop_all()
        coturn.terminate()
        coturn.wait(timeout=10)

    conn = site.db()
    probes = [json.loads(r["result"]) for r in conn.execute(
        "SELECT result FROM consult_media_jobs WHERE kind = 'probe' AND state = 'done'"
        " ORDER BY id")]
    slo = conn.execute("SELECT value, good FROM slo_observations WHERE slo = 'video_join'"
                       " ORDER BY id").fetchall()
    seats = conn.execute("SELECT role, state FROM consult_participants WHERE kind = 'media'"
                         " ORDER BY id").fetchall()
    conn.close()
    assert probes and all(p["join_ms"] < 5000 and p["frames"] > 10 for p in probes), probes
    assert [tuple(r) for r in slo] == [(p["join_ms"] / 1000, 1) for p in probes]
    # The killed recorder left its clear part and its seat; the restart sealed the one as
    # incomplete and released the other, then recorded on until stopped.
    assert timeline["job_after_kill"] == "running"
    assert timeline["left_behind"] == [timeline["first_part"]]
    assert timeline["first_part"] + ".age" in timeline["sealed_after_restart"]
    assert ("recorder", "admitted") not in [tuple(r) for r in seats]
    assert [tuple(r) for r in seats].count(("recorder", "left")) == 3
    code, handed, left_clear, sealed_by_then = timeline["graceful"]
    assert code == 0 and handed["state"] == "running" and handed["lease_owner"] is None
    assert left_clear == [] and sealed_by_then == 2
    rec = job(site, "record")
    assert rec["state"] == "cancelled" and len(json.loads(rec["result"])["files"]) == 1
    assert partials(site) == []  # no clear media anywhere
    rows = _recordings(site)
    assert [r["complete"] for r in rows] == [0, 1, 1]
    ids = bundle.load_identity(key)
    frames = []
    for r in rows:
        f = site.data_dir / "recordings" / r["name"]
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        clear = tmp_path / (r["name"] + ".mkv")
        clear.write_bytes(pyrage.decrypt(f.read_bytes(), ids))
        assert clear.read_bytes()[:4] == b"\x1a\x45\xdf\xa3"  # Matroska (EBML) inside
        frames.append(_video_frames(av, clear))
    # The part cut by kill -9 holds what the muxer had flushed (it keeps the current
    # cluster in memory); the part stopped cleanly holds its seconds of video.
    print(f"\nvideo frames: interrupted part {frames[0]}, then complete parts {frames[1:]}")
    assert min(frames[1:]) > 60


def _recordings(site) -> list[dict]:
    conn = site.db()
    try:
        return consult_recordings.listing(conn)
    finally:
        conn.close()


def _video_frames(av, path) -> int:
    """Frames decodable from a recording (a part cut by kill -9 ends abruptly: count to there)."""
    n = 0
    try:
        with av.open(str(path)) as container:
            for _ in container.decode(video=0):
                n += 1
    except av.error.FFmpegError:
        pass
    return n


def test_recording_request_needs_consent_and_is_not_doubled(site):
    conn = site.db()
    cid = consults.create_consult(conn, "nurse")
    t0 = time.time()
    try:
        media_jobs.request(conn, cid, "record", "nurse", 60)
        raise AssertionError("recording without consent was accepted")
    except consults.ConsultError as e:
        assert "consent" in str(e)
    assert conn.execute("SELECT count(*) FROM consult_media_jobs").fetchone()[0] == 0
    consults.record_consent(conn, cid, "nurse")
    first = media_jobs.request(conn, cid, "record", "nurse", 60, now=t0)
    assert media_jobs.request(conn, cid, "record", "nurse", 60, now=t0 + 1) == first
    for bad in (0, 10**6):
        try:
            media_jobs.request(conn, cid, "probe", "nurse", bad)
            raise AssertionError(f"seconds={bad} accepted")
        except consults.ConsultError:
            pass
    # A job held by a process that is gone is taken over at once; a live holder's is not.
    owner = media_jobs.new_owner()
    assert [r["id"] for r in media_jobs.claim(conn, owner)] == [first]
    assert media_jobs.claim(conn, media_jobs.new_owner()) == []
    conn.execute("UPDATE consult_media_jobs SET lease_owner = ? WHERE id = ?",
                 (f"{os.uname().nodename}:999999:dead", first))
    assert [r["id"] for r in media_jobs.claim(conn, owner)] == [first]
    conn.close()


def test_appliance_up_runs_the_media_service_and_restarts_it(site):
    """``appliance up`` starts ``appliance media serve`` as a child (aiortc is importable here);
    its heartbeat shows on the status report; killed, it is started again."""
    require_module("aiortc")
    from conftest import appliance_cmd, wait_for_port

    cfg = config.load(site.data_dir)
    proc = subprocess.Popen(appliance_cmd("up", "--data-dir", str(site.data_dir)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def media_pid() -> int | None:
        conn = site.db()
        try:
            c = status_report.collect(cfg, conn)["components"].get("media")
        finally:
            conn.close()
        return c["pid"] if c and c["up"] else None

    try:
        wait_for_port(site.web_port, proc=proc)
        first = _wait(media_pid, 30)
        assert first, "no media heartbeat under appliance up"
        os.kill(first, signal.SIGKILL)
        second = _wait(lambda: (p := media_pid()) and p != first and p, 30)
        assert second and second != first, "media service not restarted"
        shown = site.cli("status")  # the responder's view lists it too, once it has run here
        assert re.search(rf"media\s+up.*pid {second}", shown.stdout), shown.stdout
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _wait(fn, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.3)
    return None
