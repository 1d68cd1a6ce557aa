"""Sessions whose WebRTC runs in media processes (`media_processes` > 0): real server on
loopback (preview engine), real aiortc clients, real child processes.

- the shared-memory ring and the message framing between the server and its media processes;
- sessions stream video and audio through two media processes, spread one per process, and
  leave no peer connection, task or ring file behind once ended;
- mutated SDP offers through a media process: only 4xx (or 201), nothing left behind;
- a media process killed mid-session: its session ends, the server stays ready, the process is
  replaced at once, and a new session streams again; with every media process down /readyz
  says 503 "media_down".
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bench.loopback import LoopbackClient, ServerThread, wait_first_avatar_ready
from engines.preview import PreviewEngine
from server.app import create_app
from server.media.pool import MediaPool, ShardMedia
from server.media.wire import FrameRing, WireError, pack, read_message
from server.settings import EncoderTuning, Settings


# -- the wire and the ring ------------------------------------------------------------------
def test_ring_hands_over_pictures_and_refuses_overwritten_slots() -> None:
    ring = FrameRing.create(3, (6, 4))
    other = FrameRing(ring.path, 3, (6, 4), create=False)
    ring.unlink()
    assert not ring.path.exists()  # both mappings live on without the name
    try:
        pictures = [np.full((6, 4), k, np.uint8) for k in range(5)]
        ring.write(0, pictures[0])
        ring.write(1, pictures[1])
        got = other.read(1)
        assert got is not None and (got == 1).all()
        ring.write(3, pictures[3])  # slot 0 now holds tick 3
        assert other.read(0) is None
        got = other.read(3)
        assert got is not None and (got == 3).all()
        with pytest.raises(ValueError, match="picture of"):
            ring.write(4, np.zeros((4, 6), np.uint8))
    finally:
        other.close()
        ring.close()
    with pytest.raises(ValueError, match="2 slots"):
        FrameRing.create(1, (6, 4))


async def test_messages_round_trip_and_malformed_ones_are_refused() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(pack({"op": "tick", "sid": "m1", "k": 7}, b"\x01\x02"))
    reader.feed_data(pack({"op": "count"}))
    assert await read_message(reader) == ({"op": "tick", "sid": "m1", "k": 7}, b"\x01\x02")
    assert await read_message(reader) == ({"op": "count"}, b"")
    for bad in (
        b"\x00\x00\x00\x03\x00\x00\x00\x00abc",  # not JSON
        b"\x00\x00\x00\x02\x00\x00\x00\x00[]",  # not an object
        b"\x00\x00\x00\x02\x00\x00\x00\x00{}",  # no op
        b"\x7f\x00\x00\x00\x00\x00\x00\x00",  # a header too large to be ours
    ):
        r = asyncio.StreamReader()
        r.feed_data(bad)
        with pytest.raises(WireError):
            await read_message(r)
    r = asyncio.StreamReader()
    r.feed_data(b"\x00\x00")
    r.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await read_message(r)


def test_auto_media_processes() -> None:
    assert Settings(max_sessions=8).media_process_count() == 0
    assert Settings(max_sessions=24, media_processes=0).media_process_count() == 0
    assert Settings(max_sessions=8, media_processes=2).media_process_count() == 2
    # one per 6 sessions, at most half the cores (at least one)
    assert Settings(max_sessions=24).media_process_count() == max(
        1, min(4, (os.cpu_count() or 2) // 2)
    )


# -- a server with media processes ----------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, str]]:
    settings = Settings(
        engine="preview",
        avatars_dir=tmp_path_factory.mktemp("media") / "avatars",
        demo_avatar=True,
        max_sessions=16,
        media_processes=2,
        connect_timeout_s=60.0,
        vp8_cpu_used=-8,  # not the defaults: the media processes must be told
        h264_preset="veryfast",
    )
    srv = ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")).start()
    try:
        yield srv, wait_first_avatar_ready(srv.base_url)
    finally:
        srv.stop()
    pool = srv.app.state.media
    assert all(s.proc is not None and s.proc.poll() is not None for s in pool.shards)


def on_server(srv: ServerThread, coro: Any) -> Any:
    loop = srv.app.state.sessions._reaper.get_loop()
    return asyncio.run_coroutine_threadsafe(coro, loop).result(30)


def pool_of(srv: ServerThread) -> MediaPool:
    pool = srv.app.state.media
    assert isinstance(pool, MediaPool)
    return pool


def wait_idle(srv: ServerThread, within: float = 15.0) -> list[dict[str, Any]]:
    """The media processes' counts once they hold no peers (or the last counts seen)."""
    deadline = time.monotonic() + within
    while True:
        counts = on_server(srv, pool_of(srv).counts())
        if all(c["peers"] == 0 for c in counts) or time.monotonic() > deadline:
            return list(counts)
        time.sleep(0.1)


def speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (t % 0.4 < 0.2) * 32767).astype(np.int16)


async def test_sessions_stream_through_media_processes(
    server: tuple[ServerThread, str],
) -> None:
    srv, aid = server
    base_counts = wait_idle(srv)
    sizes: list[tuple[int, int]] = []
    clients = [
        LoopbackClient(srv.base_url, video_sink=lambda t, p, f: sizes.append((f.width, f.height)))
        for _ in range(2)
    ]
    rings: list[Path] = []
    try:
        for c in clients:
            await c.open(aid)
            await c.connect_audio()
        links = [srv.app.state.sessions.get(c.session["session_id"]).media for c in clients]
        assert all(isinstance(m, ShardMedia) for m in links)
        assert {m.shard.index for m in links} == {0, 1}  # least loaded first: one each
        rings = [m.ring.path for m in links]
        assert not any(p.exists() for p in rings)  # unlinked once the process mapped them
        await asyncio.gather(*(c.wait_frames(25, within=30) for c in clients))
        await asyncio.gather(*(c.send_pcm(speech(1.0)) for c in clients))
        for c in clients:
            await c.send_json({"type": "end"})
        await asyncio.gather(*(c.wait_event("playback_finished", within=10) for c in clients))
        for c in clients:
            info = (await c.http.get(f"/v1/sessions/{c.session['session_id']}")).json()
            assert info["peer"] == "connected" and info["state"] == "connected"
            assert info["speech_frames"] >= 20, info
            assert len(c.received.audio) > 25  # 20 ms Opus frames came through too
        assert set(sizes) == {(512, 512)}
        ready = (await clients[0].http.get("/readyz")).json()
        assert ready["status"] == "ready"
    finally:
        for c in clients:
            await c.close()
    counts = wait_idle(srv)
    assert [c["peers"] for c in counts] == [0, 0]
    assert [c["tasks"] for c in counts] == [c["tasks"] for c in base_counts]
    # each process set its encoders up as the server's settings say
    tuning = EncoderTuning(vp8_cpu_used=-8, h264_preset="veryfast").as_dict()
    assert [c["encoders"] for c in counts] == [tuning, tuning]
    assert srv.app.state.sessions.sessions == {}


async def test_mutated_offers_through_a_media_process(server: tuple[ServerThread, str]) -> None:
    from test_hostile_sdp import ALLOWED, BASE, mutate

    srv, aid = server
    rng = random.Random(11)
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as http:

        async def one(sdp: str) -> None:
            r = await http.post(
                "/v1/sessions", json={"avatar_id": aid, "sdp": sdp, "type": "offer"}
            )
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 201:
                await http.delete(f"/v1/sessions/{r.json()['session_id']}")

        offers = [mutate(BASE, rng) for _ in range(200)]
        for i in range(0, len(offers), 8):
            await asyncio.gather(*(one(s) for s in offers[i : i + 8]))
    assert set(statuses) <= ALLOWED, statuses
    assert statuses.get(400, 0) > 20 and statuses.get(201, 0) > 20, statuses
    assert [c["peers"] for c in wait_idle(srv)] == [0, 0]
    assert srv.app.state.sessions.sessions == {}


async def test_a_dead_media_process_ends_its_sessions_only(
    server: tuple[ServerThread, str],
) -> None:
    srv, aid = server
    a, b = LoopbackClient(srv.base_url), LoopbackClient(srv.base_url)
    try:
        await a.open(aid)
        await b.open(aid)
        await asyncio.gather(a.wait_frames(10), b.wait_frames(10))
        media_a = srv.app.state.sessions.get(a.session["session_id"]).media
        victim = media_a.shard
        os.kill(victim.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while srv.app.state.sessions.get(a.session["session_id"]) is not None:
            assert time.monotonic() < deadline, "the session on the dead process did not end"
            await asyncio.sleep(0.05)
        n = len(b.received.video)
        await b.wait_frames(n + 25, within=10)  # the other process's session streams on
        ready = await b.http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["media_processes"] == 2
        # the dead process is replaced at once, without waiting for a new session
        deadline = time.monotonic() + 30
        while not all(s.alive for s in pool_of(srv).shards):
            assert time.monotonic() < deadline, "the media process was not replaced"
            await asyncio.sleep(0.1)
        assert pool_of(srv).shards[victim.index] is not victim
        assert (await b.http.get("/readyz")).json()["media_alive"] == 2
        c = LoopbackClient(srv.base_url)
        try:
            await c.open(aid)
            await c.wait_frames(10)
        finally:
            await c.close()
    finally:
        await a.close()
        await b.close()
    assert [c["peers"] for c in wait_idle(srv)] == [0, 0]


async def test_readyz_is_503_while_every_media_process_is_down(tmp_path: Path) -> None:
    settings = Settings(
        engine="preview", avatars_dir=tmp_path / "avatars", max_sessions=4, media_processes=1
    )
    with ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")) as srv:
        async with httpx.AsyncClient(base_url=srv.base_url) as http:
            assert (await http.get("/readyz")).json()["media_alive"] == 1
            pool = pool_of(srv)
            victim = pool.shards[0]
            os.kill(victim.proc.pid, signal.SIGKILL)
            seen: set[str] = set()
            deadline = time.monotonic() + 30
            while True:
                r = await http.get("/readyz")
                seen.add(r.json()["status"])
                if r.status_code == 200 and pool.shards[0] is not victim:
                    break
                assert time.monotonic() < deadline, seen
                await asyncio.sleep(0.02)
            # the restart waits RESTART_DELAY_S, so the down state was visible
            assert "media_down" in seen, seen
