"""Hostile audio-websocket traffic: each bad message gets an error event and the session lives on;
audio far faster than real time is refused by the rate limit; huge frames close with 1009.

(tests/test_server_ws.py has the protocol's basic refusals; these are the nastier inputs.)
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from bench.loopback import LoopbackClient, ServerThread, wait_first_avatar_ready
from engines.preview import PreviewEngine
from server.app import create_app
from server.settings import Settings

WS_MAX = 64 * 1024
BURST_S = 2.0


def serve(root: Path) -> ServerThread:
    settings = Settings(
        engine="preview",
        avatars_dir=root,
        demo_avatar=True,
        ws_max_message_bytes=WS_MAX,
        audio_burst_s=BURST_S,
        audio_rate=1.0,
    )
    app = create_app(settings, engine=PreviewEngine(), reason="test")
    return ServerThread(app, ws_max_size=WS_MAX).start()


def wait_ready(srv: ServerThread) -> str:
    return wait_first_avatar_ready(srv.base_url)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, str]]:
    srv = serve(tmp_path_factory.mktemp("hostile-ws") / "avatars")
    try:
        yield srv, wait_ready(srv)
    finally:
        srv.stop()


def ws_url(srv: ServerThread, session: dict) -> str:
    return f"{srv.ws_url}{session['audio_ws']}?token={session['token']}"


def tone(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()


async def next_event(ws: websockets.ClientConnection, within: float = 5.0) -> dict:
    msg = await asyncio.wait_for(ws.recv(), within)
    assert isinstance(msg, str)
    return dict(json.loads(msg))


def hostile_messages(rng: random.Random) -> list[tuple[str | bytes, str]]:
    """(message, expected error code) pairs."""
    deep = "[" * 2000 + "]" * 2000  # fits the 4096-byte control limit, recurses in json
    cases: list[tuple[str | bytes, str]] = [
        (deep, "bad_json"),
        ('{"type":' * 400 + "1" + "}" * 400, "unknown_type"),
        ("", "bad_json"),
        ("null", "unknown_type"),
        ("1e999", "unknown_type"),
        ('"end"', "unknown_type"),
        ('{"type": null}', "unknown_type"),
        ('{"type": ["end"]}', "unknown_type"),
        ('{"type": {"type": "end"}}', "unknown_type"),
        ('{"type": "END"}', "unknown_type"),
        ('{"type": "end\\u0000"}', "unknown_type"),
        ('{"type": "\\ud800"}', "unknown_type"),
        ("\u202e\ufeff{}", "bad_json"),
        ("{" * 4000, "bad_json"),
        ('{"type": "end", "x": "' + "y" * 5000 + '"}', "too_large"),
        (b"\x00", "bad_audio"),
        (b"\x00" * 3, "bad_audio"),
        (b"\xff" * 1001, "bad_audio"),
    ]
    for _ in range(20):  # random odd-sized binary and random text
        n = rng.randrange(0, 4000) * 2 + 1
        cases.append((bytes(rng.randrange(256) for _ in range(n)), "bad_audio"))
        text = "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 200)))
        cases.append(("#" + text, "bad_json"))
    return cases


async def test_hostile_messages_get_error_events_and_the_session_lives(
    server: tuple[ServerThread, str],
) -> None:
    srv, aid = server
    client = LoopbackClient(srv.base_url)
    try:
        session = await client.open(aid)
        await client.wait_frames(3)
        cases = hostile_messages(random.Random(7))
        async with websockets.connect(ws_url(srv, session)) as ws:
            for message, code in cases:
                await ws.send(message)
                event = await next_event(ws)
                assert event["type"] == "error" and event["code"] == code, (message[:40], event)
                assert isinstance(event["message"], str) and event["message"]
            # the session still speaks: a real utterance plays start to finish
            await ws.send(tone(0.4))
            await ws.send(json.dumps({"type": "end"}))
            assert (await next_event(ws))["type"] == "playback_started"
            finished = await next_event(ws)
            assert finished == {"type": "playback_finished", "position": 0.4, "interrupted": False}
        info = (await client.http.get(f"/v1/sessions/{session['session_id']}")).json()
        assert info["state"] == "connected" and info["utterances"] == 1
        frames = len(client.received.video)
        await asyncio.sleep(0.5)
        assert len(client.received.video) > frames, "video stopped"
        print(f"\n{len(cases)} hostile websocket messages, each answered with an error event")
    finally:
        await client.close()


async def test_huge_frames_close_with_1009_and_the_session_lives(
    server: tuple[ServerThread, str],
) -> None:
    srv, aid = server
    client = LoopbackClient(srv.base_url)
    try:
        session = await client.open(aid)
        for message in (b"\0" * (WS_MAX + 2), "x" * (WS_MAX + 1), b"\0" * (8 * WS_MAX)):
            async with websockets.connect(ws_url(srv, session), max_size=None) as ws:
                await ws.send(message)
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 5)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        r = await client.http.get(f"/v1/sessions/{session['session_id']}")
        assert r.status_code == 200 and r.json()["end_reason"] is None
    finally:
        await client.close()


async def test_audio_faster_than_real_time_is_refused_past_the_burst(
    server: tuple[ServerThread, str],
) -> None:
    srv, aid = server
    client = LoopbackClient(srv.base_url)
    try:
        session = await client.open(aid)
        sid = session["session_id"]
        async with websockets.connect(ws_url(srv, session)) as ws:
            # 6 s of audio in one go: the first BURST_S are taken, the rest refused
            chunk = tone(0.5)
            for _ in range(12):
                await ws.send(chunk)
            events = []
            with pytest.raises(TimeoutError):
                while True:
                    events.append(await next_event(ws, within=1.0))
            limited = [e for e in events if e.get("code") == "rate_limited"]
            assert len(limited) == 1, events  # one notice per second, not one per message
            assert "faster than real time" in limited[0]["message"]
            info = (await client.http.get(f"/v1/sessions/{sid}")).json()
            accepted = info["audio_bytes"]
            assert 1.5 * 32000 <= accepted <= (BURST_S + 1.5) * 32000, accepted
            assert info["audio_refused_bytes"] == 12 * len(chunk) - accepted
        # a new socket does not get a new allowance
        async with websockets.connect(ws_url(srv, session)) as ws:
            await ws.send(tone(2.0))
            assert (await next_event(ws))["code"] == "rate_limited"
        # at real time it is taken again
        await asyncio.sleep(1.0)
        async with websockets.connect(ws_url(srv, session)) as ws:
            before = (await client.http.get(f"/v1/sessions/{sid}")).json()["audio_bytes"]
            await ws.send(tone(0.5))
            await asyncio.sleep(0.2)
            after = (await client.http.get(f"/v1/sessions/{sid}")).json()["audio_bytes"]
            assert after - before == len(tone(0.5))
        metrics = (await client.http.get("/metrics")).text
        assert "lipstream_audio_refused_bytes_total" in metrics
    finally:
        await client.close()
