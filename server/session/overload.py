"""Are the engine and the host keeping up with the sessions they have? Over the last few
seconds, across all sessions: the ticks where a speaking frame was handed to the engine and
had not come back in time (`Tick.engine_late`), against the speaking ticks; and the video
frames dropped before the encoders (the host's CPU not keeping up with the encoding: on the
H200's 16-core host, 16 sessions of 720p dropped 2350 frames in 70 s while the GPU kept up),
against all the video frames the sessions' clocks sent, leaving out the one session that
dropped most: a host that cannot keep up drops across all its sessions, while one session's
own trouble (a peer that stopped reading, an oversized avatar) must not close the server to
everyone. Audio that comes late (a slow TTS, a jittery microphone) does not count: its frames
were never handed out.

`SessionManager.slot` refuses a new session (503 + Retry-After, reason `overloaded`) while
either fraction is above `Settings.admit_max_late`: one more session would make every session
later still (on a GPU the batches grow and all sessions fall behind together), so the server
keeps the ones it has whole instead. The window needs `min_ticks` speaking ticks before it
judges, so one late frame in a short utterance refuses nobody.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

WINDOW_S = 10.0
MIN_TICKS = 250  # one session speaking for 10 s, or ten for 1 s


@dataclass
class _Second:
    second: int
    speaking: int = 0
    late: int = 0
    sent: Counter[str] = field(default_factory=Counter)  # video frames, by session
    dropped: Counter[str] = field(default_factory=Counter)


class LateFrames:
    """Speaking and engine-late ticks, and video frames sent and dropped by session, per
    second of the last `window_s` seconds."""

    def __init__(self, window_s: float = WINDOW_S, min_ticks: int = MIN_TICKS) -> None:
        if window_s <= 0 or min_ticks < 1:
            raise ValueError("window_s must be > 0 and min_ticks >= 1")
        self.window_s = window_s
        self.min_ticks = min_ticks
        self._seconds: deque[_Second] = deque()

    def tick(self, now: float, speaking: bool, late: bool, session: str = "") -> None:
        """One tick of `session`'s clock (a video frame sent, whatever its kind)."""
        row = self._row(now)
        row.speaking += speaking
        row.late += late
        row.sent[session] += 1

    def dropped(self, now: float, session: str = "") -> None:
        """A video frame of `session` dropped before its encoder."""
        self._row(now).dropped[session] += 1

    def fraction(self, now: float) -> float | None:
        """Late ticks / (speaking + late ticks) over the window; None with too few to judge."""
        self._drop_old(now)
        speaking = sum(r.speaking for r in self._seconds)
        late = sum(r.late for r in self._seconds)
        if speaking + late < self.min_ticks:
            return None
        return late / (speaking + late)

    def drop_fraction(self, now: float) -> float | None:
        """Dropped / sent video frames over the window, without the session that dropped
        most; None with too few frames (of the other sessions) to judge."""
        self._drop_old(now)
        sent: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        for r in self._seconds:
            sent.update(r.sent)
            dropped.update(r.dropped)
        worst = max(dropped, key=dropped.__getitem__) if dropped else None
        others_sent = sent.total() - (sent[worst] if worst is not None else 0)
        if others_sent < self.min_ticks:
            return None
        others_dropped = dropped.total() - (dropped[worst] if worst is not None else 0)
        return min(1.0, others_dropped / others_sent)

    def over(self, now: float, limit: float) -> bool:
        """True if the late or the drop fraction is above `limit` (0: the check is off)."""
        return self.why(now, limit) is not None

    def why(self, now: float, limit: float) -> str | None:
        """Which fraction is over `limit` ("late" or "dropped"), None if neither (or off)."""
        if limit <= 0:
            return None
        late = self.fraction(now)
        if late is not None and late > limit:
            return "late"
        dropped = self.drop_fraction(now)
        if dropped is not None and dropped > limit:
            return "dropped"
        return None

    def _row(self, now: float) -> _Second:
        second = int(now)
        if not self._seconds or self._seconds[-1].second != second:
            self._seconds.append(_Second(second))
            self._drop_old(now)
        return self._seconds[-1]

    def _drop_old(self, now: float) -> None:
        oldest = int(now - self.window_s)
        while self._seconds and self._seconds[0].second <= oldest:
            self._seconds.popleft()
