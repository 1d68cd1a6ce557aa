"""Footprint: connect/disconnect cycles leave the server where it started (sessions, server
tasks, open files, RSS), and clients that die without a word (their process killed) have their
sessions reaped within 30 s."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from leakcheck import open_fds

from bench import malloc_bench
from bench.loopback import LoopbackClient, ServerThread, wait_first_avatar_ready
from engines.preview import PreviewEngine
from server.app import create_app
from server.ops import malloc_tuning
from server.session.session import Session
from server.settings import Settings

# RSS is read in this process: `make test` runs this module in a pytest process of its own
# (alone: 598 -> 604 -> 604 MB over 200 cycles on the CI image of 2026-12; inside the full
# suite's process the same bounds read 958 -> 905 -> 955 and 925 -> 938 -> 975 MB, moved by
# what earlier tests left running)
pytestmark = pytest.mark.isolated

CYCLES = int(os.environ.get("LIPSTREAM_LEAK_CYCLES", "200"))
CONNECTED_EVERY = 10  # every 10th cycle connects ICE/DTLS and receives frames
BATCH = 8  # cycles at a time
WARMUP = 100  # the allocator keeps growing for a while in a long test process (full suite)
REAP_WITHIN_S = 30.0
RSS_SLACK_MB = 64.0
ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    """Resident memory after handing freed heap back to the system (glibc `malloc_trim`), so
    the figure follows live memory rather than the allocator's high-water mark."""
    trim = malloc_tuning.libc_malloc_trim()
    if trim is not None:
        trim(0)
    return malloc_bench.rss_mb()


def local_client(base_url: str) -> LoopbackClient:
    """A loopback client whose peer uses no STUN server (none is reachable in CI)."""
    client = LoopbackClient(base_url)
    client.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    return client


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, str]]:
    settings = Settings(
        engine="preview",
        avatars_dir=tmp_path_factory.mktemp("leaks") / "avatars",
        demo_avatar=True,
        max_sessions=16,
        media_processes=0,  # the peers in this process, where the footprint is measured
    )
    # as `lipstream serve` does at start (process-wide: later tests in this process keep it)
    malloc_tuning.start(settings.malloc_trim_interval_s)
    srv = ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")).start()
    try:
        yield srv, wait_first_avatar_ready(srv.base_url, within=60)
    finally:
        srv.stop()


def server_tasks(srv: ServerThread) -> int:
    loop = srv.app.state.sessions._reaper.get_loop()

    async def count() -> int:
        return len(asyncio.all_tasks()) - 1

    return asyncio.run_coroutine_threadsafe(count(), loop).result(10)


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * 32767).astype(np.int16)


async def cycle(srv: ServerThread, aid: str, connect: bool) -> None:
    client = local_client(srv.base_url)
    try:
        await client.open(aid)
        await client.connect_audio()
        await client.send_pcm(tone(0.1), realtime=False)
        if connect:
            await client.wait_frames(3, within=20)
    finally:
        await client.close(delete=True)


async def footprint(srv: ServerThread) -> dict[str, float]:
    for _ in range(100):  # let closing peers and sockets finish
        if not srv.app.state.sessions.sessions and server_tasks(srv) <= 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    # the lowest of a few readings: a leak stays, while buffers still in flight when the
    # last peers close (their decoder threads, late frees) are gone a moment later (one run
    # read +40 MB at the end that such a transient explains)
    rss = []
    for _ in range(5):
        gc.collect()
        rss.append(rss_mb())
        await asyncio.sleep(0.2)
    objects = gc.get_objects()
    return {
        "live_sessions": sum(type(o) is Session for o in objects),
        "open_peer_connections": sum(
            type(o) is RTCPeerConnection and o.connectionState != "closed" for o in objects
        ),
        "sessions": len(srv.app.state.sessions.sessions),
        "server_tasks": server_tasks(srv),
        "fds": len(open_fds()),
        "rss_mb": min(rss),
    }


async def test_connect_disconnect_cycles_return_to_the_starting_footprint(
    server: tuple[ServerThread, str],
) -> None:
    srv, aid = server

    async def cycles(n: int) -> None:
        for first in range(0, n, BATCH):
            await asyncio.gather(
                *(
                    cycle(srv, aid, connect=(first + k) % CONNECTED_EVERY == 0)
                    for k in range(min(BATCH, n - first))
                )
            )

    # warm-up in the same pattern: first-use allocations, codecs, the avatar loaded, and the
    # allocator's arenas grown to what BATCH concurrent sessions need
    await cycles(WARMUP)
    start = await footprint(srv)
    t0 = time.monotonic()
    await cycles(CYCLES // 2)
    middle = await footprint(srv)
    await cycles(CYCLES - CYCLES // 2)
    elapsed = time.monotonic() - t0
    end = await footprint(srv)
    print(
        f"\n{CYCLES} cycles in {elapsed:.1f} s; footprint before {start}, "
        f"half-way {middle}, after {end}"
    )
    async with httpx.AsyncClient(base_url=srv.base_url) as http:
        metrics = (await http.get("/metrics")).text
    assert f"lipstream_sessions_total {float(WARMUP + CYCLES)}" in metrics
    assert end["sessions"] == 0
    assert end["server_tasks"] <= start["server_tasks"]
    assert end["fds"] <= start["fds"], (start, end)
    assert end["live_sessions"] == 0 and end["open_peer_connections"] == 0, end
    # RSS shares this process with the clients' decoders and the allocator's arenas: a leak
    # grows it cycle after cycle, fragmentation levels off; bound the whole run, and the second
    # half above the higher of the two earlier readings (RSS also dips and comes back: one CI
    # run read 958 -> 905 -> 955 MB, -3 MB over the 200 cycles)
    assert end["rss_mb"] - start["rss_mb"] < RSS_SLACK_MB, (start, end)
    high = max(start["rss_mb"], middle["rss_mb"])
    assert end["rss_mb"] - high < RSS_SLACK_MB / 2, (start, middle, end)


CLIENT = """
import asyncio, sys, numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection
from bench.loopback import LoopbackClient

async def main(base, aid, audio):
    client = LoopbackClient(base)
    client.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    session = await client.open(aid)
    if audio:
        await client.connect_audio()
    await client.wait_frames(5, within=30)
    print(session["session_id"], flush=True)
    t = np.arange(16000 * 60) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 200 * t) * 32767).astype(np.int16)
    if audio:
        await client.send_pcm(pcm)  # speaking, in real time, when it is killed
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] == "1"))
"""


async def test_killed_clients_are_reaped_within_30_s(server: tuple[ServerThread, str]) -> None:
    srv, aid = server
    procs = [
        subprocess.Popen(  # noqa: ASYNC220  (started once, read in a thread)
            [sys.executable, "-c", CLIENT, srv.base_url, aid, audio],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for audio in ("1", "0")
    ]
    try:
        ids = []
        for proc in procs:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 90)  # type: ignore[union-attr]
            assert line.strip().startswith("se_"), line
            ids.append(line.strip())
        manager = srv.app.state.sessions
        async with httpx.AsyncClient(base_url=srv.base_url) as http:
            for sid in ids:
                info = (await http.get(f"/v1/sessions/{sid}")).json()
                assert info["state"] == "connected", info
            await asyncio.sleep(1.0)  # the speaking one is mid-utterance
            assert manager.get(ids[0]).playout.speaking
            killed = time.monotonic()
            for proc in procs:
                proc.send_signal(signal.SIGKILL)
            ended: dict[str, float] = {}
            while len(ended) < len(ids) and time.monotonic() - killed < REAP_WITHIN_S + 5:
                for sid in ids:
                    if sid not in ended and manager.get(sid) is None:
                        ended[sid] = time.monotonic() - killed
                await asyncio.sleep(0.2)
            metrics = (await http.get("/metrics")).text
        print(f"\nkilled clients' sessions reaped after {json.dumps(ended)} s")
        assert set(ended) == set(ids), f"not reaped within {REAP_WITHIN_S + 5} s: {ended}"
        assert max(ended.values()) < REAP_WITHIN_S
        assert 'lipstream_sessions_ended_total{reason="peer_silent"} 2.0' in metrics
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
