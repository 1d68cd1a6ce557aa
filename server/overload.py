"""Is the engine keeping up with the sessions it has? Over the last few seconds, across all
sessions: the ticks where a speaking frame was handed to the engine and had not come back in
time (`Tick.engine_late`), against the speaking ticks. Audio that comes late (a slow TTS, a
jittery microphone) does not count: its frames were never handed out.

`SessionManager.slot` refuses a new session (503 + Retry-After, reason `overloaded`) while
the fraction is above `Settings.admit_max_late`: one more session would make every session
later still (on a GPU the batches grow and all sessions fall behind together), so the server
keeps the ones it has whole instead. The window needs `min_ticks` speaking ticks before it
judges, so one late frame in a short utterance refuses nobody.
"""

from __future__ import annotations

from collections import deque

WINDOW_S = 10.0
MIN_TICKS = 250  # one session speaking for 10 s, or ten for 1 s


class LateFrames:
    """Speaking and engine-late ticks per second of the last `window_s` seconds."""

    def __init__(self, window_s: float = WINDOW_S, min_ticks: int = MIN_TICKS) -> None:
        if window_s <= 0 or min_ticks < 1:
            raise ValueError("window_s must be > 0 and min_ticks >= 1")
        self.window_s = window_s
        self.min_ticks = min_ticks
        self._seconds: deque[list[int]] = deque()  # [second, speaking ticks, late ticks]

    def tick(self, now: float, speaking: bool, late: bool) -> None:
        if not (speaking or late):
            return
        second = int(now)
        if not self._seconds or self._seconds[-1][0] != second:
            self._seconds.append([second, 0, 0])
            self._drop_old(now)
        row = self._seconds[-1]
        row[1] += speaking
        row[2] += late

    def fraction(self, now: float) -> float | None:
        """Late ticks / (speaking + late ticks) over the window; None with too few to judge."""
        self._drop_old(now)
        speaking = sum(r[1] for r in self._seconds)
        late = sum(r[2] for r in self._seconds)
        if speaking + late < self.min_ticks:
            return None
        return late / (speaking + late)

    def over(self, now: float, limit: float) -> bool:
        """True if the late fraction is above `limit` (0: the check is off)."""
        if limit <= 0:
            return False
        got = self.fraction(now)
        return got is not None and got > limit

    def _drop_old(self, now: float) -> None:
        oldest = int(now - self.window_s)
        while self._seconds and self._seconds[0][0] <= oldest:
            self._seconds.popleft()
