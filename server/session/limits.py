"""Input limits that need state or translation from the settings.

- `decode_limits(settings)`: the `avatars.decode.DecodeLimits` an upload is probed and decoded
  against (picture size, duration, frame count, decoded bytes, decode time, file size).
- `AudioRateLimiter`: a token bucket over audio samples. A client may send `burst_s` seconds of
  audio ahead of real time, then at most `rate` seconds of audio per second. Audio over the limit
  is refused (the message is dropped and the client gets one `rate_limited` error event per
  `notice_every_s`); the session itself goes on. Playout plays audio at real time, so without
  this a client could queue unbounded audio (memory) faster than it is ever played.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from avatars.decode import DecodeLimits
from engines.base import SAMPLE_RATE
from server.settings import Settings

log = logging.getLogger(__name__)


def decode_limits(settings: Settings) -> DecodeLimits:
    return DecodeLimits(
        max_width=settings.avatar_max_side,
        max_height=settings.avatar_max_side,
        max_seconds=settings.avatar_max_seconds,
        max_frames=settings.avatar_max_frames,
        max_file_bytes=settings.max_upload_bytes,
        max_decoded_bytes=settings.avatar_max_decoded_bytes,
        max_decode_seconds=settings.avatar_decode_timeout_s,
    )


@dataclass
class AudioRateLimiter:
    """Token bucket in samples; see the module docstring. `now` is a monotonic time in s."""

    burst_s: float
    rate: float
    notice_every_s: float = 1.0
    refused_samples: int = 0
    refused_messages: int = 0
    _tokens: float = field(init=False)
    _last: float | None = field(init=False, default=None)
    _last_notice: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not self.burst_s > 0 or not self.rate > 0:
            raise ValueError("AudioRateLimiter needs burst_s > 0 and rate > 0")
        self._tokens = self.burst_s * SAMPLE_RATE

    @property
    def capacity(self) -> float:
        return self.burst_s * SAMPLE_RATE

    def available_s(self, now: float) -> float:
        """Seconds of audio the client may send now."""
        self._refill(now)
        return self._tokens / SAMPLE_RATE

    def allow(self, n_samples: int, now: float) -> bool:
        """Take `n_samples` if the bucket holds them (then True); else count a refusal."""
        self._refill(now)
        if n_samples <= self._tokens:
            self._tokens -= n_samples
            return True
        self.refused_samples += n_samples
        self.refused_messages += 1
        return False

    def should_notify(self, now: float) -> bool:
        """Whether a refusal now should be told to the client (at most once per period)."""
        if self._last_notice is None or now - self._last_notice >= self.notice_every_s:
            self._last_notice = now
            return True
        return False

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self._tokens = min(
                self.capacity, self._tokens + (now - self._last) * self.rate * SAMPLE_RATE
            )
        if self._last is None or now > self._last:
            self._last = now
