"""A real server on loopback and a real aiortc client: for tests, soak runs and debugging.

`ServerThread` runs uvicorn (with the server's connection limits and websocket message size
limit, as `lipstream serve` does) on 127.0.0.1 and a free port in a background thread. `LoopbackClient` opens a session like a browser would: an aiortc
peer receiving video and audio, the REST offer/answer, the audio websocket; it records what
arrives (with arrival times and RTP timestamps) through caller-supplied sinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import av
import httpx
import numpy as np
import uvicorn
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack
from fastapi import FastAPI

from lipstream.integrations.session_client import (
    SessionError,
    audio_ws_url,
    mono_pcm,
    offer_session,
    track_frames,
)
from server.app import uvicorn_options
from server.media.webrtc import close_peer

log = logging.getLogger(__name__)

VideoSink = Callable[[float, int, av.VideoFrame], None]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> until `stop()` (or the with-block ends)."""

    def __init__(
        self,
        app: FastAPI,
        ws_max_size: int | None = None,
        start_timeout: float = 60.0,
        wait_started: bool = True,
    ) -> None:
        options = uvicorn_options(app.state.settings)  # the connection limits, as `serve` has
        if ws_max_size is not None:
            options["ws_max_size"] = ws_max_size
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            **options,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.app = app
        self._timeout = start_timeout
        self._wait_started = wait_started  # False: return once the port is open
        self._thread = threading.Thread(
            target=self.server.run, name="uvicorn-loopback", daemon=True
        )
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server failed to start (see the log)")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start in time")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        # the port opens before the parts have started (server.ops.starting): wait for them too
        state = self.app.state
        while self._wait_started and not getattr(state, "started", True):
            error = getattr(state, "start_error", None)
            if error is not None:
                self.stop()
                raise RuntimeError(f"the server failed to start: {error}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("the server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def wait_first_avatar_ready(
    base_url: str, within: float = 60.0, headers: dict[str, str] | None = None
) -> str:
    """Poll `GET /v1/avatars` (with `headers`, e.g. the key) until the first avatar (e.g. the
    demo one) is ready; its id."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        avatars = httpx.get(f"{base_url}/v1/avatars", headers=headers).json()["avatars"]
        if avatars and avatars[0]["status"] == "ready":
            return str(avatars[0]["id"])
        time.sleep(0.05)
    raise TimeoutError("the demo avatar did not become ready")


SessionRefused = SessionError  # `POST /v1/sessions` refused: status, detail, reason, Retry-After


@dataclass
class Received:
    """What a `LoopbackClient` got."""

    video: list[tuple[float, int]] = field(default_factory=list)  # (arrival, pts 90 kHz)
    audio: list[tuple[float, int, np.ndarray]] = field(
        default_factory=list
    )  # (arrival, pts 48 kHz, mono int16)
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def audio_track(self) -> tuple[np.ndarray, int]:
        """The received audio as one mono int16 array at 48 kHz placed by its timestamps, and
        the timestamp of its first sample."""
        if not self.audio:
            return np.zeros(0, np.int16), 0
        start = self.audio[0][1]
        end = max(pts - start + len(s) for _, pts, s in self.audio)
        out = np.zeros(end, np.int16)
        for _, pts, s in self.audio:
            out[pts - start : pts - start + len(s)] = s
        return out, start


class LoopbackClient:
    """One session seen from the client side (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        video_sink: VideoSink | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = base_url
        self.http = httpx.AsyncClient(base_url=base_url, headers=headers or {}, timeout=30.0)
        self.pc = RTCPeerConnection()
        self.video_sink = video_sink
        self.received = Received()
        self.session: dict[str, Any] = {}
        self.ws: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def open(self, avatar_id: str, audio: bool = True) -> dict[str, Any]:
        """POST the offer, apply the answer; returns the session JSON. Raises SessionRefused
        (a RuntimeError) where the server answers with an error."""
        self.session = await offer_session(
            self.http, self.pc, avatar_id, lambda track: self._spawn(self._consume(track)), audio
        )
        return self.session

    async def connect_audio(self) -> None:
        import websockets

        self.ws = await websockets.connect(audio_ws_url(self.base_url, self.session), max_size=None)
        self._spawn(self._read_events())

    async def send_pcm(
        self, pcm: np.ndarray, chunk: int = 320, realtime: bool = True
    ) -> list[float]:
        """Send int16 samples in `chunk`-sample messages, paced at real time; returns send times."""
        pcm = np.asarray(pcm, dtype="<i2")
        times = []
        t0 = time.monotonic()
        for i in range(0, pcm.size, chunk):
            if realtime:
                delay = t0 + i / 16000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            times.append(time.monotonic())
            await self.ws.send(pcm[i : i + chunk].tobytes())
        return times

    async def send_json(self, message: dict[str, Any]) -> float:
        await self.ws.send(json.dumps(message))
        return time.monotonic()

    async def wait_event(
        self, kind: str, after: float = 0.0, within: float = 10.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for t, e in self.received.events:
                if t >= after and e.get("type") == kind:
                    return e
            await asyncio.sleep(0.01)
        raise TimeoutError(f"no {kind!r} event within {within} s")

    async def wait_frames(self, n: int, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while len(self.received.video) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(self.received.video)} of {n} video frames within {within} s"
                )
            await asyncio.sleep(0.02)

    async def close(self, delete: bool = True) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if delete and self.session:
            with contextlib.suppress(httpx.HTTPError):
                await self.http.delete(f"/v1/sessions/{self.session['session_id']}")
        await close_peer(self.pc)  # also stops a connect still under way
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.aclose()

    # -- internals -----------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _consume(self, track: MediaStreamTrack) -> None:
        async for frame in track_frames(track):
            now = time.monotonic()
            if isinstance(frame, av.VideoFrame):
                self.received.video.append((now, int(frame.pts or 0)))
                if self.video_sink is not None:
                    self.video_sink(now, int(frame.pts or 0), frame)
            elif isinstance(frame, av.AudioFrame):
                self.received.audio.append((now, int(frame.pts or 0), mono_pcm(frame)))

    async def _read_events(self) -> None:
        with contextlib.suppress(Exception):
            async for message in self.ws:
                if isinstance(message, str):
                    self.received.events.append((time.monotonic(), json.loads(message)))
