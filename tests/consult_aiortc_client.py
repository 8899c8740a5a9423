"""An aiortc consult endpoint for tests: a second WebRTC stack standing in for a browser.

It joins a consult as a signed-in user and signals through the consult tables,
exactly as ``appliance media`` does (the same rows a browser's HTTP posts
write), sends a synthetic camera (aiortc's test pattern) and microphone, and
counts the frames it receives. It always offers; ``strip_candidates`` removes
every ICE candidate from its offer so that the other side has no path to it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from appliance.consults import rooms as consults
from appliance.core import db

SENDER_FPS = 15


def _pattern_track(width: int = 320, height: int = 240):
    """A moving synthetic camera (encoders skip a still green picture almost to nothing)."""
    import fractions

    import av
    import numpy as np
    from aiortc import VideoStreamTrack

    class Pattern(VideoStreamTrack):
        n = 0

        async def recv(self):
            pts, time_base = await self.next_timestamp()
            self.n += 1
            img = np.zeros((height, width, 3), dtype=np.uint8)
            img[:, (self.n * 4) % width:, 1] = 200
            img[(self.n * 2) % height:, :, 2] = 120
            frame = av.VideoFrame.from_ndarray(img, format="bgr24")
            frame.pts, frame.time_base = pts, time_base or fractions.Fraction(1, 90000)
            return frame

    return Pattern()


def _strip(sdp: str) -> str:
    """The SDP without any ICE candidate: the other side gets no address to reach us at."""
    return "".join(line + "\r\n" for line in sdp.splitlines()
                   if not line.startswith("a=candidate"))


class Endpoint:
    """One aiortc participant: joins, offers to others, counts what arrives."""

    def __init__(self, cfg: Any, consult_id: int, user: dict[str, Any],
                 ice_servers: list[dict] | None = None, send: bool = True,
                 size: tuple[int, int] = (320, 240)):
        self.cfg, self.cid, self.send, self.size = cfg, consult_id, send, size
        self.conn = db.connect(cfg.db_path)
        self.pid = consults.join_user(self.conn, consult_id, user)
        self.cursor = consults.cursor(self.conn, consult_id)
        self.ice = ice_servers or []
        self.pcs: dict[int, Any] = {}
        self.frames: dict[str, int] = {"video": 0, "audio": 0}
        self.first_video_at: float | None = None
        self.started = time.monotonic()
        self.errors: list[str] = []
        self.system: list[dict] = []
        self.tasks: set[asyncio.Task] = set()
        self.strip: set[int] = set()

    def _config(self):
        from aiortc import RTCConfiguration, RTCIceServer

        return RTCConfiguration(iceServers=[
            RTCIceServer(urls=[u for u in s["urls"] if "transport=tcp" not in u],
                         username=s.get("username"), credential=s.get("credential"))
            for s in self.ice])

    async def offer(self, to: int, strip_candidates: bool = False) -> Any:
        """Offer audio+video to participant ``to`` (generation 0)."""
        from aiortc import AudioStreamTrack, RTCPeerConnection

        pc = RTCPeerConnection(self._config())
        pc.on("track", self._on_track)
        if self.send:
            pc.addTrack(_pattern_track(*self.size))
            pc.addTrack(AudioStreamTrack())
        else:
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        if strip_candidates:
            self.strip.add(to)
            sdp = _strip(sdp)
        self.pcs[to] = pc
        me = consults.participant(self.conn, self.pid)
        consults.signal(self.conn, self.cid, me, to,
                        {"gen": 0, "description": {"type": "offer", "sdp": sdp}})
        return pc

    def _on_track(self, track) -> None:
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
            self.frames[track.kind] = self.frames.get(track.kind, 0) + 1
            if track.kind == "video" and self.first_video_at is None:
                self.first_video_at = time.monotonic()

    async def pump(self) -> None:
        """Apply answers (and errors) addressed to this endpoint; note system events."""
        from aiortc import RTCSessionDescription

        me = consults.participant(self.conn, self.pid)
        for ev in consults.events_after(self.conn, self.cid, me, self.cursor):
            self.cursor = ev["id"]
            if ev["kind"] == "system":
                self.system.append(ev["body"])
            if ev["kind"] != "signal":
                continue
            body, pc = ev["body"], self.pcs.get(ev["sender"])
            if body.get("error"):
                self.errors.append(body["error"])
            desc = body.get("description")
            if desc and desc.get("type") == "offer":
                await self._answer(ev["sender"], desc["sdp"])
            if pc is not None and desc and desc.get("type") == "answer":
                try:
                    await pc.setRemoteDescription(RTCSessionDescription(desc["sdp"], "answer"))
                except Exception as e:  # noqa: BLE001 - the test reads the reason
                    self.errors.append(f"{type(e).__name__}: {e}")

    async def _answer(self, sender: int, sdp: str) -> None:
        """Answer another endpoint's offer (stripped of candidates if it stripped its own)."""
        from aiortc import AudioStreamTrack, RTCPeerConnection, RTCSessionDescription

        pc = RTCPeerConnection(self._config())
        pc.on("track", self._on_track)
        self.pcs[sender] = pc
        await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        if self.send:
            pc.addTrack(_pattern_track(*self.size))
            pc.addTrack(AudioStreamTrack())
        await pc.setLocalDescription(await pc.createAnswer())
        answer = pc.localDescription.sdp
        if "a=candidate" not in sdp:
            answer = _strip(answer)
        me = consults.participant(self.conn, self.pid)
        consults.signal(self.conn, self.cid, me, sender,
                        {"gen": 0, "description": {"type": "answer", "sdp": answer}})

    async def run_until(self, done, timeout: float) -> bool:
        """Pump signaling until ``done()`` is true or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self.pump()
            if done():
                return True
            await asyncio.sleep(0.05)
        return done()

    def roster(self) -> list[dict]:
        return consults.roster(self.conn, self.cid)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for pc in self.pcs.values():
            if pc is not None:
                await pc.close()
        consults.leave(self.conn, self.cid, self.pid)
        self.conn.close()


async def wait_for_media_participant(ep: Endpoint, role: str, timeout: float = 20.0) -> int:
    """The id of the appliance's own participant (``role``: probe, recorder, relay) once in."""
    found: list[int] = []

    def done() -> bool:
        found[:] = [p["id"] for p in ep.roster() if p["kind"] == "media" and p["role"] == role
                    and p["state"] == "admitted"]
        return bool(found)

    assert await ep.run_until(done, timeout), f"no appliance {role} joined in {timeout} s"
    return found[0]
