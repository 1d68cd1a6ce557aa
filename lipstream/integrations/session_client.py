"""A client for one lipstream session, as a program (not a browser) opens it: an aiortc peer
receiving the avatar's video and audio, the REST offer/answer, the audio websocket.

Received frames go to caller-supplied async callbacks; server events (`playback_started`,
`playback_finished`) to a third. Needs `httpx` (the `pipecat` extra brings it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import av
import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from server.media.webrtc import close_peer

log = logging.getLogger(__name__)

VideoCallback = Callable[[av.VideoFrame], Awaitable[None]]
AudioCallback = Callable[[np.ndarray, int], Awaitable[None]]  # mono int16, sample rate
EventCallback = Callable[[dict[str, Any]], Awaitable[None]]


class SessionError(RuntimeError):
    """`POST /v1/sessions` did not open a session: its status, the body's `detail` and
    `reason` (e.g. "overloaded", "limit", "draining" on a 503; None where the body has none)
    and the Retry-After header; all of it in the message."""

    def __init__(
        self, status: int, text: str, detail: str, reason: str | None, retry_after: str | None
    ) -> None:
        super().__init__(f"POST /v1/sessions: {status} {text}")
        self.status = status
        self.detail = detail
        self.reason = reason
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, r: httpx.Response) -> SessionError:
        detail, reason = r.text, None
        with contextlib.suppress(ValueError):
            body = r.json()
            if isinstance(body, dict):
                detail = str(body.get("detail", detail))
                if isinstance(body.get("reason"), str):
                    reason = body["reason"]
        return cls(r.status_code, r.text, detail, reason, r.headers.get("retry-after"))


async def offer_session(
    http: httpx.AsyncClient,
    pc: RTCPeerConnection,
    avatar_id: str,
    on_track: Callable[[MediaStreamTrack], None],
    audio: bool = True,
) -> dict[str, Any]:
    """Receive-only transceivers (video, and audio unless told), the offer POSTed, the answer
    applied: the session JSON. `on_track` gets each remote track. SessionError on a refusal."""
    pc.addTransceiver("video", direction="recvonly")
    if audio:
        pc.addTransceiver("audio", direction="recvonly")
    pc.on("track", on_track)
    await pc.setLocalDescription(await pc.createOffer())
    r = await http.post(
        "/v1/sessions",
        json={"avatar_id": avatar_id, "sdp": pc.localDescription.sdp, "type": "offer"},
    )
    if r.status_code >= 300:
        raise SessionError.from_response(r)
    session: dict[str, Any] = r.json()
    await pc.setRemoteDescription(RTCSessionDescription(session["sdp"], "answer"))
    return session


def audio_ws_url(base_url: str, session: dict[str, Any]) -> str:
    """The session's audio websocket URL, its token included."""
    ws_base = base_url.rstrip("/").replace("https://", "wss://").replace("http://", "ws://")
    return f"{ws_base}{session['audio_ws']}?token={session['token']}"


async def track_frames(track: MediaStreamTrack) -> AsyncIterator[Any]:
    """A remote track's frames (av.VideoFrame or av.AudioFrame) until it ends."""
    while True:
        try:
            yield await track.recv()
        except MediaStreamError:
            return


def mono_pcm(frame: av.AudioFrame) -> np.ndarray:
    """An audio frame's first channel as int16 samples."""
    samples = frame.to_ndarray().reshape(-1)
    channels = len(frame.layout.channels)
    mono = samples.reshape(-1, channels)[:, 0] if channels > 1 else samples
    return np.asarray(mono, dtype=np.int16)


class SessionClient:
    """One lipstream session seen from the client side (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        on_video: VideoCallback | None = None,
        on_audio: AudioCallback | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30.0)
        self.pc = RTCPeerConnection()
        self.session: dict[str, Any] = {}
        self.ws: Any = None
        self._on_video = on_video
        self._on_audio = on_audio
        self._on_event = on_event
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def session_id(self) -> str | None:
        sid = self.session.get("session_id")
        return str(sid) if sid is not None else None

    async def open(self, avatar_id: str) -> dict[str, Any]:
        """Offer, answer, and the audio websocket; returns the session JSON."""
        self.session = await offer_session(
            self.http, self.pc, avatar_id, lambda track: self._spawn(self._consume(track))
        )
        await self._connect_ws()
        log.info("lipstream session opened", extra={"session_id": self.session_id})
        return self.session

    async def _connect_ws(self) -> None:
        import websockets

        self.ws = await websockets.connect(audio_ws_url(self.base_url, self.session), max_size=None)
        self._spawn(self._read_events())

    async def send_pcm(self, pcm16: bytes) -> None:
        """PCM s16le mono 16 kHz."""
        if self.ws is not None and pcm16:
            await self.ws.send(pcm16)

    async def send_control(self, kind: str) -> None:
        """`end` (the utterance is complete) or `clear` (interrupt)."""
        if self.ws is not None:
            await self.ws.send(json.dumps({"type": kind}))

    async def close(self) -> None:
        """Close the websocket, delete the session, close the peer; never raises."""
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
            self.ws = None
        if self.session_id is not None:
            with contextlib.suppress(httpx.HTTPError):
                await self.http.delete(f"/v1/sessions/{self.session_id}")
        await close_peer(self.pc)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.aclose()
        log.info("lipstream session closed", extra={"session_id": self.session_id})
        self.session = {}

    # -- internals -----------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _consume(self, track: MediaStreamTrack) -> None:
        async for frame in track_frames(track):
            if isinstance(frame, av.VideoFrame) and self._on_video is not None:
                await self._on_video(frame)
            elif isinstance(frame, av.AudioFrame) and self._on_audio is not None:
                await self._on_audio(mono_pcm(frame), int(frame.sample_rate))

    async def _read_events(self) -> None:
        with contextlib.suppress(Exception):
            async for message in self.ws:
                if isinstance(message, str) and self._on_event is not None:
                    await self._on_event(json.loads(message))
