"""One session's speech, turned into frame jobs as its audio arrives.

A `SpeechStream` holds the current utterance (float32 mono 16 kHz). Frame i of the utterance
is ready once `ready_horizon(i)` samples are in (its 120 ms lookahead), or, after `end()`,
once the utterance is complete. Each job's horizon is `min(ready_horizon(i), final length)`,
a function of the audio alone, so frames never depend on how the audio was chunked.

An utterance yields floor(duration x 25) frames, as MuseTalk's offline inference does, so its
last n mod 640 samples belong to no frame. A stream made with `pad_end=True` (the server's:
every sample sent before `end` is played) pads that last partial frame with silence at `end`,
so it yields ceil(duration x 25) frames and the padded audio is what the frame reads and plays.
"""

from __future__ import annotations

import numpy as np

from engines.base import SAMPLE_RATE, SAMPLES_PER_FRAME, FrameJob, frames_in, ready_horizon

MAX_UTTERANCE_S = 300  # a longer utterance is ended and a new one begun


def pcm16_to_float(data: bytes) -> np.ndarray:
    """PCM s16le bytes -> float32 in [-1, 1). Raises ValueError on an odd byte count."""
    if len(data) % 2:
        raise ValueError(f"PCM16 needs an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


class SpeechStream:
    """The utterance being spoken and which of its frames have been handed out."""

    def __init__(self, max_utterance_s: float = MAX_UTTERANCE_S, pad_end: bool = False) -> None:
        self._max_samples = int(max_utterance_s * SAMPLE_RATE)
        self._pad_end = pad_end
        self._chunks: list[np.ndarray] = []
        self._audio = np.zeros(0, dtype=np.float32)
        self._n = 0
        self._next = 0  # next frame index to hand out
        self._ended = False
        self.start_loop_position = 0

    # -- input -------------------------------------------------------------------------
    def push(self, samples: np.ndarray) -> None:
        """Append float32 samples to the utterance (starting a new one after `end`)."""
        if self._ended and self.pending == 0:
            self.reset()
        if self._ended:
            raise RuntimeError("audio pushed after end() before the utterance's frames were taken")
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        room = self._max_samples - self._n
        if samples.size > room:
            raise OverflowError(f"utterance longer than {self._max_samples / SAMPLE_RATE:.0f} s")
        if samples.size:
            self._chunks.append(samples)
            self._n += samples.size

    def end(self) -> None:
        """The utterance is complete: its last frames become ready (with `pad_end`, the last
        partial frame filled up with silence first)."""
        if self._ended:
            return
        short = -self._n % SAMPLES_PER_FRAME
        if self._pad_end and short:
            self._chunks.append(np.zeros(short, dtype=np.float32))
            self._n += short
        self._ended = True

    def reset(self, loop_position: int | None = None) -> None:
        """Drop the utterance (interrupt or after it finished)."""
        self._chunks.clear()
        self._audio = np.zeros(0, dtype=np.float32)
        self._n = 0
        self._next = 0
        self._ended = False
        if loop_position is not None:
            self.start_loop_position = loop_position

    # -- state -------------------------------------------------------------------------
    @property
    def audio(self) -> np.ndarray:
        """The utterance so far, one contiguous float32 array."""
        if self._chunks:
            self._audio = np.concatenate([self._audio, *self._chunks])
            self._chunks.clear()
        return self._audio

    @property
    def n_samples(self) -> int:
        return self._n

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def total_frames(self) -> int | None:
        """Frames in the utterance once it has ended, else None."""
        return frames_in(self._n) if self._ended else None

    @property
    def ready_frames(self) -> int:
        """Frames whose audio is complete (handed out or not)."""
        if self._ended:
            return frames_in(self._n)
        if self._n < ready_horizon(0):
            return 0
        return (self._n - ready_horizon(0)) // SAMPLES_PER_FRAME + 1

    @property
    def pending(self) -> int:
        """Ready frames not yet handed out."""
        return max(0, self.ready_frames - self._next)

    @property
    def finished(self) -> bool:
        """Ended and every frame handed out."""
        return self._ended and self._next >= frames_in(self._n)

    def take(self, limit: int | None = None) -> list[FrameJob]:
        """Hand out the ready frames not yet taken (at most `limit`)."""
        stop = self.ready_frames if limit is None else min(self.ready_frames, self._next + limit)
        jobs = [
            FrameJob(
                index=i,
                horizon=min(ready_horizon(i), self._n) if self._ended else ready_horizon(i),
                loop_position=self.start_loop_position + i,
            )
            for i in range(self._next, stop)
        ]
        self._next = max(self._next, stop)
        return jobs
