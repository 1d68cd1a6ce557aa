"""HAProxy's agent-check on a TCP port of its own: each connection gets one line, the free
capacity, and is closed (HAProxy `server ... agent-check agent-port N agent-inter 1s`).

- `ready 67%`: sessions may open; the weight is the share of `max_sessions` still free (at least
  1%), so the balancer sends new sessions where there is most room;
- `drain`: no new sessions (full, overloaded, draining or still starting); the server stays
  up for the requests of the sessions it has, which the balancer routes to it by session id.

A server that is down answers nothing: the balancer's HTTP health check takes it out.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI

log = logging.getLogger(__name__)


def agent_line(app: FastAPI) -> str:
    """The agent-check reply for the app's state now."""
    state = app.state
    sessions = getattr(state, "sessions", None)
    if not state.started or not state.ready or state.draining or sessions is None:
        return "drain\n"
    room = sessions.room()
    if room <= 0:
        return "drain\n"
    percent = max(1, round(100 * room / state.settings.max_sessions))
    return f"ready {percent}%\n"


class AgentCheck:
    """The agent-check listener; `start` binds it, `stop` closes it."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> AgentCheck:
        self._server = await asyncio.start_server(self._answer, self.host, self.port)
        log.info("agent-check listening", extra={"host": self.host, "port": self.port})
        return self

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(agent_line(self.app).encode())
            await asyncio.wait_for(writer.drain(), 2.0)
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
