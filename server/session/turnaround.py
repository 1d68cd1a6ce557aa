"""How long the frame worker takes to turn a session's frames around, across all sessions, and
so how far ahead a new utterance must start for its frames to be there at their ticks.

A session hands frames to the worker as their audio completes and shows the first one `lead`
ticks later; the rest follow a tick apart, as their audio did. So every frame of an utterance
has the same slack: the time to the next tick plus `lead` ticks. Where the worker's turnaround
(hand-over to frames back on the event loop: the queue, the gather, the batch, the copy out)
runs past that slack, the frame is not there at its tick and the previous one is held (an
80 ms interval at the viewer). The engine's step time alone under-counts the turnaround under
load (the queue and the gather come before the step), so `Turnaround` keeps the recent
turnarounds themselves, and `lead_for` picks the smallest lead whose slack covers a high
quantile of them. A held tick shifts the rest of its utterance one tick later anyway; starting
the utterance that tick later costs the same latency without the stutter.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from engines.base import FPS

FRAME_S = 1.0 / FPS
WINDOW_S = 5.0  # turnarounds older than this are forgotten
MAX_SAMPLES = 4000  # at most this many kept (16 sessions give ~400 a second)
REFRESH_S = 0.25  # the quantile is recomputed at most this often (pump runs per tick and chunk)
MARGIN_S = 0.005  # the event loop's own delay between a frame arriving and its tick
MAX_LEAD_FRAMES = 5  # 200 ms: past that the engine is overloaded, and more lead hides it
# only frames handed over with at most this much slack count: those of speech arriving in real
# time. A TTS that streams ahead hands frames over up to a second early, and the worker rightly
# makes them later (earliest deadline first), which is no turnaround the lead must cover
URGENT_S = (MAX_LEAD_FRAMES + 1) * FRAME_S


class Turnaround:
    """Recent turnarounds (seconds) of all sessions' frames; event-loop only."""

    def __init__(self, quantile: float, window_s: float = WINDOW_S) -> None:
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        self.quantile = quantile
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self._need = 0.0
        self._computed_at = -math.inf

    def add(self, now: float, seconds: float, slack_s: float) -> None:
        """One item's turnaround, `slack_s` being its first frame's slack when handed over
        (ignored past URGENT_S)."""
        if slack_s <= URGENT_S:
            self._samples.append((now, max(0.0, seconds)))

    def need(self, now: float) -> float:
        """The `quantile` of the turnarounds of the last `window_s` (0.0 without any)."""
        if now - self._computed_at >= REFRESH_S:
            while self._samples and now - self._samples[0][0] > self.window_s:
                self._samples.popleft()
            values = [s for _, s in self._samples]
            self._need = float(np.quantile(values, self.quantile)) if values else 0.0
            self._computed_at = now
        return self._need


def lead_for(need_s: float, to_next_tick_s: float) -> int:
    """The fewest ticks of lead whose slack (`to_next_tick_s` + lead x FRAME_S) covers
    `need_s` plus MARGIN_S, at most MAX_LEAD_FRAMES."""
    short = need_s + MARGIN_S - max(0.0, to_next_tick_s)
    if short <= 0:
        return 0
    return min(MAX_LEAD_FRAMES, math.ceil(short / FRAME_S - 1e-9))
