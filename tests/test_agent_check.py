"""HAProxy's agent-check on a real server's `agent_port`: `ready N%` with N the share of
`max_sessions` free, `drain` while full, overloaded or draining; and nothing listening with
the port off."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.loopback import LoopbackClient, ServerThread, wait_first_avatar_ready
from engines.preview import PreviewEngine
from server.app import create_app
from server.session.overload import LateFrames
from server.settings import Settings
from tests.served import free_port


async def agent(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return (await asyncio.wait_for(reader.read(100), 5)).decode()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_agent_reports_the_free_sessions(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(
        engine="preview",
        avatars_dir=tmp_path / "avatars",
        demo_avatar=True,
        max_sessions=2,
        agent_port=port,
    )
    app = create_app(settings, engine=PreviewEngine(), reason="test")
    with ServerThread(app) as srv:
        avatar_id = wait_first_avatar_ready(srv.base_url)
        assert await agent(port) == "ready 100%\n"
        clients = [LoopbackClient(srv.base_url) for _ in range(2)]
        try:
            await clients[0].open(avatar_id)
            assert await agent(port) == "ready 50%\n"
            await clients[1].open(avatar_id)
            assert await agent(port) == "drain\n"  # full
            await clients.pop().close()  # deletes its session
            assert await agent(port) == "ready 50%\n"
            manager = app.state.sessions
            real = manager.late, manager.late_limit
            late = LateFrames(window_s=10, min_ticks=50)
            now = asyncio.get_running_loop().time()
            for k in range(100):  # one speaking frame in ten came back late
                late.tick(now - 2 + k * 0.01, speaking=True, late=k % 10 == 0)
            manager.late, manager.late_limit = late, 0.02
            assert await agent(port) == "drain\n"  # overloaded
            manager.late, manager.late_limit = real
            assert await agent(port) == "ready 50%\n"
            app.state.draining = True
            assert await agent(port) == "drain\n"
            app.state.draining = False
        finally:
            await asyncio.gather(*(c.close() for c in clients))
    with pytest.raises(OSError):  # stopped with the server
        await agent(port)


async def test_no_agent_port_by_default(tmp_path: Path) -> None:
    settings = Settings(engine="preview", avatars_dir=tmp_path / "avatars")
    app = create_app(settings, engine=PreviewEngine(), reason="test")
    with ServerThread(app):
        assert getattr(app.state, "agent_check", None) is None
