"""The audio websocket protocol and session endings, over a real server and a real peer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.loopback import LoopbackClient, ServerThread, wait_first_avatar_ready
from engines.preview import PreviewEngine
from server.app import create_app
from server.settings import Settings

WS_MAX = 64 * 1024


def serve(root: Path, **overrides: object) -> ServerThread:
    values: dict[str, object] = {
        "engine": "preview",
        "avatars_dir": root,
        "demo_avatar": True,
        "ws_max_message_bytes": WS_MAX,
    }
    values.update(overrides)
    settings = Settings(**values)  # type: ignore[arg-type]
    app = create_app(settings, engine=PreviewEngine(), reason="test")
    return ServerThread(app, ws_max_size=settings.ws_max_message_bytes).start()


def demo_avatar(srv: ServerThread) -> str:
    return wait_first_avatar_ready(srv.base_url)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, str]]:
    srv = serve(tmp_path_factory.mktemp("ws") / "avatars")
    yield srv, demo_avatar(srv)
    srv.stop()


def speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 200 * t) * 32767).astype("<i2")


def ws_url(srv: ServerThread, session: dict, token: str | None = None) -> str:
    return f"{srv.ws_url}{session['audio_ws']}?token={session['token'] if token is None else token}"


async def events_until(
    ws: websockets.ClientConnection, kind: str, within: float = 5.0
) -> list[dict]:
    got = []
    async with asyncio.timeout(within):
        while True:
            msg = await ws.recv()
            assert isinstance(msg, str)
            got.append(json.loads(msg))
            if got[-1]["type"] == kind:
                return got


async def test_a_wrong_token_or_session_is_refused(server: tuple[ServerThread, str]) -> None:
    srv, aid = server
    client = LoopbackClient(srv.base_url)
    try:
        session = await client.open(aid)
        bad = [
            ws_url(srv, session, token="x" * 32),
            ws_url(srv, session, token=""),
            f"{srv.ws_url}/v1/sessions/se_0000000000000000/audio?token={session['token']}",
        ]
        for url in bad:
            with pytest.raises(InvalidStatus) as err:
                await websockets.connect(url)
            assert err.value.response.status_code == 403
        async with websockets.connect(ws_url(srv, session)) as ws:
            await ws.send(json.dumps({"type": "end"}))  # nothing to end: no event, no error
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.3)
    finally:
        await client.close()


async def test_malformed_messages_get_error_events_and_the_session_lives(
    server: tuple[ServerThread, str],
) -> None:
    srv, aid = server
    client = LoopbackClient(srv.base_url)
    try:
        session = await client.open(aid)
        await client.wait_frames(5)
        async with websockets.connect(ws_url(srv, session)) as ws:
            cases: list[tuple[str | bytes, str]] = [
                (b"\x01\x02\x03", "bad_audio"),
                ("not json", "bad_json"),
                (json.dumps({"type": "dance"}), "unknown_type"),
                ("[1, 2]", "unknown_type"),
                (json.dumps({"kind": "end"}), "unknown_type"),
                ("x" * 5000, "too_large"),
            ]
            for message, code in cases:
                await ws.send(message)
                event = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert event["type"] == "error" and event["code"] == code, event
                assert event["message"]
            # chunks of any (even) size make one utterance
            pcm = speech(1.0).tobytes()
            pieces = [pcm[:2], pcm[2:1002], pcm[1002:8780], pcm[8780:28780], pcm[28780:]]
            assert b"".join(pieces) == pcm
            for piece in pieces:
                await ws.send(piece)
            await ws.send(json.dumps({"type": "end"}))
            got = await events_until(ws, "playback_finished")
            assert [e["type"] for e in got] == ["playback_started", "playback_finished"]
            assert got[-1] == {"type": "playback_finished", "position": 1.0, "interrupted": False}
        info = (await client.http.get(f"/v1/sessions/{session['session_id']}")).json()
        assert info["audio_bytes"] == len(pcm) and info["speech_frames"] == 25
    finally:
        await client.close()


async def test_an_oversized_message_closes_the_socket_with_1009(
    server: tuple[ServerThread, str],
) -> None:
    srv, aid = server
    client = LoopbackClient(srv.base_url)
    try:
        session = await client.open(aid)
        async with websockets.connect(ws_url(srv, session), max_size=None) as ws:
            await ws.send(b"\0" * (WS_MAX + 2))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        # the session goes on and takes a new socket
        assert (await client.http.get(f"/v1/sessions/{session['session_id']}")).status_code == 200
        async with websockets.connect(ws_url(srv, session)) as ws:
            await ws.send(b"\x01")
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["code"] == "bad_audio"
    finally:
        await client.close()


async def test_a_second_socket_replaces_the_first(server: tuple[ServerThread, str]) -> None:
    srv, aid = server
    client = LoopbackClient(srv.base_url)
    try:
        session = await client.open(aid)
        first = await websockets.connect(ws_url(srv, session))
        second = await websockets.connect(ws_url(srv, session))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(first.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
        await second.send("?")
        assert json.loads(await asyncio.wait_for(second.recv(), 5))["code"] == "bad_json"
        await second.close()
    finally:
        await client.close()


async def test_sessions_end_on_peer_close_and_on_idle_timeout(tmp_path: Path) -> None:
    srv = serve(tmp_path / "avatars", idle_timeout_s=1.5)
    try:
        aid = demo_avatar(srv)
        manager = srv.app.state.sessions
        # the peer goes away without DELETE
        client = LoopbackClient(srv.base_url)
        session = await client.open(aid)
        await client.wait_frames(3)
        await client.pc.close()
        for _ in range(200):
            if session["session_id"] not in manager.sessions:
                break
            await asyncio.sleep(0.05)
        assert session["session_id"] not in manager.sessions, "peer close did not end the session"
        await client.close(delete=False)
        # a connected session that hears nothing for idle_timeout_s
        client = LoopbackClient(srv.base_url)
        session = await client.open(aid)
        await client.connect_audio()
        await client.wait_frames(3)
        t0 = time.monotonic()
        await client.wait_event("session_ended", within=10)
        assert 1.0 < time.monotonic() - t0 < 6.0
        assert session["session_id"] not in manager.sessions
        metrics = (await client.http.get("/metrics")).text
        await client.close()
        assert 'lipstream_sessions_ended_total{reason="peer_closed"} 1.0' in metrics
        assert 'lipstream_sessions_ended_total{reason="idle_timeout"} 1.0' in metrics
        assert manager.sessions == {}
    finally:
        srv.stop()
