"""A session's WebRTC side, behind one small interface (`PeerLink`, a `MediaLink`).

The session's clock hands each tick's picture (I420) and audio to its link; the link owns the
peer connection and its two tracks, and reports back through `MediaEvents`: a track started
(the peer pulls it), a frame was dropped before the encoder, the connection state changed.

Two kinds of link:
- `LocalMedia`: the aiortc peer in this process (the default; `media_processes = 0`).
- `ShardMedia` (`server.media.pool`): the peer in a media process. aiortc's RTP, SRTP, ICE
  and encoder plumbing costs ~2.5 ms of Python per 720p tick; in one process the GIL caps a
  server at ~12 such sessions. Media processes spread that over cores.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from server.media.tracks import AUDIO_FRAMES_PER_TICK, AudioFramer, QueueTrack, video_frame
from server.media.webrtc import close_peer, make_peer, negotiate, packets_received
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaEvents:
    """Callbacks into the session, called on the server's event loop."""

    started: Callable[[str], None]  # a track's first frame was pulled ("video" / "audio")
    dropped: Callable[[str], None]  # a frame of that kind was dropped before the encoder
    state: Callable[[str], None]  # the peer connection's state changed (aiortc's names)


class MediaLink(abc.ABC):
    """Where one session's media goes, wherever it runs (a WebRTC peer: `PeerLink`; a LiveKit
    room: `server.integrations.livekit_worker.RoomLink`)."""

    @abc.abstractmethod
    def send(self, k: int, picture: np.ndarray, pcm: np.ndarray | None) -> None:
        """Tick k: an I420 picture and 640 int16 samples (None: no audio track)."""

    @property
    @abc.abstractmethod
    def state(self) -> str | None:
        """The connection state (None before negotiation or after close)."""

    @abc.abstractmethod
    async def packets_received(self) -> int:
        """Packets received from the peer so far (liveness)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the tracks and close the peer connection; never raises."""


class PeerLink(MediaLink):
    """One session's WebRTC peer connection, negotiated from the client's offer."""

    @abc.abstractmethod
    async def negotiate(self, sdp: str) -> tuple[str, set[str]]:
        """Apply the (checked) offer; returns (answer SDP, kinds sent). Raises OfferError."""


class LocalMedia(PeerLink):
    """The peer connection in this process (also what a media process runs per session, with
    its own `video` track reading pictures from shared memory)."""

    def __init__(
        self, settings: Settings, events: MediaEvents, video: QueueTrack | None = None
    ) -> None:
        self.video = video or QueueTrack(
            "video", settings.track_queue_frames, events.started, events.dropped
        )
        self.audio = QueueTrack(
            "audio",
            settings.track_queue_frames * AUDIO_FRAMES_PER_TICK,
            events.started,
            events.dropped,
        )
        self._audio_framer = AudioFramer()
        pc = make_peer(settings)
        self.pc = pc
        self._closed = False

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            events.state(pc.connectionState)

    async def negotiate(self, sdp: str) -> tuple[str, set[str]]:
        return await negotiate(self.pc, sdp, self.video, self.audio)

    def send(self, k: int, picture: np.ndarray, pcm: np.ndarray | None) -> None:
        self.video.put(video_frame(picture, k))
        if pcm is not None:
            self.put_audio(k, pcm)

    def put_audio(self, k: int, pcm: np.ndarray) -> None:
        """Tick k's 640 int16 samples, as the audio track's 20 ms frames."""
        for frame in self._audio_framer.frames(pcm, k):
            self.audio.put(frame)

    @property
    def state(self) -> str | None:
        return None if self._closed else self.pc.connectionState

    async def packets_received(self) -> int:
        return await packets_received(self.pc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.video.stop()
        self.audio.stop()
        await close_peer(self.pc)


class MediaHost(abc.ABC):
    """Makes links for new sessions (in this process, or in media processes)."""

    @abc.abstractmethod
    def link(self, events: MediaEvents, picture_shape: tuple[int, int]) -> PeerLink:
        """A link for a session whose I420 pictures have `picture_shape` (rows, columns)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start what the host needs."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop it (after every session has closed its link)."""

    @abc.abstractmethod
    def info(self) -> dict[str, object]:
        """A summary for logs and /readyz."""

    def available(self) -> bool:
        """Whether a new session could get a link now."""
        return True


class LocalHost(MediaHost):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def link(self, events: MediaEvents, picture_shape: tuple[int, int]) -> PeerLink:
        return LocalMedia(self.settings, events)

    async def start(self) -> None:
        log.debug("media in process")

    async def stop(self) -> None:
        log.debug("media in process: nothing to stop")

    def info(self) -> dict[str, object]:
        return {"media_processes": 0}
