"""A client flooding its own audio websocket must not starve the other sessions, and `clear`/`end`
spam must not multiply the playback events.

The flood runs in a process of its own (`tests/ws_flood_client.py`: tiny binary messages, 2-byte
PCM and text garbage, written as fast as the server reads them, close frames ignored, reconnecting
when closed). Meanwhile a second session's received frame rate (over real WebRTC) and `/healthz`
latency are measured and compared with the same figures measured without the flood, in the
same test, on the same server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.loopback import LoopbackClient, ServerThread, wait_first_avatar_ready
from engines.preview import PreviewEngine
from server.app import create_app
from server.session.limits import MessageBudget, RepeatedWarning
from server.settings import Settings, SettingsError

FLOODER = Path(__file__).with_name("ws_flood_client.py")
WINDOW_S = 4.0  # each measurement
HEALTHZ_EVERY_S = 0.02
FLOOD_LOG_LINES = 30  # the server's log lines allowed for a whole flood


TIGHT = {  # small budgets, so a test can spend them and wait for them to refill
    "ws_max_message_bytes": 64 * 1024,
    "ws_messages_per_s": 50.0,
    "ws_message_burst": 100,
    "ws_bytes_per_s": 64 * 1024,
    "ws_byte_burst": 128 * 1024,
}


def serve(root: Path, **limits: Any) -> Iterator[tuple[ServerThread, str]]:
    settings = Settings(engine="preview", avatars_dir=root, demo_avatar=True, **limits)
    app = create_app(settings, engine=PreviewEngine(), reason="test")
    srv = ServerThread(app, ws_max_size=settings.ws_max_message_bytes).start()
    try:
        yield srv, wait_first_avatar_ready(srv.base_url)
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, str]]:
    """The default budgets."""
    yield from serve(tmp_path_factory.mktemp("flood") / "avatars")


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, str]]:
    yield from serve(tmp_path_factory.mktemp("tight") / "avatars", **TIGHT)


def ws_url(srv: ServerThread, session: dict) -> str:
    return f"{srv.ws_url}{session['audio_ws']}?token={session['token']}"


class CountRecords(logging.Handler):
    """Counts the server's log records (all levels at INFO and above) while installed."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.messages[record.msg] = self.messages.get(record.msg, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.messages.values())


async def measure(probe: LoopbackClient, http: httpx.AsyncClient) -> tuple[float, float]:
    """The probe session's received frames per second and the p99 of `/healthz` over WINDOW_S."""
    latencies = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < WINDOW_S:
        start = time.perf_counter()
        r = await http.get("/healthz")
        latencies.append(time.perf_counter() - start)
        assert r.status_code == 200
        await asyncio.sleep(HEALTHZ_EVERY_S)
    t1 = time.monotonic()
    frames = sum(1 for t, _ in probe.received.video if t0 <= t < t1)
    return frames / (t1 - t0), float(np.percentile(latencies, 99))


async def test_a_message_flood_leaves_other_sessions_their_frame_rate(
    server: tuple[ServerThread, str],
) -> None:
    srv, aid = server
    probe, attacker = LoopbackClient(srv.base_url), LoopbackClient(srv.base_url)
    http = httpx.AsyncClient(base_url=srv.base_url, timeout=30.0)
    counter = CountRecords()
    try:
        await probe.open(aid)
        target = await attacker.open(aid, audio=False)
        await probe.wait_frames(10)
        await attacker.wait_frames(3)
        await asyncio.sleep(0.5)
        base_fps, base_p99 = await measure(probe, http)

        flood_s = WINDOW_S + 1.5
        logging.getLogger("server").addHandler(counter)
        flooder = await asyncio.create_subprocess_exec(
            sys.executable,
            str(FLOODER),
            ws_url(srv, target),
            str(flood_s),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            await asyncio.sleep(0.5)
            fps, p99 = await measure(probe, http)
            out, _ = await asyncio.wait_for(flooder.communicate(), flood_s + 30)
        finally:
            if flooder.returncode is None:
                flooder.kill()
                await flooder.wait()
        logging.getLogger("server").removeHandler(counter)
        flood = json.loads(out)
        print(
            f"\nprobe session: {base_fps:.1f} fps, /healthz p99 {base_p99 * 1e3:.0f} ms without "
            f"the flood; {fps:.1f} fps, p99 {p99 * 1e3:.0f} ms under it. Flooder: {flood}; "
            f"server log lines meanwhile: {counter.messages}"
        )
        assert fps >= 0.85 * base_fps, (fps, base_fps)
        assert p99 <= max(0.1, 2 * base_p99 + 0.05), (p99, base_p99)
        # the flooding socket is closed as a policy violation, soon
        assert 1008 in flood["close_codes"], flood
        assert flood["lasted_s"][0] < 2.0, flood
        # a few log lines for the whole flood, not one per message
        assert counter.total <= FLOOD_LOG_LINES, counter.messages
        # the attacker's own session lives on, and its socket works again later
        r = await http.get(f"/v1/sessions/{target['session_id']}")
        assert r.status_code == 200 and r.json()["end_reason"] is None, r.text
    finally:
        logging.getLogger("server").removeHandler(counter)
        await http.aclose()
        await attacker.close()
        await probe.close()


def tone(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()


async def events_until_quiet(ws: websockets.ClientConnection, quiet_s: float) -> list[dict]:
    events: list[dict] = []
    while True:
        try:
            msg = await asyncio.wait_for(ws.recv(), quiet_s)
        except TimeoutError:
            return events
        if isinstance(msg, str):
            events.append(json.loads(msg))


async def test_clear_and_end_spam_gives_one_finished_per_started(
    server: tuple[ServerThread, str],
) -> None:
    srv, aid = server
    client = LoopbackClient(srv.base_url)
    try:
        session = await client.open(aid, audio=False)
        await client.wait_frames(3)
        end, clear = json.dumps({"type": "end"}), json.dumps({"type": "clear"})
        async with websockets.connect(ws_url(srv, session)) as ws:
            events: list[dict] = []
            # utterances that never start playing: interrupted before their first frame
            for _ in range(20):
                await ws.send(tone(0.3))
                await ws.send(end if _ % 2 else clear)
                await ws.send(clear)
            # tiny audio between controls, as a spamming client sends it
            for _ in range(40):
                await ws.send(b"\x00\x01")
                await ws.send(clear)
                await ws.send(end)
            events += await events_until_quiet(ws, 0.6)
            # utterances that do start, then are interrupted by a burst of clears and ends
            for _ in range(3):
                await ws.send(tone(1.0))
                await ws.send(end)
                while not any(e["type"] == "playback_started" for e in events[-1:]):
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
                for _ in range(30):
                    await ws.send(clear)
                    await ws.send(end)
                events += await events_until_quiet(ws, 0.3)
            # and one that plays to its end
            await ws.send(tone(0.4))
            await ws.send(end)
            events += await events_until_quiet(ws, 1.5)
        kinds = [e["type"] for e in events if e["type"].startswith("playback")]
        print(f"\nplayback events: {len(kinds)} ({kinds.count('playback_started')} started)")
        assert kinds.count("playback_started") == 4, kinds
        # each playback_started is followed by exactly one playback_finished before the next
        assert kinds == ["playback_started", "playback_finished"] * 4, kinds
        finished = [e for e in events if e["type"] == "playback_finished"]
        assert [e["interrupted"] for e in finished] == [True, True, True, False], finished
        assert not [e for e in events if e["type"] == "error"], events
    finally:
        await client.close()


async def closed_with(ws: websockets.ClientConnection) -> tuple[int, str]:
    """Read until the server closes the socket: its close code and reason."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None, closed.value
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def test_over_the_budget_the_socket_closes_and_the_next_one_waits(
    tight: tuple[ServerThread, str],
) -> None:
    srv, aid = tight
    client = LoopbackClient(srv.base_url)
    try:
        session = await client.open(aid, audio=False)
        sid, url = session["session_id"], ws_url(srv, session)
        # messages: the burst of 100 goes through, then the socket closes with 1008
        async with websockets.connect(url) as ws:
            for _ in range(150):
                await ws.send(json.dumps({"type": "end"}))
            code, reason = await closed_with(ws)
        assert code == 1008 and "message budget" in reason, (code, reason)
        # a new socket right away is refused; once half the burst is back (1 s), taken
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(url)
        assert refused.value.response.status_code == 403
        await asyncio.sleep(1.2)
        async with websockets.connect(url) as ws:
            await ws.send(tone(0.2))
            await ws.send(json.dumps({"type": "end"}))
            assert (await events_until_quiet(ws, 0.8))[0]["type"] == "playback_started"
        # bytes: 64 KiB messages past the 128 KiB burst
        await asyncio.sleep(1.2)
        async with websockets.connect(url) as ws:
            for _ in range(4):
                await ws.send(b"\0" * 64 * 1024)
            code, reason = await closed_with(ws)
        assert code == 1008 and "byte budget" in reason, (code, reason)
        info = (await client.http.get(f"/v1/sessions/{sid}")).json()
        assert info["end_reason"] is None and info["ws_closed_over_budget"] == 2, info
    finally:
        await client.close()


async def test_a_tts_burst_fits_the_default_budget(server: tuple[ServerThread, str]) -> None:
    """25 s of speech as 20 ms messages, written at once (a TTS faster than real time): all of
    it is taken, nothing is refused, the socket stays open."""
    srv, aid = server
    client = LoopbackClient(srv.base_url)
    try:
        session = await client.open(aid, audio=False)
        pcm = tone(25.0)
        async with websockets.connect(ws_url(srv, session)) as ws:
            for i in range(0, len(pcm), 640):
                await ws.send(pcm[i : i + 640])
            await ws.send(json.dumps({"type": "end"}))
            events = await events_until_quiet(ws, 1.0)
            assert [e["type"] for e in events] == ["playback_started"], events
            info = (await client.http.get(f"/v1/sessions/{session['session_id']}")).json()
            assert info["audio_bytes"] == len(pcm) and info["audio_refused_bytes"] == 0, info
            assert info["ws_closed_over_budget"] == 0, info
    finally:
        await client.close()


def test_the_byte_burst_holds_the_largest_message() -> None:
    with pytest.raises(SettingsError, match="ws_byte_burst"):
        Settings(ws_max_message_bytes=2 * 1024 * 1024, ws_byte_burst=1024 * 1024)


def test_the_budget_counts_messages_and_bytes_and_makes_a_closed_socket_wait() -> None:
    budget = MessageBudget(messages_per_s=10, message_burst=20, bytes_per_s=100, byte_burst=1000)
    assert all(budget.take(1, 0.0) is None for _ in range(20))
    assert budget.take(1, 0.0) == "messages"
    assert budget.take(1, 0.1) is None  # one message back after 0.1 s
    assert budget.take(2000, 10.0) == "bytes"
    assert budget.ready(10.0)  # nothing was closed: a new socket may open at once
    budget.closed_over()
    assert budget.take(1000, 10.0) is None and not budget.ready(10.0)
    assert not budget.ready(14.9) and budget.ready(15.1)  # the bytes back to half at 15 s
    assert budget.closes == 1


def test_a_repeated_warning_is_logged_once_a_second_with_its_count() -> None:
    warning = RepeatedWarning(every_s=1.0)
    hits = [warning.hit(t / 100) for t in range(250)]  # 100 a second for 2.5 s
    assert [(i, n) for i, n in enumerate(hits) if n] == [(0, 1), (100, 100), (200, 100)]
