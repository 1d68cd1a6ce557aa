"""A websocket client that floods pings and never reads: the server's memory stays bounded.

Every ping is answered with a pong; a client that never reads them leaves them in the server's
outgoing buffer. The server (`lipstream serve`, its own process, so that its memory can be
measured) must disconnect such a client before it costs more than a bounded amount, however
often it comes back, while another session goes on streaming. Twice: as configured by default
(the ping budget ends the flood), and with a budget too large to matter (the cap on the
outgoing buffer alone bounds the memory).
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest
from served import ServerProcess, free_port, lipstream_serve

from bench.loopback import LoopbackClient

ATTACK_S = 6.0
WINDOW_S = 3.0
MAX_RSS_GROWTH = 20 * 1024 * 1024
PING = bytes([0x89, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125  # masked (all-zero mask), 125 bytes
FLOOD_BLOCK = PING * (64 * 1024 // len(PING))


@pytest.fixture(
    scope="module",
    params=["defaults", "no-ping-budget"],
)
def server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ServerProcess]:
    """The server as configured by default, and with a ping budget too large to matter (the
    outgoing buffer's cap alone must hold)."""
    tmp = tmp_path_factory.mktemp("hostile-ping")
    port = free_port()
    extra = ["--set", "ws_ping_rate=1000000"] if request.param == "no-ping-budget" else []
    command = lipstream_serve(port, tmp / "avatars", "--demo-avatar", *extra)
    with ServerProcess(command, port, tmp / "server.log") as srv:
        yield srv.start(avatar=True)


def handshake(port: int, path: str) -> socket.socket:
    """A websocket opened by hand on a socket whose receive buffer is small (the pongs back up
    into the server, not into this process's kernel buffers)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5.0)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


class PingFlood(threading.Thread):
    """Floods pings without reading, reconnecting whenever the server drops it, until stopped."""

    def __init__(self, port: int, path: str) -> None:
        super().__init__(name="ping-flood", daemon=True)
        self.port, self.path = port, path
        self.stop = threading.Event()
        self.connections = 0
        self.dropped = 0  # connections the server ended
        self.sent = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                sock = handshake(self.port, self.path)
            except (OSError, AssertionError):
                time.sleep(0.05)
                continue
            self.connections += 1
            sock.settimeout(0.5)
            try:
                while not self.stop.is_set():
                    try:
                        sock.sendall(FLOOD_BLOCK)
                        self.sent += len(FLOOD_BLOCK)
                    except TimeoutError:
                        continue  # the server stopped reading: keep trying
            except OSError:
                self.dropped += 1
            finally:
                sock.close()


def sample_rss(srv: ServerProcess, stop: threading.Event, out: list[int]) -> None:
    while not stop.is_set():
        out.append(srv.rss_bytes())
        time.sleep(0.05)


async def healthz_times(client: LoopbackClient, seconds: float) -> list[float]:
    times: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        r = await client.http.get("/healthz")
        assert r.status_code == 200
        times.append(time.monotonic() - t0)
        await asyncio.sleep(0.05)
    return times


def fps_over(client: LoopbackClient, start: float, end: float) -> float:
    return sum(1 for t, _ in client.received.video if start <= t < end) / (end - start)


async def test_a_ping_flood_that_never_reads_is_cut_off(
    server: ServerProcess, request: pytest.FixtureRequest
) -> None:
    server_kind = request.node.callspec.params["server"]
    avatar = server.first_avatar()
    victim, attacker = LoopbackClient(server.base_url), LoopbackClient(server.base_url)
    try:
        await victim.open(avatar)
        session = await attacker.open(avatar)
        await victim.wait_frames(10)
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        before_healthz = await healthz_times(victim, WINDOW_S)
        before_fps = fps_over(victim, t0, time.monotonic())
        rss0 = server.rss_bytes()

        flood = PingFlood(server.port, f"{session['audio_ws']}?token={session['token']}")
        rss: list[int] = []
        stop_sampling = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(server, stop_sampling, rss))
        flood.start()
        sampler.start()
        try:
            await asyncio.sleep(ATTACK_S - WINDOW_S)
            t1 = time.monotonic()
            during_healthz = await healthz_times(victim, WINDOW_S)
            during_fps = fps_over(victim, t1, time.monotonic())
        finally:
            flood.stop.set()
            stop_sampling.set()
            await asyncio.to_thread(flood.join, 10)
            await asyncio.to_thread(sampler.join, 10)
        growth = max(rss) - rss0
        p99 = statistics.quantiles(during_healthz, n=100)[98]
        print(
            f"\nping flood {ATTACK_S:.0f} s: {flood.sent / 1e6:.0f} MB of pings, "
            f"{flood.connections} connections, {flood.dropped} dropped by the server; "
            f"server RSS +{growth / 1e6:.1f} MB; victim {before_fps:.1f} -> {during_fps:.1f} fps; "
            f"/healthz p99 {statistics.quantiles(before_healthz, n=100)[98] * 1e3:.0f} -> "
            f"{p99 * 1e3:.0f} ms"
        )
        assert server.alive()
        assert flood.sent > 8 * 1024 * 1024, "the flood did not get going"
        assert flood.dropped >= 1, "the server kept a client that never reads"
        assert growth < MAX_RSS_GROWTH, f"server RSS grew {growth / 1e6:.1f} MB"
        if server_kind == "defaults":  # the ping budget ends a flood before it costs much CPU
            assert during_fps >= 0.6 * before_fps, (before_fps, during_fps)
            assert p99 < 0.5, f"/healthz p99 {p99 * 1e3:.0f} ms during the flood"
        # the attacker's session itself lives on (only its socket was closed)
        r = await attacker.http.get(f"/v1/sessions/{session['session_id']}")
        assert r.status_code == 200 and r.json()["end_reason"] is None
    finally:
        await attacker.close()
        await victim.close()
