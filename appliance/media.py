"""``appliance media``: the appliance's own WebRTC participant (aiortc, one asyncio loop).

Consult media normally runs browser to browser; Python joins only when it
must: a synthetic probe that measures join time and frame rate for the SLO
dashboard, a recorder (after consent; receive-only), and a relay of last
resort capped at what the CPU carries (aiortc decodes and re-encodes every
relayed stream, about a fifth of a core at 640×480).

It signals exactly like a browser, through the ``consult_events`` table
(``appliance.consults``), not over HTTP: it runs on the appliance and shares
the data directory. It never offers; it answers the browser's offers (with
the offer's generation, so the browser's fresh peer connections and ICE
restarts are followed). aiortc cannot do trickle ICE itself, so its
candidates travel inside its answer; the browser's trickled candidates are
added as they come. aioice skips 127.0.0.1 as a host candidate, so on a
loopback-only appliance the probe reaches browsers through coturn.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import consult_recordings, consults, db

log = logging.getLogger("appliance.media")
POLL_S = 0.05
STREAM_CPU_SHARE = 0.2  # measured: one 640x480 relayed stream, re-encoded by aiortc


class MediaError(Exception):
    """A refused media action (no consent, over capacity); the message is shown as is."""


@dataclass
class ProbeResult:
    consult_id: int
    participant_id: int
    join_ms: float | None = None
    frames: int = 0
    audio_frames: int = 0
    video_tracks: int = 0
    fps: float = 0.0
    longest_gap_ms: float = 0.0
    generations: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def relay_capacity(max_streams: int, cpus: int | None = None) -> int:
    """Streams the relay may carry: the configured cap, never more than the CPUs can."""
    cpus = cpus or os.cpu_count() or 1
    return max(0, min(max_streams, int(cpus * 0.8 / STREAM_CPU_SHARE)))


def check_relay(active: int, wanted: int, max_streams: int, cpus: int | None = None) -> None:
    """Refuse a relay beyond capacity with a message a responder can act on."""
    cap = relay_capacity(max_streams, cpus)
    if active + wanted > cap:
        raise MediaError(
            f"relay refused: {active} stream(s) already relayed, {wanted} more asked, capacity"
            f" {cap} on this machine (each re-encoded stream takes about"
            f" {STREAM_CPU_SHARE:.0%} of a core). Ask the endpoints to use TURN over TCP, or"
            " raise consults.relay_max_streams on a bigger machine.")


def ice_configuration(servers: list[dict]):
    """aiortc's RTCConfiguration from the same iceServers a browser gets."""
    from aiortc import RTCConfiguration, RTCIceServer

    out = []
    for s in servers:
        urls = [u for u in s["urls"] if "transport=tcp" not in u] or s["urls"]
        out.append(RTCIceServer(urls=urls, username=s.get("username"),
                                credential=s.get("credential")))
    return RTCConfiguration(iceServers=out)


class Participant:
    """One aiortc participant in one consult: answers offers, consumes what arrives."""

    def __init__(self, cfg: Any, consult_id: int, purpose: str = "probe",
                 turn_host: str = "127.0.0.1"):
        self.cfg, self.cid, self.purpose = cfg, consult_id, purpose
        self.turn_host = cfg["consults"]["turn_host"] or turn_host
        self.conn = db.connect(cfg.db_path)
        self.pid = consults.join_media(self.conn, consult_id, purpose)
        self.cursor = consults.cursor(self.conn, consult_id)
        self.started = time.monotonic()
        self.result = ProbeResult(consult_id, self.pid)
        self.peers: dict[int, tuple[int, Any]] = {}  # remote id -> (generation, pc)
        self.tasks: set[asyncio.Task] = set()
        self.last_frame = 0.0

    async def run(self, seconds: float) -> ProbeResult:
        """Stay in the consult ``seconds``, then leave; returns what was measured."""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                me = consults.participant(self.conn, self.pid)
                if me is None or me["state"] != "admitted":
                    self.result.errors.append("removed from the consult")
                    break
                for ev in consults.events_after(self.conn, self.cid, me, self.cursor):
                    self.cursor = ev["id"]
                    if ev["kind"] == "signal":
                        await self._on_signal(ev["sender"], ev["body"])
                    elif ev["kind"] == "system" and ev["body"].get("ended"):
                        deadline = 0
                await asyncio.sleep(POLL_S)
        finally:
            await self.close()
        elapsed = time.monotonic() - (self.first_frame_at or time.monotonic())
        if self.result.frames and elapsed > 0:
            self.result.fps = round(self.result.frames / elapsed, 1)
        return self.result

    first_frame_at: float | None = None

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for _gen, pc in self.peers.values():
            await pc.close()
        consults.leave(self.conn, self.cid, self.pid)
        self.conn.close()

    def _send(self, to: int, data: dict) -> None:
        me = consults.participant(self.conn, self.pid)
        consults.signal(self.conn, self.cid, me, to, data)

    async def _peer(self, sender: int, gen: int):
        """The connection for this sender at this generation (a newer one replaces it)."""
        from aiortc import RTCPeerConnection

        current = self.peers.get(sender)
        if current is not None and current[0] >= gen:
            return current[1] if current[0] == gen else None
        if current is not None:
            await current[1].close()
        servers = consults.ice_servers(self.cfg, self.turn_host, self.cid)
        pc = RTCPeerConnection(ice_configuration(servers))
        pc.on("track", lambda track: self._consume(track))
        self.peers[sender] = (gen, pc)
        self.result.generations += 1
        return pc

    async def _on_signal(self, sender: int, data: dict) -> None:
        from aiortc import RTCSessionDescription
        from aiortc.sdp import candidate_from_sdp

        gen = int(data.get("gen") or 0)
        pc = await self._peer(sender, gen)
        if pc is None:
            return  # an older generation
        try:
            desc = data.get("description")
            if desc and desc.get("type") == "offer":
                await pc.setRemoteDescription(RTCSessionDescription(desc["sdp"], "offer"))
                for t in pc.getTransceivers():
                    t.direction = "recvonly"
                await pc.setLocalDescription(await pc.createAnswer())
                local = pc.localDescription
                self._send(sender, {"gen": gen, "description": {"type": local.type,
                                                               "sdp": local.sdp}})
            for c in data.get("candidates") or ([data["candidate"]] if data.get("candidate")
                                                else []):
                if not c or not c.get("candidate"):
                    continue
                cand = candidate_from_sdp(c["candidate"].split(":", 1)[1])
                cand.sdpMid, cand.sdpMLineIndex = c.get("sdpMid"), c.get("sdpMLineIndex")
                await pc.addIceCandidate(cand)
        except Exception as e:  # a bad message must not end the probe
            self.result.errors.append(f"{type(e).__name__}: {e}")
            log.warning("signal from %s: %s", sender, e)

    def _consume(self, track) -> None:
        if track.kind == "video":
            self.result.video_tracks += 1
        task = asyncio.ensure_future(self._drain(track))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _drain(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            if track.kind != "video":
                self.result.audio_frames += 1
                continue
            if self.first_frame_at is None:
                self.first_frame_at = now
                self.result.join_ms = round((now - self.started) * 1000)
            elif self.last_frame:
                self.result.longest_gap_ms = max(self.result.longest_gap_ms,
                                                 round((now - self.last_frame) * 1000))
            self.last_frame = now
            self.result.frames += 1


def probe(cfg: Any, consult_id: int, seconds: float) -> ProbeResult:
    """Join as a receive-only probe for ``seconds``; record the join time like a browser does."""
    async def main() -> ProbeResult:
        p = Participant(cfg, consult_id, "probe")
        result = await p.run(seconds)
        conn = db.connect(cfg.db_path)
        try:
            me = consults.participant(conn, p.pid)
            if result.join_ms is not None:
                consults.record_ladder(conn, consult_id, me, {"step": "joined",
                                                             "join_ms": result.join_ms})
        finally:
            conn.close()
        return result

    return asyncio.run(main())


class Recorder(Participant):
    """Receive-only, after consent: each remote participant's audio+video into one file.

    Media is written to a 0600 file under ``recordings/.partial/`` while the call
    runs, then encrypted with age to ``sync.recipients`` (the same keys every bundle
    is encrypted to), the clear file removed and the sealed file indexed
    (:mod:`appliance.consult_recordings`), so only ciphertext stays on disk and sync
    bundles carry it. ``job_id`` names the media-service job (0 from the CLI).
    """

    def __init__(self, cfg: Any, consult_id: int, job_id: int = 0):
        self.recipients = _recipients(cfg)
        super().__init__(cfg, consult_id, "recorder")
        self.job_id = job_id
        self.pending: dict[int, list] = {}
        self.recorders: list[tuple[Any, Path]] = []

    async def _peer(self, sender: int, gen: int):
        pc = await super()._peer(sender, gen)
        if pc is not None and not getattr(pc, "_recording_hooked", False):
            pc._recording_hooked = True
            self.pending[id(pc)] = []
            pc.on("track", lambda track: self.pending[id(pc)].append(track))
        return pc

    def _consume(self, track) -> None:
        if track.kind == "video":
            self.result.video_tracks += 1  # recorded, not drained: see _on_signal

    async def _on_signal(self, sender: int, data: dict) -> None:
        await super()._on_signal(sender, data)
        current = self.peers.get(sender)
        tracks = self.pending.pop(id(current[1]), None) if current else None
        if tracks:
            from aiortc.contrib.media import MediaRecorder

            path = consult_recordings.partial_path(self.cfg.data_dir, self.cid, self.job_id,
                                                   sender, current[0])
            rec = MediaRecorder(str(path), format="matroska")
            for t in tracks:
                rec.addTrack(t)
            await rec.start()
            self.recorders.append((rec, path))
            if self.result.join_ms is None:
                self.result.join_ms = round((time.monotonic() - self.started) * 1000)

    async def close(self) -> None:
        for rec, _path in self.recorders:
            await rec.stop()
        await super().close()

    def seal(self) -> list[Path]:
        """Encrypt every finished part to the recipients, remove the clear files, index them."""
        sealed = []
        conn = db.connect(self.cfg.db_path)
        try:
            for _rec, path in self.recorders:
                if not path.exists():
                    continue
                if path.stat().st_size == 0:  # nothing arrived: nothing to keep
                    path.unlink()
                    continue
                target = consult_recordings.seal_file(path, self.recipients)
                consult_recordings.register(conn, target)
                sealed.append(target)
        finally:
            conn.close()
        self.recorders = []
        return sealed


def _recipients(cfg: Any) -> list:
    from pyrage import x25519

    keys = cfg["sync"]["recipients"]
    if not keys:
        raise MediaError("recording needs sync.recipients (age public keys) to encrypt to:"
                         " nothing is recorded in the clear")
    return [x25519.Recipient.from_str(k) for k in keys]


def record(cfg: Any, consult_id: int, seconds: float) -> tuple[ProbeResult, list[Path]]:
    """Record a consult (consent first) for ``seconds``; returns what was written, encrypted."""
    async def main() -> tuple[ProbeResult, list[Path]]:
        rec = Recorder(cfg, consult_id)
        result = await rec.run(seconds)
        return result, rec.seal()

    return asyncio.run(main())


def result_json(result: ProbeResult) -> str:
    return json.dumps(result.as_dict(), sort_keys=True)
