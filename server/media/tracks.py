"""The session's two aiortc tracks, fed by its clock, and the frames they carry.

Both tracks take their timestamps from the same tick counter k: video pts k x 3600 at 90 kHz,
audio pts k x 1920 (+ 960) at 48 kHz, as two 20 ms frames. aiortc's Opus encoder numbers its
packets by sample count, so the audio track must never skip: every tick puts exactly 40 ms of
audio into it.

The audio is handed to aiortc as its Opus encoder takes it, 48 kHz stereo s16 in 960-sample
frames, so each frame's packet leaves at once, with its tick's video. (Fed 16 kHz frames,
aiortc's own resampler holds each packet back until the next frame arrives; fed mono, it
upmixes at -3 dB.) `AudioFramer` makes those frames: the session's 16 kHz mono samples,
upsampled x3 by a polyphase windowed-sinc filter whose state carries from one tick to the next
(no clicks at tick boundaries; a constant delay of `UPSAMPLE_DELAY_S`, about 1 ms), the same
samples in both channels.

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
VIDEO_TICKS_PER_FRAME = VIDEO_CLOCK // 25  # 3600
OPUS_RATE = 48_000  # what aiortc's Opus encoder runs at
UPSAMPLE = OPUS_RATE // SAMPLE_RATE  # 3
AUDIO_TIME_BASE = fractions.Fraction(1, OPUS_RATE)
AUDIO_FRAME_SAMPLES = OPUS_RATE // 50  # 20 ms: one Opus packet
AUDIO_TICK_SAMPLES = SAMPLES_PER_FRAME * UPSAMPLE  # 1920: 40 ms at 48 kHz
AUDIO_FRAMES_PER_TICK = AUDIO_TICK_SAMPLES // AUDIO_FRAME_SAMPLES  # 2
TAPS_PER_PHASE = 32  # input samples each output sample reads (2 ms at 16 kHz)
UPSAMPLE_DELAY_S = (TAPS_PER_PHASE * UPSAMPLE - 1) / 2 / OPUS_RATE


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


def _upsample_phases() -> np.ndarray:
    """(TAPS_PER_PHASE, UPSAMPLE) coefficients, each column applied to the newest input
    samples, oldest first: a Kaiser-windowed sinc low-pass at 16 kHz's Nyquist frequency, each
    phase normalised to unit gain at 0 Hz. Flat within 0.01 dB to 7 kHz, -6 dB at 8 kHz, at
    least 60 dB down from 9 kHz on (the images of the 16 kHz audio)."""
    length = TAPS_PER_PHASE * UPSAMPLE
    m = np.arange(length) - (length - 1) / 2
    prototype = np.sinc(m / UPSAMPLE) * np.kaiser(length, 5.65)
    phases = prototype.reshape(TAPS_PER_PHASE, UPSAMPLE).T  # [p, j] = h[UPSAMPLE * j + p]
    phases = phases / phases.sum(axis=1, keepdims=True)
    return np.ascontiguousarray(phases[:, ::-1].T, dtype=np.float32)  # (taps, phases)


_PHASES = _upsample_phases()


class AudioFramer:
    """One session's audio, tick by tick, as the 48 kHz stereo frames the audio track sends
    (see the module docstring). Keeps the upsampling filter's last input samples."""

    def __init__(self) -> None:
        self._history = np.zeros(TAPS_PER_PHASE - 1, dtype=np.float32)

    def upsample(self, pcm: np.ndarray) -> np.ndarray:
        """640 int16 samples at 16 kHz -> 1920 int16 samples at 48 kHz."""
        buf = np.concatenate([self._history, np.asarray(pcm, dtype=np.float32)])
        self._history = buf[-(TAPS_PER_PHASE - 1) :]
        windows = np.lib.stride_tricks.sliding_window_view(buf, TAPS_PER_PHASE)
        out = (np.ascontiguousarray(windows) @ _PHASES).reshape(-1)  # phases interleaved in time
        return np.clip(np.rint(out), -32768, 32767).astype(np.int16)

    def frames(self, pcm: np.ndarray, k: int) -> list[av.AudioFrame]:
        """Tick k's 640 samples as two 20 ms frames: aiortc sends one RTP packet per encoded
        frame and gives every packet of one `encode` call the same timestamp, so a 40 ms
        frame (two Opus packets) would reach the client as one packet and a duplicate."""
        if pcm.shape != (SAMPLES_PER_FRAME,):
            raise ValueError(f"a tick carries {SAMPLES_PER_FRAME} samples, got {pcm.shape}")
        wide = self.upsample(pcm)
        stereo = np.repeat(wide, 2)  # L and R interleaved, the same samples in both
        out = []
        for half in range(AUDIO_FRAMES_PER_TICK):
            part = stereo[2 * half * AUDIO_FRAME_SAMPLES : 2 * (half + 1) * AUDIO_FRAME_SAMPLES]
            frame = av.AudioFrame.from_ndarray(part.reshape(1, -1), format="s16", layout="stereo")
            frame.sample_rate = OPUS_RATE
            frame.pts = k * AUDIO_TICK_SAMPLES + half * AUDIO_FRAME_SAMPLES
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
