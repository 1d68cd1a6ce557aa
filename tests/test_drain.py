"""SIGTERM on a real `lipstream serve` process: /readyz turns 503 at once, new sessions and
uploads get 503, a live session keeps streaming through the grace period and is then ended,
and the process exits (status 0) within the grace period; with nothing live it exits at once."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from bench.loopback import LoopbackClient
from server.ops.drain import reserve_s

ROOT = Path(__file__).resolve().parent.parent
GRACE_S = 6.0
LIPSTREAM = [sys.executable, "-c", "from lipstream.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tmp: Path, port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSTREAM_")}
    return subprocess.Popen(
        [
            *LIPSTREAM,
            "serve",
            "--engine",
            "preview",
            "--port",
            str(port),
            "--avatars-dir",
            str(tmp / "avatars"),
            "--demo-avatar",
            "--drain-grace-s",
            str(GRACE_S),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


async def wait_ready(http: httpx.AsyncClient, proc: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited"
        try:
            if (await http.get("/readyz")).status_code == 200:
                listed = (await http.get("/v1/avatars")).json()["avatars"]
                if listed and listed[0]["status"] == "ready":
                    return str(listed[0]["id"])
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("the server did not become ready")


async def wait_exit(proc: subprocess.Popen[str], within: float) -> int:
    try:
        return await asyncio.to_thread(proc.wait, within)
    except subprocess.TimeoutExpired:
        return -999


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


async def test_sigterm_drains_then_exits_within_the_grace_period(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    proc = start_server(tmp_path, port)
    processes.append(proc)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        aid = await wait_ready(http, proc)
        client = LoopbackClient(base)
        client.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        late = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            session = await client.open(aid)
            await client.connect_audio()
            await client.wait_frames(10)
            # a second client has made its offer, and will ask after the signal
            late.addTransceiver("video", direction="recvonly")
            await late.setLocalDescription(await late.createOffer())

            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            # the signal reaches the server's loop asynchronously: a request already on its
            # way may still see 200; "at once" = within a second
            ready = await http.get("/readyz")
            while ready.status_code == 200 and time.monotonic() - t0 < 1.0:
                await asyncio.sleep(0.01)
                ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            assert time.monotonic() - t0 < 1.0
            assert (await http.get("/healthz")).status_code == 200
            r = await http.post(
                "/v1/sessions",
                json={"avatar_id": aid, "sdp": late.localDescription.sdp, "type": "offer"},
            )
            assert r.status_code == 503 and "shutting down" in r.json()["detail"]
            assert r.json()["reason"] == "draining"
            assert r.headers["retry-after"]
            r = await http.post("/v1/avatars", files={"file": ("a.png", b"\x89PNG")})
            assert r.status_code == 503
            await late.close()
            notice = await client.wait_event("server_draining", within=2)
            assert notice["grace_s"] == GRACE_S
            # the live session keeps streaming during the grace period
            frames = len(client.received.video)
            await asyncio.sleep(1.5)
            assert len(client.received.video) >= frames + 25, "video stopped during the grace"
            info = (await http.get(f"/v1/sessions/{session['session_id']}")).json()
            assert info["state"] == "connected"
            ended = await client.wait_event("session_ended", within=GRACE_S)
            ended_at = time.monotonic() - t0
            assert ended["reason"] == "shutdown"
            assert GRACE_S - reserve_s(GRACE_S) - 0.5 <= ended_at <= GRACE_S
            code = await wait_exit(proc, GRACE_S + 3)
            exited_at = time.monotonic() - t0
        finally:
            await late.close()
            await client.close(delete=False)
    print(
        f"\nsession ended {ended_at:.2f} s and the process exited {exited_at:.2f} s after SIGTERM"
    )
    assert code == 0, proc.stderr.read() if proc.stderr else code
    assert exited_at <= GRACE_S + 0.5, f"exited {exited_at:.2f} s after SIGTERM"


async def test_sigterm_with_nothing_live_exits_at_once(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    proc = start_server(tmp_path, port)
    processes.append(proc)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        await wait_ready(http, proc)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    code = await wait_exit(proc, GRACE_S + 3)
    assert code == 0
    assert time.monotonic() - t0 < 2.5
