"""The video encoders aiortc makes for our tracks: timed, counted, and kept from re-starting
at every bandwidth estimate.

aiortc's `RTCRtpSender` makes its encoder with `get_encoder(codec)` on the first frame and
sets `encoder.target_bitrate` from every REMB packet the receiver sends. Its VP8 and H.264
encoders throw their codec away and open a new one -- whose first frame is a keyframe, tens
of KB of RTP where a frame is usually a few -- whenever the target differs from the codec's
bitrate by over 10 %. Measured on loopback (2 sessions, a 512x512 avatar, 1 minute): 16 codecs
opened for 2 streams, 8 per stream while the receiver's estimate ramped up over the first 15 s;
3 sessions of 1280x720 for 2 minutes: 26 re-openings.

The receiver's estimate is not a congestion signal by itself: while nothing queues, an
estimator keeps raising it whatever arrives (aiortc's reached 1.1 Mbps for a stream of 380
kbps), and it falls below what arrives only when packets queue up. What an encoder sends
depends on the picture (an idle avatar needs fewer bits than a speaking one), so an
estimate may be anywhere between; aiortc moves the target, re-opening the codec, each time.

`install()` wraps every video encoder aiortc makes in this process (it replaces
`get_encoder` in `aiortc.rtcrtpsender`, the one name the sender calls) in `WatchedEncoder`,
which measures what it really sends (payload bytes over the last 2 s) and lets
`BitratePolicy` decide which estimates reach the encoder:

- congestion (the estimate below what is being sent, and over 10 % below the target, in every
  report for a second): the target falls to the estimate, at most once a second;
- room (the estimate at least what is being sent and over 10 % above the target, and the
  encoder using at least 80 % of its target, so more bits would show): the target rises to
  the estimate, at most once every 4 s;
- otherwise (the estimate between what is sent and the target: the picture is just quiet)
  the target stays.

Every encode is also timed and every codec re-opening counted in `STATS` (this process's
totals), which the media processes' stats line reports.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

from server.media import encoder_tuning
from server.settings import EncoderTuning

STEP = 0.1  # aiortc's encoders re-open for a change over 10 %; smaller ones are ignored
CONGESTED = 0.95  # an estimate below this fraction of the sending rate: packets queue
USING = 0.8  # sending at least this fraction of the target: the target limits the picture
LOWER_AFTER_S = 1.0  # congestion reported this long, without a break, lowers the target
LOWER_EVERY_S = 1.0
RAISE_EVERY_S = 4.0
RATE_WINDOW_S = 2.0


class BitratePolicy:
    """Which receiver estimates (bps) become the encoder's target; see the module docstring."""

    def __init__(self, current: int, clock: Callable[[], float] = time.monotonic) -> None:
        if current <= 0:
            raise ValueError(f"a bitrate policy needs a target > 0 bps, got {current}")
        self.current = current
        self.changes = 0
        self._clock = clock
        self._last_change = clock()
        self._congested_since: float | None = None

    def propose(self, estimate: int, sending: float) -> int | None:
        """The new target for `estimate` while `sending` bps go out, or None to keep it."""
        now = self._clock()
        since = now - self._last_change
        congested = estimate < sending * CONGESTED and estimate < self.current * (1 - STEP)
        if not congested:
            self._congested_since = None
        elif self._congested_since is None:
            self._congested_since = now
        if congested and now - (self._congested_since or now) < LOWER_AFTER_S:
            congested = False  # not yet: one report below the sending rate is not congestion
        room = (
            estimate >= sending
            and estimate > self.current * (1 + STEP)
            and sending >= self.current * USING
        )
        if (congested and since >= LOWER_EVERY_S) or (room and since >= RAISE_EVERY_S):
            self.current = estimate
            self._last_change = now
            self._congested_since = None
            self.changes += 1
            return estimate
        return None


class SendRate:
    """Payload bits per second over the last `window_s` (encodes add from executor threads,
    the loop reads)."""

    def __init__(
        self, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sent: collections.deque[tuple[float, int]] = collections.deque()
        self._bytes = 0

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._sent.append((self._clock(), nbytes))
            self._bytes += nbytes
            self._expire()

    def bps(self) -> float:
        with self._lock:
            self._expire()
            return 8.0 * self._bytes / self.window_s

    def _expire(self) -> None:
        edge = self._clock() - self.window_s
        while self._sent and self._sent[0][0] < edge:
            self._bytes -= self._sent.popleft()[1]


class EncoderStats:
    """This process's video encodes: count, seconds, the slowest since the last `take`, and
    codec re-openings (thread-safe: encodes run on the loop's executor threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.encodes = 0
        self.encode_s = 0.0
        self.reopened = 0
        self.raised = 0  # targets the policy raised (room) / lowered (congestion)
        self.lowered = 0
        self._slowest_s = 0.0

    def encoded(self, took: float, reopened: bool) -> None:
        with self._lock:
            self.encodes += 1
            self.encode_s += took
            self._slowest_s = max(self._slowest_s, took)
            self.reopened += int(reopened)

    def target_changed(self, old: int, new: int) -> None:
        with self._lock:
            if new > old:
                self.raised += 1
            elif new < old:
                self.lowered += 1

    def take(self) -> dict[str, float]:
        """Totals so far and the slowest encode since the last call."""
        with self._lock:
            out = {
                "encodes": self.encodes,
                "encode_s": self.encode_s,
                "reopened": self.reopened,
                "raised": self.raised,
                "lowered": self.lowered,
                "slowest_s": self._slowest_s,
            }
            self._slowest_s = 0.0
        return out


STATS = EncoderStats()


class WatchedEncoder:
    """An aiortc video encoder behind `BitratePolicy` (fed its own sending rate), its encodes
    timed into `STATS`."""

    def __init__(self, inner: Any, stats: EncoderStats = STATS, steady: bool = True) -> None:
        self.inner = inner
        self.stats = stats
        self.policy = BitratePolicy(int(inner.target_bitrate)) if steady else None
        self.rate = SendRate()

    def encode(self, frame: Any, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        before = getattr(self.inner, "codec", None)
        t0 = time.perf_counter()
        payloads, timestamp = self.inner.encode(frame, force_keyframe)
        codec = getattr(self.inner, "codec", None)
        self.stats.encoded(time.perf_counter() - t0, before is not None and codec is not before)
        self.rate.add(sum(len(p) for p in payloads))
        return payloads, timestamp

    def pack(self, packet: Any) -> tuple[list[bytes], int]:
        return self.inner.pack(packet)  # type: ignore[no-any-return]

    @property
    def target_bitrate(self) -> int:
        return int(self.inner.target_bitrate)

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        if self.policy is None:  # aiortc's own way: every estimate
            self.inner.target_bitrate = bitrate
            return
        old = int(self.inner.target_bitrate)
        new = self.policy.propose(int(bitrate), self.rate.bps())
        if new is not None:
            self.inner.target_bitrate = new  # the encoder clamps it to its codec's range
            self.policy.current = int(self.inner.target_bitrate)
            self.stats.target_changed(old, self.policy.current)


_installed: Callable[[Any], Any] | None = None
_steady = True


def install(steady: bool = True, tuning: EncoderTuning | None = None) -> None:
    """Wrap the video encoders aiortc's senders make in this process from now on, behind the
    bitrate policy if `steady` (the setting steady_bitrate: one value per process; idempotent),
    their codecs set up by `tuning` (`server.media.encoder_tuning`; None: the server's defaults).
    Audio encoders, which have no bitrate, are left as they are."""
    global _installed, _steady
    import aiortc.rtcrtpsender as sender
    from aiortc.codecs import get_encoder

    _steady = steady
    encoder_tuning.apply(tuning or EncoderTuning())
    if _installed is not None and sender.get_encoder is _installed:
        return

    def watched(codec: Any) -> Any:
        encoder = get_encoder(codec)
        if codec.mimeType.lower().startswith("video/") and hasattr(encoder, "target_bitrate"):
            return WatchedEncoder(encoder, steady=_steady)
        return encoder

    sender.get_encoder = watched  # type: ignore[assignment]
    _installed = watched
