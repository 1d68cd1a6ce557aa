"""Input limits that need state or translation from the settings.

- `decode_limits(settings)`: the `avatars.decode.DecodeLimits` an upload is probed and decoded
  against (picture size, duration, frame count, decoded bytes, decode time, file size).
- `AudioRateLimiter`: a token bucket over audio samples. A client may send `burst_s` seconds of
  audio ahead of real time, then at most `rate` seconds of audio per second. Audio over the limit
  is refused (the message is dropped and the client gets one `rate_limited` error event per
  `notice_every_s`); the session itself goes on. Playout plays audio at real time, so without
  this a client could queue unbounded audio (memory) faster than it is ever played.
- `MessageBudget`: token buckets over a session's websocket messages and bytes (whatever they
  hold: audio, control, garbage), so the work a client causes does not grow with how fast it
  writes. The audio socket closes with 1008 when either runs out; the budget belongs to the
  session, so a new socket starts where the old one stopped, and after such a close a new one
  is refused until the budget has refilled to half (`ready`).
- `RepeatedWarning`: one log line per period for a warning that may repeat per message, with
  the number of times it happened meanwhile.
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


@dataclass
class TokenBucket:
    """`capacity` tokens, refilled at `rate` a second; `now` is a monotonic time in s."""

    capacity: float
    rate: float
    _tokens: float = field(init=False)
    _last: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not self.capacity > 0 or not self.rate > 0:
            raise ValueError("TokenBucket needs capacity > 0 and rate > 0")
        self._tokens = self.capacity

    def take(self, n: float, now: float) -> bool:
        """Take `n` tokens if there are that many (then True)."""
        self._refill(now)
        if n <= self._tokens:
            self._tokens -= n
            return True
        return False

    def fill(self, now: float) -> float:
        """How full the bucket is, 0..1."""
        self._refill(now)
        return self._tokens / self.capacity

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now


class MessageBudget:
    """A session's websocket budget; see the module docstring."""

    REOPEN_FILL = 0.5  # after a close over budget, a new socket waits for both this full

    def __init__(
        self, messages_per_s: float, message_burst: int, bytes_per_s: float, byte_burst: int
    ) -> None:
        self.messages = TokenBucket(message_burst, messages_per_s)
        self.bytes = TokenBucket(byte_burst, bytes_per_s)
        self.closes = 0  # sockets closed for going over
        self.notice = RepeatedWarning()  # the log line about it
        self._waiting = False  # the last socket was closed over budget

    def take(self, n_bytes: int, now: float) -> str | None:
        """Count one message of `n_bytes`: None while within the budget, else what ran out
        ("messages" or "bytes")."""
        if not self.messages.take(1, now):
            return "messages"
        if not self.bytes.take(n_bytes, now):
            return "bytes"
        return None

    def closed_over(self) -> None:
        """The socket was closed for going over: the next one waits (`ready`)."""
        self.closes += 1
        self._waiting = True

    def ready(self, now: float) -> bool:
        """Whether a new socket may open: always, unless the last one was closed over budget
        and the buckets have not refilled to `REOPEN_FILL` since."""
        if self._waiting:
            self._waiting = min(self.messages.fill(now), self.bytes.fill(now)) < self.REOPEN_FILL
        return not self._waiting


@dataclass
class RepeatedWarning:
    """See the module docstring. `hit(now)` counts one occurrence and returns 0 when it is not to
    be logged, else how many occurrences the log line stands for (this one included)."""

    every_s: float = 1.0
    _count: int = field(init=False, default=0)
    _last: float | None = field(init=False, default=None)

    def hit(self, now: float) -> int:
        self._count += 1
        if self._last is not None and now - self._last < self.every_s:
            return 0
        self._last = now
        count, self._count = self._count, 0
        return count
