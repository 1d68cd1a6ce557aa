"""lipstream as a LiveKit avatar worker (LiveKit Agents' avatar protocol).

A voice agent built with LiveKit Agents sends its TTS audio to the avatar as `lk.audio_stream`
byte streams (`DataStreamAudioOutput`); the avatar worker joins the room as its own participant,
receives that audio with `DataStreamAudioReceiver`, makes video with a `VideoGenerator` under
`AvatarRunner` (which publishes both tracks on behalf of the agent and answers `lk.clear_buffer`,
`lk.playback_started`, `lk.playback_finished`).

Our `VideoGenerator` is a normal lipstream `Session` whose media link is the generator itself
(`RoomLink`) instead of a WebRTC peer: the session's 25 fps clock hands each tick's I420 picture
and its 640 samples of 16 kHz audio to the link, and the generator yields them as LiveKit's own
`VideoFrame` / `AudioFrame`. Audio only while an utterance plays (so `AvatarRunner`'s playback
position counts speech, not silence); `AudioSegmentEnd` where the session says playback finished.

This module imports `livekit`; `server.api.livekit` answers 501 where it does not import.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import (
    AudioSegmentEnd,
    AvatarOptions,
    VideoGenerator,
)

from engines.base import FPS, SAMPLE_RATE
from server.media.link import MediaEvents, MediaLink
from server.media.pictures import to_i420
from server.session.session import AudioRefused, Session

log = logging.getLogger(__name__)

TICK_QUEUE = 50  # ticks held for a consumer that is not reading (2 s), then the oldest go
PACE_WAIT_S = 0.05  # how long push_audio sleeps while the session's audio budget refills
_END = object()


@dataclass(frozen=True)
class _Tick:
    picture: np.ndarray
    pcm: np.ndarray | None


class RoomLink(MediaLink):
    """The session's media link: ticks and session events into one FIFO, in their order."""

    def __init__(self, events: MediaEvents, on_drop: Callable[[], None] | None = None) -> None:
        self.events = events
        # a tick dropped because the room's side is not reading (e.g. the runner waits for a
        # subscriber before it publishes): counted, but not as a frame the host was too slow for
        self.on_drop = on_drop
        self._fifo: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._ticks = 0
        self._queued = 0  # ticks in the FIFO
        self._closed = False
        self.on_close: Callable[[], Any] | None = None  # awaited once, by close

    def send(self, k: int, picture: np.ndarray, pcm: np.ndarray | None) -> None:
        if self._closed:
            return
        self._ticks += 1
        if self._queued >= TICK_QUEUE:  # the oldest tick goes; events stay (state changes)
            oldest = next(i for i, e in enumerate(self._fifo) if isinstance(e, _Tick))
            del self._fifo[oldest]
            self._queued -= 1
            if self.on_drop is not None:
                self.on_drop()
        self._queued += 1
        self._put(_Tick(picture, pcm))

    def event(self, event: dict[str, Any]) -> None:
        if not self._closed:
            self._put(event)

    def drop_ticks(self) -> int:
        """Drop every tick not yet taken (a clear); returns how many."""
        n, self._queued = self._queued, 0
        self._fifo = deque(e for e in self._fifo if not isinstance(e, _Tick))
        return n

    def _put(self, item: Any) -> None:
        self._fifo.append(item)
        self._ready.set()

    async def take(self) -> Any:
        """The next tick or event; `_END` once closed."""
        while not self._fifo:
            if self._closed:
                return _END
            self._ready.clear()
            await self._ready.wait()
        return self._pop()

    def take_nowait(self) -> Any | None:
        return self._pop() if self._fifo else None

    def _pop(self) -> Any:
        item = self._fifo.popleft()
        if isinstance(item, _Tick):
            self._queued -= 1
        return item

    def peek(self) -> Any | None:
        return self._fifo[0] if self._fifo else None

    @property
    def state(self) -> str | None:
        return None if self._closed else "connected"

    async def packets_received(self) -> int:
        return self._ticks  # the room is alive while the clock runs; the room's end ends it

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fifo.clear()
        self._queued = 0
        self._ready.set()
        if self.on_close is not None:
            try:
                await self.on_close()
            except Exception:
                log.exception("livekit worker close failed")


class RoomSession(Session):
    """A session whose events go into its room link's FIFO (no websocket)."""

    def emit(self, event: dict[str, Any]) -> None:
        if isinstance(self.media, RoomLink):
            self.media.event(event)


class SessionVideoGenerator(VideoGenerator):
    """LiveKit's `VideoGenerator` over a lipstream session (see the module docstring)."""

    def __init__(
        self,
        session: RoomSession,
        link: RoomLink,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.session = session
        self.link = link
        self.on_event = on_event
        rows, self.width = session.pictures.shape
        self.height = rows * 2 // 3
        self._resampler: rtc.AudioResampler | None = None
        self._resample_from = SAMPLE_RATE
        self._pending: deque[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd] = deque()
        self._playing = False
        self._started = False

    @property
    def options(self) -> AvatarOptions:
        return AvatarOptions(
            video_width=self.width,
            video_height=self.height,
            video_fps=float(FPS),
            audio_sample_rate=SAMPLE_RATE,
            audio_channels=1,
        )

    # -- audio in -------------------------------------------------------------------------
    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            for tail in self._flush_resampler():
                await self._push_pcm(tail)
            self.session.end_utterance()
            return
        for pcm in self._to_16k(frame):
            await self._push_pcm(pcm)

    def _to_16k(self, frame: rtc.AudioFrame) -> list[bytes]:
        data = np.frombuffer(frame.data, dtype=np.int16)
        if frame.num_channels > 1:
            data = data.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
        if frame.sample_rate == SAMPLE_RATE:
            return [data.tobytes()]
        if self._resampler is None or self._resample_from != frame.sample_rate:
            self._resampler = rtc.AudioResampler(frame.sample_rate, SAMPLE_RATE, num_channels=1)
            self._resample_from = frame.sample_rate
        return [bytes(f.data) for f in self._resampler.push(bytearray(data.tobytes()))]

    def _flush_resampler(self) -> list[bytes]:
        if self._resampler is None:
            return []
        out = [bytes(f.data) for f in self._resampler.flush()]
        self._resampler = None
        return out

    async def _push_pcm(self, pcm: bytes) -> None:
        if not pcm or self.session.closed:
            return
        need_s = len(pcm) / 2 / SAMPLE_RATE
        limiter = self.session.audio_limiter
        # the agent's TTS comes faster than real time: wait for the budget, never drop
        # (a token bucket refills with time: there is no event to wait on)
        while limiter.available_s(self.session.loop.time()) < min(need_s, limiter.burst_s):  # noqa: ASYNC110
            await asyncio.sleep(PACE_WAIT_S)
        try:
            self.session.push_audio(pcm)
        except AudioRefused as exc:
            log.warning(
                "livekit audio refused",
                extra={"session_id": self.session.id, "code": exc.code, "error": str(exc)},
            )

    def clear_buffer(self) -> None:
        self._resampler = None
        self.link.drop_ticks()
        self._pending.clear()
        self.session.clear()  # its interrupted playback_finished comes through the FIFO

    # -- frames out ------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self

    async def __anext__(self) -> rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd:
        if not self._started:  # the consumer is here: the session's clock may run
            self._started = True
            self.link.events.started("video")
            self.link.events.started("audio")
        while not self._pending:
            item = await self.link.take()
            if item is _END:
                raise StopAsyncIteration
            if isinstance(item, _Tick):
                self.session.touch()  # a room session lives as long as its room, silent or not
                events: list[dict[str, Any]] = []
                while isinstance(event := self.link.peek(), dict):  # this tick's events follow
                    self.link.take_nowait()
                    events.append(event)
                self._frames(item, events)
            else:
                self._frames(None, [item])
        return self._pending.popleft()

    def _frames(self, tick: _Tick | None, events: list[dict[str, Any]]) -> None:
        """One tick's items. An utterance's `playback_finished` ends its segment after this
        tick's audio (its last), unless the next utterance starts on this same tick: then the
        segment ends first and this tick's audio is the new utterance's."""
        segment_end = False
        for event in events:
            if self.on_event is not None:
                self.on_event(event)
            kind = event.get("type")
            if kind == "playback_started":
                if segment_end:
                    self._pending.append(AudioSegmentEnd())
                    segment_end = False
                self._playing = True
            elif kind == "playback_finished":
                if event.get("interrupted"):  # AvatarRunner's clear handler told the agent
                    self._playing = segment_end = False
                elif self._playing:
                    segment_end = True
        if tick is not None:
            self._pending.append(self._video(tick.picture))
            if self._playing and tick.pcm is not None:
                self._pending.append(self._audio(tick.pcm))
        if segment_end:
            self._playing = False
            self._pending.append(AudioSegmentEnd())

    def _video(self, picture: np.ndarray) -> rtc.VideoFrame:
        i420 = np.ascontiguousarray(to_i420(picture))
        return rtc.VideoFrame(self.width, self.height, rtc.VideoBufferType.I420, i420.tobytes())

    @staticmethod
    def _audio(pcm: np.ndarray) -> rtc.AudioFrame:
        pcm = np.ascontiguousarray(pcm, dtype=np.int16)
        return rtc.AudioFrame(pcm.tobytes(), SAMPLE_RATE, 1, pcm.size)
