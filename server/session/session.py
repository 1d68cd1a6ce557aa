"""Sessions: one avatar, one peer connection, one audio websocket, one playout clock.

A `Session` owns its tracks, its clock task and its playout. Audio from the websocket goes into
the playout (`push_audio`, `end_utterance`, `clear`); ready frame jobs go to the shared
`FrameWorker`; made frames come back on the event loop; the clock (25 ticks a second) puts one
picture and 640 audio samples into the tracks per tick.

`SessionManager` owns all sessions: the session limit (503 + Retry-After), draining, ending
(DELETE, peer close/ICE failure, connect and idle timeouts) and the reaper task. Every end
cancels the clock, drops the session's queued work, stops the tracks and closes the peer
connection (errors there are logged, never raised).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import numpy as np

from avatars.avatar import Avatar
from engines.base import Engine
from engines.stream import pcm16_to_float
from server.media.link import MediaEvents, MediaLink
from server.media.tracks import I420Cache, i420_image, i420_shape, to_i420
from server.metrics import ServerMetrics, SessionStats
from server.session.limits import AudioRateLimiter
from server.session.liveness import PeerWatch
from server.session.overload import LateFrames
from server.session.playout import Made, Playout, Tick
from server.session.turnaround import FRAME_S, Turnaround, lead_for
from server.session.worker import Worker, WorkerStopped, WorkItem
from server.settings import Settings

log = logging.getLogger(__name__)

# I420 pictures of unchanged avatar frames, shared by all sessions (AvatarService.delete
# forgets an avatar's)
IDLE_FRAMES = I420Cache()

EVENT_QUEUE = 256
ALL_TRACKS_WAIT_S = 2.0  # after the first track starts, how long the clock waits for the other
WS_CLOSE_WAIT_S = 1.0  # how long an ending session waits for its socket to say goodbye


class SessionLimitError(Exception):
    """No room for another session now (or the server is draining).

    `reason` says why, for machines (the 503's JSON body and the refusal metric's label):
    "draining", "limit" (at max_sessions) or "overloaded" (the engine or the host is not
    keeping up: `server.session.overload`).
    """

    def __init__(self, message: str, retry_after: int, reason: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason


class Session:
    """See the module docstring. All methods run on the event loop."""

    def __init__(
        self,
        *,
        avatar: Avatar,
        engine: Engine,
        worker: Worker,
        settings: Settings,
        metrics: ServerMetrics,
    ) -> None:
        self.id = "se_" + secrets.token_hex(8)
        self.token = secrets.token_urlsafe(24)
        self.avatar = avatar
        self.engine = engine
        self.worker = worker
        self.settings = settings
        self.metrics = metrics
        self.loop = asyncio.get_running_loop()
        self.created = self.loop.time()
        self.created_wall = time.time()
        self.last_activity = self.created
        self.state = "new"  # new -> connected -> ended
        self.end_reason: str | None = None
        self.stats = SessionStats()
        self.playout = Playout(
            self._idle_image,
            lead=settings.start_lead_frames,
            hold=settings.hold_frames,
            max_ahead=settings.max_ahead_frames,
        )
        self.media: MediaLink | None = None  # the peer connection (here or in a media process)
        self.audio_limiter = AudioRateLimiter(settings.audio_burst_s, settings.audio_rate)
        self.peer_watch = PeerWatch()
        self.wanted: set[str] = {"video"}
        self._started: set[str] = set()
        self._first_track = asyncio.Event()
        self._all_tracks = asyncio.Event()
        self._clock: asyncio.Task[None] | None = None
        self._next_tick = self.created
        self._closed = False
        self._events: asyncio.Queue[dict[str, Any]] | None = None
        self._ws_gone = asyncio.Event()
        self.ws: Any = None  # the attached websocket, if any
        self.late_frames: LateFrames | None = None  # the server's overload window (add)
        self.turnaround: Turnaround | None = None  # the worker's recent turnarounds (add)

    # -- info ----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def info(self) -> dict[str, Any]:
        now = self.loop.time()
        return {
            "session_id": self.id,
            "avatar_id": self.avatar.id,
            "state": self.state,
            "end_reason": self.end_reason,
            "created": self.created_wall,
            "age_s": round(now - self.created, 3),
            "idle_s": round(now - self.last_activity, 3),
            "peer": self.media.state if self.media is not None else None,
            "audio_ws_connected": self.ws is not None,
            "speaking": self.playout.speaking,
            "playout": self.playout.state(),
            **self.stats.snapshot(),
        }

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the clock (it waits for the peer to pull the tracks)."""
        if self._clock is None:
            self._clock = asyncio.create_task(self._run_clock(), name=f"clock-{self.id}")

    def mark_connected(self) -> None:
        if self.state == "new":
            self.state = "connected"
            log.info("session connected", extra={"session": self.id})

    async def close(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.state = "ended"
        self.end_reason = reason
        if self._clock is not None:
            self._clock.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._clock
            self._clock = None
        self.worker.cancel(self.id)
        self.playout.clear()
        if self.ws is not None:
            # the socket's sender passes this on and then closes the socket (1000)
            self.emit({"type": "session_ended", "reason": reason})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ws_gone.wait(), WS_CLOSE_WAIT_S)
        if self.ws is not None:
            ws, self.ws = self.ws, None
            with contextlib.suppress(Exception):
                await ws.close(code=1000, reason="session ended")
        if self.media is not None:
            media, self.media = self.media, None
            await media.close()
        log.info("session ended", extra={"session": self.id, "reason": reason})

    # -- websocket side ------------------------------------------------------------------
    def attach(self, ws: Any) -> tuple[asyncio.Queue[dict[str, Any]], Any]:
        """Attach a websocket: returns its event queue and the one it replaces (or None)."""
        previous, self.ws = self.ws, ws
        self._events = asyncio.Queue(EVENT_QUEUE)
        self._ws_gone.clear()
        self.touch()
        return self._events, previous

    def detach(self, ws: Any) -> None:
        if self.ws is ws:
            self.ws = None
            self._events = None
            self._ws_gone.set()

    def emit(self, event: dict[str, Any]) -> None:
        q = self._events
        if q is None:
            return
        if q.full():
            log.warning("event queue full, dropping event", extra={"session": self.id})
            return
        q.put_nowait(event)

    def touch(self) -> None:
        self.last_activity = self.loop.time()

    def push_audio(self, data: bytes) -> None:
        """PCM s16le mono 16 kHz. Raises ValueError (odd size) or OverflowError (too long)."""
        samples = pcm16_to_float(data)
        self.touch()
        if samples.size == 0:
            return
        utt = self.playout.push(samples, self.loop.time())
        if utt.stream.n_samples == samples.size:
            self.stats.utterances += 1
        self.stats.audio_bytes += len(data)
        self.pump()

    def end_utterance(self) -> None:
        self.touch()
        if self.playout.end():
            self.pump()

    def clear(self) -> None:
        self.touch()
        events = self.playout.clear()
        self.worker.cancel(self.id)
        if events:
            self.stats.interrupted += 1
        for e in events:
            self.emit(e)

    # -- engine side ---------------------------------------------------------------------
    def pump(self) -> None:
        """Send the jobs whose audio is complete to the worker (within max_ahead)."""
        if self._closed:
            return
        # a new utterance starts far enough ahead for its frames to be made in time: past
        # the engine's step time and, with `lead_quantile`, the worker's recent turnarounds
        now = self.loop.time()
        lead = max(self.settings.start_lead_frames, math.ceil(self.worker.step_ema / FRAME_S))
        if self.turnaround is not None:
            lead = max(lead, lead_for(self.turnaround.need(now), self._next_tick - now))
        self.playout.lead = lead
        for taken in self.playout.take(now):
            due = self._next_tick + self.playout.due_in(taken.jobs[0].loop_position) * FRAME_S
            item = WorkItem(
                key=self.id,
                avatar_id=self.avatar.id,
                utterance=taken.utterance,
                audio=taken.audio,
                jobs=taken.jobs,
                pcm=taken.pcm,
                deadline=due,
                done=self._work_done,
                submitted=now,
            )
            try:
                self.worker.submit(item)
            except WorkerStopped:
                log.warning("frame worker stopped, frames not made", extra={"session": self.id})
                self._made(item, None, WorkerStopped("the frame worker is stopped"))

    def _work_done(
        self, item: WorkItem, frames: list[np.ndarray] | None, exc: BaseException | None
    ) -> None:
        """Worker thread: lay the frames out as I420 here, off the event loop (cv2 releases
        the GIL; flat GPU buffers are only reshaped), then hand them to the event loop."""
        if frames is not None:
            try:
                frames = [self._as_i420(f) for f in frames]
            except Exception as err:  # a malformed frame: idle frames and an error event
                frames, exc = None, err
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to feed
            self.loop.call_soon_threadsafe(self._made, item, frames, exc)

    def _made(
        self, item: WorkItem, frames: list[np.ndarray] | None, exc: BaseException | None
    ) -> None:
        if self._closed:
            return
        now = self.loop.time()
        if frames is None:
            # keep the utterance going (audio on time, mouth still) and tell the client
            log.warning(
                "frames failed, showing idle frames", extra={"session": self.id, "error": repr(exc)}
            )
            self.emit({"type": "error", "code": "engine", "message": "frame generation failed"})
            frames = [self._idle_image(j.loop_position) for j in item.jobs]
        elif self.turnaround is not None:
            self.turnaround.add(now, now - item.submitted, item.deadline - item.submitted)
        made = [
            Made(item.utterance, j.index, j.loop_position, j.horizon, frames[i], item.pcm[i])
            for i, j in enumerate(item.jobs)
        ]
        self.playout.deliver(made, now)

    def _as_i420(self, frame: np.ndarray) -> np.ndarray:
        """A worker's frame (RGB (H, W, 3), or the GPU's flat I420) in the track's layout."""
        if frame.ndim == 1:
            h, w = self.avatar.frames.shape[1:3]
            return i420_image(frame, h, w)
        return to_i420(frame)

    def _idle_image(self, loop_position: int) -> np.ndarray:
        """The unchanged avatar frame, as I420 from the server-wide cache (no conversion
        per idle tick)."""
        return IDLE_FRAMES.get(
            self.avatar.id,
            self.avatar.loop_frame(loop_position),
            self.engine.idle_frame(self.avatar, loop_position),
        )

    # -- tracks and clock ----------------------------------------------------------------
    def media_events(self, on_state: Callable[[str], None]) -> MediaEvents:
        """The callbacks a media link reports through (`on_state`: the peer's state)."""
        return MediaEvents(self._track_started, self._dropped, on_state)

    def picture_shape(self) -> tuple[int, int]:
        """(rows, columns) of this session's I420 pictures (sizes rounded up to even)."""
        h, w = self.avatar.frames.shape[1:3]
        return i420_shape(h, w)

    def _track_started(self, kind: str) -> None:
        self._started.add(kind)
        self._first_track.set()
        if self.wanted <= self._started:
            self._all_tracks.set()

    def _dropped(self, kind: str) -> None:
        if kind == "video":
            self.stats.frames_dropped += 1
            self.metrics.frames_dropped.inc()
            if self.late_frames is not None:
                self.late_frames.dropped(self.loop.time(), self.id)
        else:
            self.stats.audio_dropped += 1

    async def _run_clock(self) -> None:
        try:
            await self._first_track.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_tracks.wait(), ALL_TRACKS_WAIT_S)
            t0 = self.loop.time()
            k = 0
            while not self._closed:
                now = self.loop.time()
                self._next_tick = now + FRAME_S
                self._emit_tick(self.playout.tick(now), k, now)
                self.pump()
                k += 1
                delay = t0 + k * FRAME_S - self.loop.time()
                if delay < -1.0:  # the loop stalled for over a second: do not burst, go on
                    log.warning(
                        "clock fell behind, resyncing",
                        extra={"session": self.id, "behind_s": -delay},
                    )
                    t0 = self.loop.time() - k * FRAME_S
                    delay = 0.0
                await asyncio.sleep(max(0.0, delay))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session clock failed", extra={"session": self.id})
            self.emit({"type": "error", "code": "internal", "message": "session clock failed"})

    def _emit_tick(self, tick: Tick, k: int, now: float) -> None:
        if self.media is not None:
            self.media.send(k, tick.image, tick.pcm if "audio" in self.wanted else None)
        self.stats.tick(tick.kind, now, tick.engine_late)
        self.metrics.frames_sent.labels(tick.kind).inc()
        for lat in tick.latencies:
            self.stats.latency(lat)
            self.metrics.audio_latency.observe(lat)
        if tick.first_frame is not None:
            self.stats.first(tick.first_frame, tick.first_parts)
            self.metrics.first_frame_latency.observe(tick.first_frame)
        if tick.late_start:
            self.stats.late_starts += 1
        if tick.kind == "hold":
            self.metrics.late_frames.inc()
        if self.late_frames is not None:
            self.late_frames.tick(now, tick.kind == "speech", tick.engine_late, self.id)
        for event in tick.events:
            self.emit(event)


class SessionManager:
    """All sessions of the server; see the module docstring."""

    def __init__(self, settings: Settings, metrics: ServerMetrics, late_limit: float = 0.0) -> None:
        self.settings = settings
        # refuse new sessions while more than this fraction of speaking frames come late (0: off)
        self.late_limit = late_limit
        self.late = LateFrames()
        q = settings.lead_quantile
        self.turnaround = Turnaround(q) if q > 0 else None
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.draining = False
        self._opening = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None

    # -- capacity ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a place for a session being opened; raises SessionLimitError if none."""
        if self.draining:
            self.metrics.sessions_refused.labels("draining").inc()
            raise SessionLimitError(
                "the server is shutting down", self.settings.retry_after_s, "draining"
            )
        if len(self.sessions) + self._opening >= self.settings.max_sessions:
            self.metrics.sessions_refused.labels("limit").inc()
            raise SessionLimitError(
                f"the server is at its limit of {self.settings.max_sessions} sessions",
                self.settings.retry_after_s,
                "limit",
            )
        now = asyncio.get_running_loop().time()
        why = self.late.why(now, self.late_limit)
        if why is not None:
            self.metrics.sessions_refused.labels("overloaded").inc()
            n, window = len(self.sessions), f"{self.late.window_s:g}"
            if why == "late":
                said = (
                    f"the engine is not keeping up with the {n} sessions it has "
                    f"({self.late.fraction(now):.1%} of their speaking frames came late in the "
                    f"last {window} s"
                )
            else:
                said = (
                    f"the host is not keeping up with the {n} sessions it has "
                    f"({self.late.drop_fraction(now):.1%} of their video frames were dropped "
                    f"before the encoders in the last {window} s"
                )
            raise SessionLimitError(
                f"{said}, more than {self.late_limit:.1%}); try again later",
                self.settings.retry_after_s,
                "overloaded",
            )
        self._opening += 1
        try:
            yield
        finally:
            self._opening -= 1

    def add(self, session: Session) -> None:
        session.late_frames = self.late
        session.turnaround = self.turnaround
        self.sessions[session.id] = session
        self.metrics.sessions_total.inc()
        self.metrics.sessions_active.set(len(self.sessions))
        session.start()

    def turnaround_need_s(self) -> float:
        """The turnaround new utterances' leads cover now (the /metrics gauge; 0 when off)."""
        if self.turnaround is None:
            return 0.0
        return self.turnaround.need(time.monotonic())  # the event loop's clock

    def largest_backlog_s(self) -> float:
        """The largest speech backlog over the sessions (the /metrics gauge)."""
        return max((s.playout.backlog_s for s in list(self.sessions.values())), default=0.0)

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    # -- ending --------------------------------------------------------------------------
    async def end(self, session_id: str, reason: str) -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        self.metrics.sessions_active.set(len(self.sessions))
        self.metrics.sessions_ended.labels(reason).inc()
        await session.close(reason)
        return True

    def end_soon(self, session_id: str, reason: str) -> None:
        """Schedule `end` from a callback (owned task, errors logged)."""
        self.spawn(self.end(session_id, reason))

    async def end_where(self, reason: str, avatar_id: str | None = None) -> int:
        ids = [
            s.id for s in self.sessions.values() if avatar_id is None or s.avatar.id == avatar_id
        ]
        await asyncio.gather(*(self.end(i, reason) for i in ids))
        return len(ids)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session task failed", exc_info=task.exception())

    # -- reaper --------------------------------------------------------------------------
    def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="session-reaper")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        await self.end_where("shutdown")
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def reap(self) -> list[str]:
        """End sessions past their connect or idle timeout; returns their ids."""
        now = asyncio.get_running_loop().time()
        s = self.settings
        ended = []
        for session in list(self.sessions.values()):
            if session.state == "new" and now - session.created > s.connect_timeout_s:
                reason = "connect_timeout"
            elif now - session.last_activity > s.idle_timeout_s and not session.playout.speaking:
                reason = "idle_timeout"
            elif (
                session.state == "connected"
                and session.media is not None
                and await session.peer_watch.update(session.media, now) > s.peer_silence_s
            ):
                reason = "peer_silent"  # the client vanished without closing (see liveness)
            else:
                continue
            if session.id not in self.sessions:  # ended while we read its stats
                continue
            ended.append(session.id)
            await self.end(session.id, reason)
        return ended

    async def _reap_forever(self) -> None:
        s = self.settings
        period = min(1.0, s.connect_timeout_s / 4, s.idle_timeout_s / 4, s.peer_silence_s / 4)
        while True:
            await asyncio.sleep(period)
            now = asyncio.get_running_loop().time()
            self.metrics.engine_late_fraction.set(self.late.fraction(now) or 0.0)
            self.metrics.video_drop_fraction.set(self.late.drop_fraction(now) or 0.0)
            try:
                await self.reap()
            except Exception:
                log.exception("session reaper failed")
