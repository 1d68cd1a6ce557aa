"""Graceful drain on SIGTERM: stop taking work, let live sessions finish, then exit in time.

On the first SIGTERM (`DrainingServer.handle_exit`):

1. at once: `/readyz` answers 503 ("draining"), `POST /v1/sessions` and `POST /v1/avatars`
   answer 503 with Retry-After, and every live session's websocket gets
   `{"type": "server_draining", "grace_s": ...}`;
2. live sessions go on until they end by themselves or `grace_s - reserve` seconds have passed
   (`reserve` = min(5 s, grace_s / 3), kept for the shutdown itself); those still open then are
   ended (reason `shutdown`, their sockets get `session_ended`);
3. uvicorn shuts down (connections closed, the lifespan stops the worker) and the process exits
   with status 0, within `grace_s` of the signal.

A second SIGTERM, or SIGINT (Ctrl+C), skips the wait: uvicorn's own shutdown starts at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)

POLL_S = 0.1


def reserve_s(grace_s: float) -> float:
    """Seconds of the grace period kept for the shutdown after sessions are ended."""
    return min(5.0, grace_s / 3.0)


def begin_drain(app: FastAPI) -> bool:
    """Refuse new work from now on; returns False if the app was draining already."""
    state = app.state
    if getattr(state, "draining", False):
        return False
    state.draining = True
    sessions = getattr(state, "sessions", None)
    if sessions is not None:
        sessions.draining = True
        for session in list(sessions.sessions.values()):
            session.emit({"type": "server_draining", "grace_s": state.settings.drain_grace_s})
    log.info("draining: new sessions and uploads are refused")
    return True


async def drain(app: FastAPI, grace_s: float) -> int:
    """Drain `app` (see the module docstring, steps 1-2); returns the sessions ended by force."""
    begin_drain(app)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, grace_s - reserve_s(grace_s))
    sessions = getattr(app.state, "sessions", None)
    if sessions is None:
        return 0
    while loop.time() < deadline:
        if not sessions.sessions:
            break
        await asyncio.sleep(POLL_S)
    left = len(sessions.sessions)
    if left:
        log.info("drain grace over, ending sessions", extra={"sessions": left})
        await sessions.end_where("shutdown")
    return left


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains the app before shutting down."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None
        # a start that fails behind the open port (server.ops.starting) shuts the server down
        app.state.on_start_failed = self._start_failed

    def _start_failed(self) -> None:
        self.should_exit = True

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._draining and self._loop is not None:
            # a signal handler runs between bytecodes of the loop's thread: hand over safely
            self._draining = True
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self.app, self.grace_s)
        except Exception:
            log.exception("drain failed; shutting down now")
        self.should_exit = True
