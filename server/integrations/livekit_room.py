"""A LiveKit room joined by a lipstream session: the room, LiveKit Agents' `DataStreamAudioReceiver`
and `AvatarRunner` over our `SessionVideoGenerator` (`server.integrations.livekit_worker`), and
how a session for a room is opened and closed (`open_room_session`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from livekit import rtc
from livekit.agents.voice.avatar import AvatarRunner, DataStreamAudioReceiver

from server.integrations.livekit_worker import RoomLink, RoomSession, SessionVideoGenerator

log = logging.getLogger(__name__)


class RoomWorker:
    """One room joined: the room, the audio receiver, the runner; `close` undoes all of it."""

    def __init__(self, generator: SessionVideoGenerator) -> None:
        self.generator = generator
        self.room = rtc.Room()
        self.runner: AvatarRunner | None = None
        self._start_task: asyncio.Task[None] | None = None
        self.on_gone: Callable[[str], None] | None = None  # called with the end reason

    async def join(self, url: str, token: str, timeout_s: float) -> None:
        """Connect to the room (raises ConnectionError with LiveKit's reason), then start the
        runner in the background: its audio receiver waits for the agent to join."""
        try:
            await asyncio.wait_for(
                self.room.connect(url, token, rtc.RoomOptions(auto_subscribe=False)),
                timeout_s,
            )
        except (rtc.ConnectError, TimeoutError) as exc:
            await self._disconnect()
            why = str(exc) or f"no answer within {timeout_s:g} s"
            raise ConnectionError(f"could not join the LiveKit room at {url}: {why}") from None
        self.room.on("disconnected", self._disconnected)
        self.room.on("participant_disconnected", self._participant_left)
        receiver = DataStreamAudioReceiver(self.room)
        self.runner = AvatarRunner(
            self.room,
            audio_recv=receiver,
            video_gen=self.generator,
            options=self.generator.options,
        )
        self._start_task = asyncio.create_task(self.runner.start(), name="livekit-runner-start")
        self._start_task.add_done_callback(self._started)

    @property
    def room_name(self) -> str:
        return self.room.name

    @property
    def identity(self) -> str:
        return self.room.local_participant.identity

    def _started(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("livekit runner failed to start", exc_info=task.exception())

    def _disconnected(self, *_: Any) -> None:
        log.info("livekit room disconnected", extra={"session_id": self.generator.session.id})
        if self.on_gone is not None:
            self.on_gone("room_disconnected")

    def _participant_left(self, participant: rtc.RemoteParticipant) -> None:
        """The agent left: nobody will speak through this avatar again, so it leaves too (an
        agent's job usually removes it; this covers one that could not)."""
        if participant.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            return
        log.info(
            "livekit agent left the room",
            extra={"session_id": self.generator.session.id, "agent": participant.identity},
        )
        if self.on_gone is not None:
            self.on_gone("agent_left")

    async def close(self) -> None:
        """Stop the runner and leave the room; never raises."""
        self.room.off("disconnected", self._disconnected)
        self.room.off("participant_disconnected", self._participant_left)
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            await asyncio.gather(self._start_task, return_exceptions=True)
        if self.runner is not None:
            try:
                await self.runner.aclose()
            except Exception:
                log.exception("livekit runner close failed")
            self.runner = None
        await self._disconnect()

    async def _disconnect(self) -> None:
        try:
            await self.room.disconnect()
        except Exception:
            log.exception("livekit room disconnect failed")


@dataclass(frozen=True)
class RoomParts:
    """What a room session is built from (the app's parts)."""

    avatar: Any  # avatars.avatar.Avatar
    pictures: Any  # server.media.pictures.AvatarPictures
    worker: Any  # server.session.worker.Worker
    settings: Any  # server.settings.Settings
    metrics: Any  # server.metrics.ServerMetrics
    sid: str | None = None  # the session's id (placed already), or a new one


async def open_room_session(
    parts: RoomParts,
    url: str,
    token: str,
    on_end: Callable[[str, str], None],
    timeout_s: float,
) -> tuple[RoomSession, RoomWorker]:
    """A session joined to a LiveKit room. Raises ConnectionError (nothing left behind) when
    the room cannot be joined. `on_end(session_id, reason)` is called when the room goes."""
    session = RoomSession(
        avatar=parts.avatar,
        pictures=parts.pictures,
        worker=parts.worker,
        settings=parts.settings,
        metrics=parts.metrics,
        sid=parts.sid,
    )

    def dropped() -> None:
        session.stats.frames_dropped += 1

    link = RoomLink(session.media_events(lambda state: None), dropped)
    session.media = link
    session.wanted = {"video", "audio"}
    worker = RoomWorker(SessionVideoGenerator(session, link))
    link.on_close = worker.close
    worker.on_gone = lambda reason: on_end(session.id, reason)
    try:
        await worker.join(url, token, timeout_s)
    except BaseException:
        await session.close("join_failed")  # closes the link, which closes the worker
        raise
    session.mark_connected()
    return session, worker
