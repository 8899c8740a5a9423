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

from appliance.consults import recordings as consult_recordings
from appliance.consults import rooms as consults
from appliance.core import db

log = logging.getLogger("appliance.media")
POLL_S = 0.05
STREAM_CPU_SHARE = 0.2  # measured: one 640x480 relayed stream, re-encoded by aiortc
# Matroska as libav writes it by default keeps everything in memory until the end when one
# stream is late (interleaving) and clusters of up to 5 s: a recorder killed mid-call would
# leave an empty file. A cluster a second, written through at once, bounds the loss to ~1 s.
RECORDER_FLUSH = {"cluster_time_limit": "1000", "flush_packets": "1",
                  "max_interleave_delta": "1000000"}


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

    deadline = 0.0

    def stop(self) -> None:
        """Leave at the next poll (the media service stopping, a recording stopped)."""
        self.deadline = 0.0

    async def run(self, seconds: float) -> ProbeResult:
        """Stay in the consult ``seconds`` (or until :meth:`stop`), then leave; returns what
        was measured."""
        self.deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < self.deadline:
                me = consults.participant(self.conn, self.pid)
                if me is None or me["state"] != "admitted":
                    self.result.errors.append("removed from the consult")
                    break
                for ev in consults.events_after(self.conn, self.cid, me, self.cursor):
                    self.cursor = ev["id"]
                    if ev["kind"] == "signal":
                        await self._on_signal(ev["sender"], ev["body"])
                    elif ev["kind"] == "system" and ev["body"].get("ended"):
                        self.deadline = 0.0
                    elif ev["kind"] == "presence":
                        await self._on_roster(ev["body"].get("roster") or [])
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
                self._before_answer(pc, sender)
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

    async def _on_roster(self, roster: list[dict]) -> None:
        """Someone came or went (the relay gives back a stream when an endpoint leaves)."""

    def _before_answer(self, pc, sender: int) -> None:
        """Receive only: the probe and the recorder send nothing back."""
        for t in pc.getTransceivers():
            t.direction = "recvonly"

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
            path = consult_recordings.partial_path(self.cfg.data_dir, self.cid, self.job_id,
                                                   sender, current[0])
            rec = TrackFile(path, tracks)
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


class TrackFile:
    """One participant's audio and video into one Matroska file (H.264 + AAC), as it arrives.

    Why not aiortc's ``MediaRecorder``: it sizes the video stream from the first
    video frame, but the container opens every codec when the first packet of
    any stream is written; when audio came first (about one recording in five
    in the aiortc test) setting the size raised, the video task died silently
    and the file had sound and no picture.  Here audio waits for the first
    video frame (at most ``VIDEO_WAIT_S``; then the picture is 640×480) and
    PyAV scales frames of any later size, as a sender adapting its resolution
    to the link does.  A frame that cannot be written is logged and skipped,
    never the end of the recording.
    """

    VIDEO_WAIT_S = 3.0

    def __init__(self, path: Path, tracks: list):
        import av

        self.container = av.open(str(path), mode="w", format="matroska", options=RECORDER_FLUSH)
        self.sized = asyncio.Event()
        self.streams: dict[str, tuple[Any, Any]] = {}  # kind -> (track, output stream)
        for track in tracks:
            if track.kind in self.streams:
                continue
            if track.kind == "video":
                stream = self.container.add_stream("libx264", rate=30)
                stream.pix_fmt, stream.width, stream.height = "yuv420p", 640, 480
            else:
                stream = self.container.add_stream("aac")
            self.streams[track.kind] = (track, stream)
        if "video" not in self.streams:
            self.sized.set()
        self.tasks: list[asyncio.Task] = []
        self.skipped = 0

    async def start(self) -> None:
        for kind, (track, stream) in self.streams.items():
            self.tasks.append(asyncio.ensure_future(self._run(kind, track, stream)))
        if not self.sized.is_set():
            self.tasks.append(asyncio.ensure_future(self._size_deadline()))

    async def _size_deadline(self) -> None:
        try:
            await asyncio.wait_for(self.sized.wait(), self.VIDEO_WAIT_S)
        except TimeoutError:
            self.sized.set()  # no picture yet (audio-only step?): sound is not held back longer

    async def _run(self, kind: str, track, stream) -> None:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if kind == "video" and not self.sized.is_set():
                stream.width, stream.height = frame.width, frame.height  # no packet written yet
                self.sized.set()
            elif kind != "video":
                await self.sized.wait()
            self._write(stream, frame)

    def _write(self, stream, frame) -> None:
        try:
            for packet in stream.encode(frame):
                self.container.mux(packet)
        except Exception as e:  # one bad frame (a timestamp going back) must not end the file
            self.skipped += 1
            if self.skipped == 1:
                log.warning("recording: a frame could not be written: %s", e)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for _track, stream in self.streams.values():
            self._write(stream, None)  # what the encoders still hold
        self.container.close()


class RelayCapacity:
    """Streams the media service relays at once, against :func:`check_relay`'s ceiling."""

    def __init__(self, max_streams: int, cpus: int | None = None):
        self.max_streams, self.cpus, self.active = max_streams, cpus, 0

    def take(self, n: int = 1) -> None:
        check_relay(self.active, n, self.max_streams, self.cpus)
        self.active += n

    def release(self, n: int = 1) -> None:
        self.active = max(0, self.active - n)


def _forward_track(kind: str, relay: Any, pick, on_frame):
    """A track sent to one endpoint that carries another endpoint's incoming track.

    It exists before the other side's media does (the answer needs it), waits for a
    source, and follows a new source when the other side reconnects (a fresh peer
    connection). MediaRelay lets the recorder or a second consumer share a source.
    """
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class Forward(MediaStreamTrack):
        def __init__(self) -> None:
            super().__init__()
            self.kind = kind
            self._src = self._sub = None

        async def recv(self):
            while self.readyState == "live":
                src = pick()
                if src is not self._src:
                    self._src = src
                    self._sub = relay.subscribe(src, buffered=False) if src else None
                if self._sub is None:
                    await asyncio.sleep(0.02)
                    continue
                try:
                    frame = await self._sub.recv()
                except MediaStreamError:
                    self._src = self._sub = None
                    await asyncio.sleep(0.02)
                    continue
                on_frame(kind)
                return frame
            raise MediaStreamError

    return Forward()


class Relay(Participant):
    """The relay of last resort: each endpoint sends to the appliance, which forwards it on.

    For endpoints that cannot reach each other even through TURN. Each endpoint
    offers to the relay participant; the answer carries, per kind, a track that
    forwards the other endpoint's incoming track (decoded and re-encoded by aiortc,
    about a fifth of a core per 640x480 video stream). Every endpoint taken costs
    one stream of the service-wide :class:`RelayCapacity`; beyond it the endpoint
    is refused with :func:`check_relay`'s message (a signal to it, and a system
    event the whole consult sees), and nothing else changes.
    """

    def __init__(self, cfg: Any, consult_id: int, capacity: RelayCapacity):
        super().__init__(cfg, consult_id, "relay")
        from aiortc.contrib.media import MediaRelay

        self.capacity, self.relay = capacity, MediaRelay()
        self.incoming: dict[int, dict[str, Any]] = {}
        self.endpoints: set[int] = set()
        self.refused: set[int] = set()
        self.forwarded = {"video": 0, "audio": 0}

    async def _peer(self, sender: int, gen: int):
        pc = await super()._peer(sender, gen)
        if pc is not None and not getattr(pc, "_relay_hooked", False):
            pc._relay_hooked = True
            pc.on("track", lambda track: self.incoming.setdefault(sender, {}).__setitem__(
                track.kind, track))
        return pc

    def _consume(self, track) -> None:
        if track.kind == "video":
            self.result.video_tracks += 1  # forwarded, not drained: MediaRelay reads it

    def _pick(self, to: int, kind: str):
        for sender, tracks in sorted(self.incoming.items()):
            track = tracks.get(kind)
            if sender != to and sender in self.endpoints and track is not None \
                    and track.readyState == "live":
                return track
        return None

    def _counted(self, kind: str) -> None:
        self.forwarded[kind] += 1
        if kind == "video":
            self.result.frames += 1
            if self.first_frame_at is None:
                self.first_frame_at = time.monotonic()
                self.result.join_ms = round((self.first_frame_at - self.started) * 1000)

    def _before_answer(self, pc, sender: int) -> None:
        for t in pc.getTransceivers():
            if t.sender.track is None and t.kind in ("audio", "video"):
                pc.addTrack(_forward_track(t.kind, self.relay,
                                           lambda k=t.kind: self._pick(sender, k), self._counted))

    async def _on_signal(self, sender: int, data: dict) -> None:
        if sender not in self.endpoints:
            if sender in self.refused or (data.get("description") or {}).get("type") != "offer":
                return  # a stream is taken by an offer only; a refused one's candidates drop
            try:
                self.capacity.take(1)
            except MediaError as e:
                self.refused.add(sender)
                self.result.errors.append(str(e))
                self._send(sender, {"gen": data.get("gen") or 0, "error": str(e)})
                consults.post_event(self.conn, self.cid, None, "system",
                                    {"relay_refused": str(e), "participant": sender})
                log.warning("consult %s: %s", self.cid, e)
                return
            self.endpoints.add(sender)
        await super()._on_signal(sender, data)

    async def _on_roster(self, roster: list[dict]) -> None:
        present = {p["id"] for p in roster if p.get("state") == "admitted"}
        for gone in sorted(self.endpoints - present):
            self.endpoints.discard(gone)
            self.capacity.release(1)
            self.incoming.pop(gone, None)
            _gen, pc = self.peers.pop(gone, (0, None))
            if pc is not None:
                await pc.close()
        self.refused &= present
        if self.capacity.active < relay_capacity(self.capacity.max_streams, self.capacity.cpus):
            self.refused.clear()  # a stream is free: a refused page's next offer is heard

    async def close(self) -> None:
        self.capacity.release(len(self.endpoints))
        self.endpoints.clear()
        await super().close()


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
