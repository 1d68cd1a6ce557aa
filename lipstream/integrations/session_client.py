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
from collections.abc import Awaitable, Callable
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
    """The server refused to open the session (its status and body in the message)."""


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
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._spawn(self._consume(track))

        await self.pc.setLocalDescription(await self.pc.createOffer())
        r = await self.http.post(
            "/v1/sessions",
            json={"avatar_id": avatar_id, "sdp": self.pc.localDescription.sdp, "type": "offer"},
        )
        if r.status_code >= 300:
            raise SessionError(f"POST /v1/sessions: {r.status_code} {r.text}")
        self.session = r.json()
        await self.pc.setRemoteDescription(RTCSessionDescription(self.session["sdp"], "answer"))
        await self._connect_ws()
        log.info("lipstream session opened", extra={"session_id": self.session_id})
        return self.session

    async def _connect_ws(self) -> None:
        import websockets

        ws_base = self.base_url.replace("https://", "wss://").replace("http://", "ws://")
        url = f"{ws_base}{self.session['audio_ws']}?token={self.session['token']}"
        self.ws = await websockets.connect(url, max_size=None)
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
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if isinstance(frame, av.VideoFrame) and self._on_video is not None:
                await self._on_video(frame)
            elif isinstance(frame, av.AudioFrame) and self._on_audio is not None:
                samples = frame.to_ndarray().reshape(-1)
                channels = len(frame.layout.channels)
                mono = samples.reshape(-1, channels)[:, 0] if channels > 1 else samples
                await self._on_audio(mono.astype(np.int16), int(frame.sample_rate))

    async def _read_events(self) -> None:
        with contextlib.suppress(Exception):
            async for message in self.ws:
                if isinstance(message, str) and self._on_event is not None:
                    await self._on_event(json.loads(message))
