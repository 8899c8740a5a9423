"""Consult recordings are bundled like any other record: an aiortc endpoint (the second WebRTC
stack) is recorded after consent through coturn; ``appliance sync now`` carries the sealed
recording in a signed bundle to a folder target, still encrypted inside; ``appliance restore``
on a fresh appliance puts it back, indexed, byte for byte."""

from __future__ import annotations

import asyncio
import stat
import subprocess
from pathlib import Path

import pyrage
from conftest import make_site, require_module, require_tool
from consult_aiortc_client import Endpoint, wait_for_media_participant
from test_consult_browser import configure_turn
from test_sync_common import age_identity

from appliance.consults import media, turn
from appliance.consults import recordings as consult_recordings
from appliance.consults import rooms as consults
from appliance.core import config, identity
from appliance.sync import outbox


def configure_recording_site(site, tmp_path: Path, folder: Path | None = None) -> Path:
    """coturn on a free port, an age recipient, optionally a folder sync target; the key file."""
    configure_turn(site)
    key = tmp_path / f"escrow-{site.data_dir.parent.name}.key"
    public = age_identity(key)
    path = site.data_dir / "appliance.yaml"
    text = path.read_text().replace("recipients: []", f'recipients: ["{public}"]')
    if folder is not None:
        text = text.replace("  target: none", "  target: folder", 1) \
            .replace('  folder: ""', f'  folder: "{folder}"', 1)
    path.write_text(text)
    return key


async def record_endpoint(cfg, cid: int, seconds: float) -> tuple[media.ProbeResult, list[Path],
                                                                   dict]:
    """An aiortc bedside endpoint sends a moving pattern and audio; the recorder takes it."""
    ep = Endpoint(cfg, cid, {"id": 1, "username": "nurse", "role": "site_staff"},
                  ice_servers=consults.ice_servers(cfg, "127.0.0.1", cid))
    rec = media.Recorder(cfg, cid)
    task = asyncio.ensure_future(rec.run(seconds))
    try:
        await ep.offer(await wait_for_media_participant(ep, "recorder"))
        await ep.run_until(task.done, seconds + 20)
        result = await task
    finally:
        await ep.close()
    return result, rec.seal(), {"errors": ep.errors}


def test_recording_rides_a_signed_bundle_and_is_restored(site, tmp_path):
    require_module("aiortc")
    av = require_module("av")
    require_tool("turnserver", "/usr/bin/turnserver")
    folder = tmp_path / "usb"
    folder.mkdir()
    key = configure_recording_site(site, tmp_path, folder)
    cfg = config.load(site.data_dir)
    conn = site.db()
    cid = consults.create_consult(conn, "nurse", title="Recorded consult")
    consults.record_consent(conn, cid, "nurse")
    conn.close()
    coturn = subprocess.Popen(turn.command(cfg), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        result, sealed, ep = asyncio.run(record_endpoint(cfg, cid, 5))
    finally:
        coturn.terminate()
        coturn.wait(timeout=10)
    assert result.errors == [] and ep["errors"] == []
    assert len(sealed) == 1 and stat.S_IMODE(sealed[0].stat().st_mode) == 0o600
    assert not list((site.data_dir / "recordings" / ".partial").iterdir())  # no clear media
    conn = site.db()
    rows = consult_recordings.listing(conn)
    conn.close()
    assert [(r["consult_id"], r["name"], r["complete"], r["origin"]) for r in rows] == \
        [(cid, sealed[0].name, 1, "local")]
    assert (rows[0]["sha256"], rows[0]["size"]) == consult_recordings.sha256_file(sealed[0])

    # Sync: the recording goes out in a bundle of kind "recording", signed and encrypted.
    r = site.cli("sync", "now")
    assert r.returncode == 0, r.stdout + r.stderr
    carried = [p for p in folder.rglob("*-recording-*.bundle")]
    assert len(carried) == 1, sorted(p.name for p in folder.rglob("*"))
    verify = site.cli("bundle", "verify", str(carried[0]))
    assert verify.returncode == 0 and "signed by key" in verify.stdout, verify.stderr
    opened = tmp_path / "opened"
    signer = identity.key_id(identity.load_signing_key(site.data_dir / "keys").public_key())
    r = site.cli("bundle", "open", str(carried[0]), "--identity", str(key), "--out", str(opened),
                 "--trust", signer)
    assert r.returncode == 0, r.stderr
    inside = opened / "recordings" / sealed[0].name
    assert inside.read_bytes() == sealed[0].read_bytes()  # carried as sealed, not re-encoded
    assert inside.read_bytes().startswith(b"age-encryption.org/v1")  # still encrypted inside
    clear = tmp_path / "clear.mkv"
    clear.write_bytes(pyrage.decrypt(inside.read_bytes(), bnd_identities(key)))
    with av.open(str(clear)) as container:
        assert {s.type for s in container.streams} >= {"video", "audio"}
        assert sum(1 for _ in container.decode(video=0)) > 20
    # A tampered copy of the bundle is refused by its signature check.
    bad = tmp_path / "tampered.bundle"
    data = bytearray(carried[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    assert site.cli("bundle", "verify", str(bad)).returncode == 1

    # Restore into a fresh appliance: the recording is back, still sealed, indexed.
    fresh = make_site(tmp_path / "fresh")
    r = fresh.cli("restore", "--from", str(folder), "--identity", str(key), "--trust", signer)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 consult recordings" in r.stdout
    back = fresh.data_dir / "recordings" / sealed[0].name
    assert back.read_bytes() == sealed[0].read_bytes()
    assert stat.S_IMODE(back.stat().st_mode) == 0o600
    conn = fresh.db()
    restored = consult_recordings.listing(conn)
    conn.close()
    assert [(x["consult_id"], x["name"], x["sha256"], x["origin"]) for x in restored] == \
        [(cid, sealed[0].name, rows[0]["sha256"], "restored")]
    # Restored recordings are not bundled again by the fresh appliance.
    conn = fresh.db()
    assert outbox.unbundled_recordings(conn) == []
    conn.close()


def bnd_identities(key: Path) -> list:
    from appliance.sync import bundle

    return bundle.load_identity(key)
