"""The recorder's file: picture and sound whatever arrives first, and at any picture size.

aiortc's own MediaRecorder lost the whole picture when an audio packet was written
before the first video frame (about one recording in five in the aiortc test):
these drive ``media.TrackFile`` with aiortc's synthetic tracks, audio first.
"""

from __future__ import annotations

import asyncio
from fractions import Fraction

from conftest import require_module

from appliance.consults import media


def _tracks(video_delay_s: float, width: int = 640, height: int = 480):
    from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack
    from av import VideoFrame

    class LateVideo(VideoStreamTrack):
        """The first frame only after ``video_delay_s``; every frame at the given size."""

        async def recv(self):
            if not hasattr(self, "_timestamp") and video_delay_s:
                await asyncio.sleep(video_delay_s)
            pts, time_base = await self.next_timestamp()
            frame = VideoFrame(width=width, height=height)
            frame.pts, frame.time_base = pts, time_base or Fraction(1, 90000)
            return frame

    return [AudioStreamTrack(), LateVideo()]


def _record(tmp_path, seconds: float, **kw) -> tuple[int, int, tuple[int, int]]:
    import av

    path = tmp_path / "part.mkv"

    async def run():
        rec = media.TrackFile(path, _tracks(**kw))
        await rec.start()
        await asyncio.sleep(seconds)
        await rec.stop()

    asyncio.run(run())
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        size = (video.codec_context.width, video.codec_context.height)
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        audio = sum(1 for _ in container.decode(audio=0))
    return frames, audio, size


def test_audio_first_still_records_the_picture(tmp_path):
    require_module("aiortc")
    frames, audio, size = _record(tmp_path, 2.0, video_delay_s=0.5)
    assert frames > 20 and audio > 50
    assert size == (640, 480)


def test_picture_arriving_after_the_wait_is_scaled_not_lost(tmp_path, monkeypatch):
    require_module("aiortc")
    monkeypatch.setattr(media.TrackFile, "VIDEO_WAIT_S", 0.2)
    frames, audio, size = _record(tmp_path, 2.0, video_delay_s=0.6, width=320, height=240)
    assert frames > 20 and audio > 50
    assert size == (640, 480)  # fixed when the wait ran out; 320×240 frames scaled into it
