"""A session: one avatar, one peer connection, one audio websocket, one playout clock.

A `Session` owns its playout state: audio intake (`push_audio`, `end_utterance`, `clear`, from
the websocket), work (`pump` hands the frame jobs whose audio is complete to the shared frame
worker; the made frames come back on the event loop), the clock (25 ticks a second, each one
picture and 640 audio samples into its media link) and the events its websocket is sent.

What it does not own: the pictures (`server.media.pictures.AvatarPictures` lays the worker's
frames out as I420 and serves the idle frames from the server's cache), the peer connection
and its tracks (`server.media.link.MediaLink`), and admission and ending
(`server.session.manager.SessionManager`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from avatars.avatar import Avatar
from engines.stream import pcm16_to_float
from server.media.link import MediaEvents, MediaLink
from server.media.pictures import AvatarPictures
from server.metrics import ServerMetrics, SessionStats
from server.session.limits import AudioRateLimiter, MessageBudget, RepeatedWarning
from server.session.liveness import PeerWatch
from server.session.overload import LateFrames
from server.session.playout import Made, Playout, Tick
from server.session.turnaround import FRAME_S, Turnaround, lead_for
from server.session.worker import Worker, WorkerStopped, WorkItem
from server.settings import Settings

log = logging.getLogger(__name__)

EVENT_QUEUE = 256
ALL_TRACKS_WAIT_S = 2.0  # after the first track starts, how long the clock waits for the other
WS_CLOSE_WAIT_S = 1.0  # how long an ending session waits for its socket to say goodbye


def session_id(server_id: str) -> str:
    """A new session id; a fleet's balancer routes `se_<server_id>-...` to that server."""
    return "se_" + (f"{server_id}-" if server_id else "") + secrets.token_hex(8)


class AudioRefused(ValueError):
    """Audio the session does not take; `code` names why for the client's error event
    ("bad_audio", "rate_limited", "too_long"). The session goes on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Session:
    """See the module docstring. All methods run on the event loop."""

    def __init__(
        self,
        *,
        avatar: Avatar,
        pictures: AvatarPictures,
        worker: Worker,
        settings: Settings,
        metrics: ServerMetrics,
        sid: str | None = None,
    ) -> None:
        self.id = sid or session_id(settings.server_id)
        self.device: str | None = None  # the device its frames are made on (its unit's)
        self.token = secrets.token_urlsafe(24)
        self.avatar = avatar
        self.pictures = pictures
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
            pictures.idle,
            lead=settings.start_lead_frames,
            hold=settings.hold_frames,
            max_ahead=settings.max_ahead_frames,
        )
        self.media: MediaLink | None = None  # the peer connection (here or in a media process)
        self.audio_limiter = AudioRateLimiter(settings.audio_burst_s, settings.audio_rate)
        self.ws_budget = MessageBudget(
            settings.ws_messages_per_s,
            settings.ws_message_burst,
            settings.ws_bytes_per_s,
            settings.ws_byte_burst,
        )
        self._events_dropped = RepeatedWarning()
        self._frames_failed = RepeatedWarning()
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
        self.device_late: LateFrames | None = None  # its device's, with several (add)
        self.turnaround: Turnaround | None = None  # the worker's recent turnarounds (add)
        # called once when its worker turns out stopped (its device failed; the manager's, add)
        self.on_worker_stopped: Callable[[], None] | None = None

    # -- info ----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def info(self) -> dict[str, Any]:
        now = self.loop.time()
        return {
            "session_id": self.id,
            "avatar_id": self.avatar.id,
            "device": self.device,
            "state": self.state,
            "end_reason": self.end_reason,
            "created": self.created_wall,
            "age_s": round(now - self.created, 3),
            "idle_s": round(now - self.last_activity, 3),
            "peer": self.media.state if self.media is not None else None,
            "audio_ws_connected": self.ws is not None,
            "speaking": self.playout.speaking,
            "playout": self.playout.state(),
            "ws_closed_over_budget": self.ws_budget.closes,
            **self.stats.snapshot(),
        }

    def late_windows(self) -> tuple[LateFrames, ...]:
        """The lateness windows this session's ticks go into (the server's, its device's)."""
        return tuple(w for w in (self.late_frames, self.device_late) if w is not None)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the clock (it waits for the peer to pull the tracks)."""
        if self._clock is None:
            self._clock = asyncio.create_task(self._run_clock(), name=f"clock-{self.id}")

    def mark_connected(self) -> None:
        if self.state == "new":
            self.state = "connected"
            log.info("session connected", extra={"session_id": self.id})

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
        log.info("session ended", extra={"session_id": self.id, "reason": reason})

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
        if q.full():  # the client does not read its socket: drop, say so once a second
            count = self._events_dropped.hit(self.loop.time())
            if count:
                log.warning(
                    "event queue full, dropping events",
                    extra={"session_id": self.id, "dropped": count},
                )
            return
        q.put_nowait(event)

    def touch(self) -> None:
        self.last_activity = self.loop.time()

    def push_audio(self, data: bytes) -> None:
        """PCM s16le mono 16 kHz, into the open utterance, and the frames it completes to the
        worker. Raises AudioRefused: an odd byte count (refused before it counts against the
        rate limit), audio faster than the limit allows (said once per notice period; the
        rest is dropped silently) or an utterance too long."""
        if len(data) % 2:
            raise AudioRefused(
                "bad_audio", f"PCM16 audio has 2 bytes a sample, got {len(data)} bytes"
            )
        now = self.loop.time()
        if not self.audio_limiter.allow(len(data) // 2, now):
            self.stats.audio_refused_bytes += len(data)
            self.metrics.audio_refused.inc(len(data))
            if self.audio_limiter.should_notify(now):
                raise AudioRefused(
                    "rate_limited",
                    f"audio is arriving faster than real time: at most "
                    f"{self.settings.audio_burst_s:g} s ahead is taken, "
                    f"{self.audio_limiter.available_s(now):.2f} s may be sent now; "
                    "this audio was dropped",
                )
            return
        samples = pcm16_to_float(data)
        self.touch()
        if samples.size == 0:
            return
        try:
            utt = self.playout.push(samples, now)
        except OverflowError as exc:
            raise AudioRefused(
                "too_long", f'{exc}: send {{"type": "end"}} between utterances'
            ) from None
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
                self._made(item, None, WorkerStopped("the frame worker is stopped"))
                stopped, self.on_worker_stopped = self.on_worker_stopped, None
                if stopped is not None:
                    stopped()

    def _work_done(
        self, item: WorkItem, frames: list[np.ndarray] | None, exc: BaseException | None
    ) -> None:
        """Worker thread: the frames laid out as I420 here, off the event loop (cv2 releases
        the GIL; flat GPU buffers are only reshaped), then handed to the event loop."""
        if frames is not None:
            try:
                frames = self.pictures.lay_out(frames)
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
            # keep the utterance going (audio on time, mouth still) and tell the client; said
            # once a second at most (a stopped worker fails every item until the session ends)
            count = self._frames_failed.hit(now)
            if count:
                log.warning(
                    "frames failed, showing idle frames",
                    extra={"session_id": self.id, "error": repr(exc), "items": count},
                )
                msg = "frame generation failed"
                self.emit({"type": "error", "code": "engine", "message": msg})
            frames = [self.pictures.idle(j.loop_position) for j in item.jobs]
        elif self.turnaround is not None:
            self.turnaround.add(now, now - item.submitted, item.deadline - item.submitted)
        made = [
            Made(item.utterance, j.index, j.loop_position, j.horizon, frames[i], item.pcm[i])
            for i, j in enumerate(item.jobs)
        ]
        self.playout.deliver(made, now)

    # -- tracks and clock ----------------------------------------------------------------
    def media_events(self, on_state: Callable[[str], None]) -> MediaEvents:
        """The callbacks a media link reports through (`on_state`: the peer's state)."""
        return MediaEvents(self._track_started, self._dropped, on_state)

    def _track_started(self, kind: str) -> None:
        self._started.add(kind)
        self._first_track.set()
        if self.wanted <= self._started:
            self._all_tracks.set()

    def _dropped(self, kind: str) -> None:
        if kind == "video":
            self.stats.frames_dropped += 1
            self.metrics.frames_dropped.inc()
            for window in self.late_windows():
                window.dropped(self.loop.time(), self.id)
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
                        extra={"session_id": self.id, "behind_s": -delay},
                    )
                    t0 = self.loop.time() - k * FRAME_S
                    delay = 0.0
                await asyncio.sleep(max(0.0, delay))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session clock failed", extra={"session_id": self.id})
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
        for window in self.late_windows():
            window.tick(now, tick.kind == "speech", tick.engine_late, self.id)
        for event in tick.events:
            self.emit(event)
