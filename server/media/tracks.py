"""The session's two aiortc tracks, fed by its clock, and the frames they carry.

Both tracks take their timestamps from the same tick counter k: video pts k x 3600 at 90 kHz,
audio pts k x 640 (+ 320) at 16 kHz, as two 20 ms frames. aiortc's Opus encoder numbers its
packets by sample count, so the audio track must never skip: every tick puts exactly 640
samples into it.

A track's queue is bounded; when the encoder falls behind, the oldest frame is dropped and
counted (`on_drop`).
"""

from __future__ import annotations

import asyncio
import fractions
import logging
from collections.abc import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from engines.base import SAMPLE_RATE, SAMPLES_PER_FRAME
from server.media.pictures import to_i420

log = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
AUDIO_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
VIDEO_TICKS_PER_FRAME = VIDEO_CLOCK // 25  # 3600
AUDIO_FRAME_SAMPLES = SAMPLE_RATE // 50  # 20 ms: one Opus packet
AUDIO_FRAMES_PER_TICK = SAMPLES_PER_FRAME // AUDIO_FRAME_SAMPLES  # 2


def video_frame(image: np.ndarray, k: int) -> av.VideoFrame:
    """Tick k's picture as a frame for the video track. I420 pictures are wrapped, not copied
    (`from_numpy_buffer`: ~0.006 ms instead of ~0.9 ms for 720p on the event loop); this is
    safe because no picture is written after it is made (workers hand out fresh arrays, the
    idle cache read-only ones) and the frame keeps a reference to its array."""
    i420 = np.ascontiguousarray(to_i420(image))  # copies only a strided picture
    frame = av.VideoFrame.from_numpy_buffer(i420, format="yuv420p")
    frame.pts = k * VIDEO_TICKS_PER_FRAME
    frame.time_base = VIDEO_TIME_BASE
    return frame


def audio_frames(pcm: np.ndarray, k: int) -> list[av.AudioFrame]:
    """Tick k's 640 samples as two 20 ms frames: aiortc sends one RTP packet per encoded
    frame and gives every packet of one `encode` call the same timestamp, so a 40 ms frame
    (two Opus packets) would reach the client as one packet and a duplicate."""
    if pcm.shape != (SAMPLES_PER_FRAME,):
        raise ValueError(f"a tick carries {SAMPLES_PER_FRAME} samples, got {pcm.shape}")
    out = []
    for half in range(AUDIO_FRAMES_PER_TICK):
        part = pcm[half * AUDIO_FRAME_SAMPLES : (half + 1) * AUDIO_FRAME_SAMPLES]
        frame = av.AudioFrame.from_ndarray(part.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = k * SAMPLES_PER_FRAME + half * AUDIO_FRAME_SAMPLES
        frame.time_base = AUDIO_TIME_BASE
        out.append(frame)
    return out


class QueueTrack(MediaStreamTrack):
    """A track whose frames are put into it by the session's clock."""

    def __init__(
        self,
        kind: str,
        maxsize: int,
        on_start: Callable[[str], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self._queue: asyncio.Queue[av.VideoFrame | av.AudioFrame | None] = asyncio.Queue(maxsize)
        self._on_start = on_start
        self._on_drop = on_drop
        self.started = False
        self.delivered = 0

    async def recv(self) -> av.VideoFrame | av.AudioFrame:  # type: ignore[override]
        if not self.started:
            self.started = True
            if self._on_start is not None:
                self._on_start(self.kind)
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._queue.get()
        if frame is None:
            raise MediaStreamError
        self.delivered += 1
        return frame

    @property
    def depth(self) -> int:
        """Frames waiting for the encoder now."""
        return self._queue.qsize()

    def put(self, frame: av.VideoFrame | av.AudioFrame) -> bool:
        """Queue a frame; False if the oldest had to be dropped to make room."""
        if self.readyState != "live":
            return True
        dropped = False
        if self._queue.full():
            self._queue.get_nowait()
            dropped = True
            if self._on_drop is not None:
                self._on_drop(self.kind)
        self._queue.put_nowait(frame)
        return not dropped

    def stop(self) -> None:
        if self.readyState == "live":
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(None)  # wakes a pending recv()
        super().stop()
