"""All sessions of the server: admission, ending and the reaper.

`SessionManager` holds every open `Session`: the session limit (503 + Retry-After), draining
and overload (`server.session.overload`) decide whether a new one may open (`slot`); `end`
closes one for any reason (DELETE, peer close or ICE failure, connect, idle and peer-silence
timeouts, avatar deleted, device failed, shutdown). Every end cancels the session's clock,
drops its queued work, stops its tracks and closes its peer connection (errors there are
logged, never raised).

Where sessions run is `devices` (`server.session.devices`): `place` picks the unit a new session
goes to; an end gives its place back and, where no session on that device uses the avatar any
more, hands it to `unload` (the app's: the avatar service's `trim`). The reaper also ends
the sessions of a device that faulted (a session that finds its worker stopped first ends at
once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from server.metrics import ServerMetrics
from server.session.devices import Devices, Unit
from server.session.overload import LateFrames
from server.session.placement import NoRoom
from server.session.session import Session, session_id
from server.session.turnaround import Turnaround
from server.settings import Settings

log = logging.getLogger(__name__)


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


class SessionManager:
    """All sessions of the server; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServerMetrics,
        late_limit: float = 0.0,
        devices: Devices | None = None,
    ) -> None:
        self.settings = settings
        self.devices = devices
        # (avatar id, unit) -> unloads the avatar there unless a session uses it again
        self.unload: Callable[[str, Unit], Coroutine[Any, Any, None]] | None = None
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

    def room(self) -> int:
        """How many more sessions `slot` would admit now (0 while draining or overloaded;
        a failed device's share counts as none)."""
        now = asyncio.get_running_loop().time()
        if self.draining or self.late.why(now, self.late_limit):
            return 0
        room = self.settings.max_sessions - len(self.sessions) - self._opening
        if self.devices is not None and self.devices.failed:
            loads = self.devices.placer.loads(now)
            room = min(room, sum(d.limit - d.sessions for d in loads if not d.failed))
        return max(0, room)

    def place(self, avatar_id: str) -> tuple[str, Unit | None]:
        """A new session's id and the unit it runs on (call inside `slot`; `unplace` it if
        the open fails before `add`). Raises SessionLimitError where no device has room."""
        sid = session_id(self.settings.server_id)
        if self.devices is None:
            return sid, None
        try:
            return sid, self.devices.place(sid, avatar_id, asyncio.get_running_loop().time())
        except NoRoom as exc:
            reason = {"full": "limit", "overloaded": "overloaded"}.get(exc.reason, "engine_failed")
            self.metrics.sessions_refused.labels(reason).inc()
            raise SessionLimitError(str(exc), self.settings.retry_after_s, reason) from None

    def unplace(self, session_id: str) -> None:
        """Give a session's place back (it ended, or never opened)."""
        if self.devices is None:
            return
        freed = self.devices.close(session_id)
        if freed is not None and self.unload is not None:
            unit, avatar_id = freed
            self.spawn(self.unload(avatar_id, unit), name=f"unload-{avatar_id}")

    def add(self, session: Session) -> None:
        session.late_frames = self.late
        session.on_worker_stopped = lambda: self.end_soon(session.id, "device_failed")
        if self.devices is not None and self.devices.several:
            session.device_late = self.devices.late_window(session.id)
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
        try:
            await session.close(reason)
        finally:
            self.unplace(session_id)
        return True

    def end_soon(self, session_id: str, reason: str) -> None:
        """Schedule `end` from a callback (owned task, errors logged)."""
        self.spawn(self.end(session_id, reason), name=f"end-{session_id}")

    async def end_where(self, reason: str, avatar_id: str | None = None) -> int:
        ids = [
            s.id for s in self.sessions.values() if avatar_id is None or s.avatar.id == avatar_id
        ]
        await asyncio.gather(*(self.end(i, reason) for i in ids))
        return len(ids)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "session task failed", exc_info=task.exception(), extra={"task": task.get_name()}
            )

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

    async def end_failed_devices(self) -> dict[str, list[str]]:
        """End the sessions of every device that faulted since the last look; the per-device
        gauges updated. Returns device -> the sessions ended."""
        if self.devices is None:
            return {}
        lost = self.devices.check()
        for device, ids in lost.items():
            log.error(
                "device failed, ending its sessions",
                extra={"device": device, "sessions": len(ids), "why": self.devices.failed[device]},
            )
            await asyncio.gather(*(self.end(i, "device_failed") for i in ids))
        for device, row in self.devices.report(asyncio.get_running_loop().time()).items():
            self.metrics.device_sessions.labels(device).set(row["sessions"])
            self.metrics.device_late_fraction.labels(device).set(row["late"] or 0.0)
            self.metrics.device_failed.labels(device).set(1 if row["failed"] else 0)
            self.metrics.device_avatars.labels(device).set(len(row["avatars"]))
        return lost

    async def _reap_forever(self) -> None:
        s = self.settings
        period = min(1.0, s.connect_timeout_s / 4, s.idle_timeout_s / 4, s.peer_silence_s / 4)
        while True:
            await asyncio.sleep(period)
            now = asyncio.get_running_loop().time()
            self.metrics.engine_late_fraction.set(self.late.fraction(now) or 0.0)
            self.metrics.video_drop_fraction.set(self.late.drop_fraction(now) or 0.0)
            try:
                await self.end_failed_devices()
                await self.reap()
            except Exception:
                log.exception("session reaper failed")
