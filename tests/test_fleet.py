"""A fleet: three real `lipstream serve` processes (preview engine, 3 sessions each) behind a
real HAProxy running docker/haproxy.cfg on loopback, with real aiortc peers.

One walk, in order: an avatar registered through the balancer serves sessions on every server
(one shared avatars directory); 9 sessions land 3 per server and each one's requests and audio
websocket reach its own server (an utterance on each plays to its end); a server at its limit
whose weight the balancer has not yet lowered answers 503 and the balancer places the session
elsewhere, the client seeing no error; a server killed with SIGKILL ends only its own sessions
and a new session opens on a survivor within 5 s; a SIGTERM'd server gets no new sessions while
its open one plays an utterance to the end, and exits once that session is gone. Skipped where
HAProxy is not installed (`apt-get install haproxy`)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from bench.loopback import LoopbackClient, SessionRefused
from tests.served import ROOT, ServerProcess, free_port, lipstream_serve

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")

NAMES = ("s0", "s1", "s2")
PER_SERVER = 3


class Fleet:
    def __init__(
        self, servers: dict[str, ServerProcess], agents: dict[str, int], lb: str, sock: Path
    ):
        self.servers = servers
        self.agents = agents
        self.lb = lb
        self.sock = sock

    def admin(self, command: str) -> str:
        """One command on HAProxy's runtime socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.sock))
            s.sendall(command.encode() + b"\n")
            return s.recv(65536).decode()

    def refused(self, name: str, reason: str) -> float:
        text = httpx.get(f"{self.servers[name].base_url}/metrics").text
        for line in text.splitlines():
            if line.startswith("lipstream_sessions_refused_total") and f'"{reason}"' in line:
                return float(line.split()[-1])
        return 0.0


def _agent(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), 2) as s:
        return s.recv(100).decode().strip()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    avatars = tmp_path / "avatars"
    servers, agents = {}, {}
    for name in NAMES:
        port, agents[name] = free_port(), free_port()
        servers[name] = ServerProcess(
            lipstream_serve(
                port,
                avatars,
                "--drain-grace-s",
                "20",
                "--log-level",
                "warning",
                "--set",
                f"server_id={name}",
                "--set",
                f"agent_port={agents[name]}",
                "--set",
                f"max_sessions={PER_SERVER}",
                "--set",
                "media_processes=0",
            ),
            port,
            tmp_path / f"{name}.log",
        )
    lb_port, sock = free_port(), tmp_path / "admin.sock"
    config = (ROOT / "docker/haproxy.cfg").read_text()
    config = config.replace("\nglobal\n", f"\nglobal\n    stats socket {sock} level admin\n", 1)
    (tmp_path / "haproxy.cfg").write_text(config)
    env = {**os.environ, "LB_BIND": f"127.0.0.1:{lb_port}"}
    for name in NAMES:
        env[f"{name.upper()}_ADDR"] = f"127.0.0.1:{servers[name].port}"
        env[f"{name.upper()}_AGENT"] = str(agents[name])
    lb = None
    try:
        for server in servers.values():
            server.start()
        with (tmp_path / "haproxy.log").open("wb") as log:
            lb = subprocess.Popen(
                ["haproxy", "-db", "-f", str(tmp_path / "haproxy.cfg")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        yield Fleet(servers, agents, f"http://127.0.0.1:{lb_port}", sock)
    finally:
        if lb is not None:
            lb.kill()
            lb.wait(10)
        for server in servers.values():
            if server.proc is not None and server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(10)


def _small_face() -> bytes:
    from skimage.data import astronaut

    face = cv2.resize(cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR), (256, 256))
    ok, png = cv2.imencode(".png", face)
    assert ok
    return bytes(png)


async def _register(http: httpx.AsyncClient) -> str:
    """Through the balancer; ready once prepared on the server that took it."""
    r = await http.post("/v1/avatars", files={"file": ("f.png", _small_face(), "image/png")})
    assert r.status_code == 202, r.text
    avatar_id = str(r.json()["id"])
    deadline = time.monotonic() + 30
    while (await http.get(f"/v1/avatars/{avatar_id}")).json()["status"] != "ready":
        assert time.monotonic() < deadline, "the avatar did not become ready"
        await asyncio.sleep(0.2)
    return avatar_id


async def _wait_lb(http: httpx.AsyncClient, fleet: Fleet) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            up = all(_agent(p).startswith("ready") for p in fleet.agents.values())
            if up and (await http.get("/healthz")).status_code == 200:
                await asyncio.sleep(2.5)  # two health checks and an agent reading on each
                return
        except (OSError, httpx.TransportError):
            pass
        assert time.monotonic() < deadline, "the balancer did not come up"
        await asyncio.sleep(0.2)


AGENT_INTER_S = 1.1  # a little over haproxy.cfg's `agent-inter 1s`


async def _open(fleet: Fleet, avatar_id: str) -> LoopbackClient:
    client = LoopbackClient(fleet.lb)
    try:
        await client.open(avatar_id)
        await client.connect_audio()
    except BaseException:
        await client.close(delete=False)
        raise
    return client


def owner(client: LoopbackClient) -> str:
    return str(client.session["session_id"]).split("_")[1].split("-")[0]


async def test_fleet_behind_haproxy(fleet: Fleet) -> None:
    clients: list[LoopbackClient] = []
    async with httpx.AsyncClient(base_url=fleet.lb, timeout=10) as http:
        try:
            await _wait_lb(http, fleet)
            avatar_id = await _register(http)
            await _spread(fleet, avatar_id, clients, http)
            await _at_limit(fleet, avatar_id, clients, http)
            await _killed(fleet, avatar_id, clients, http)
            await _drained(fleet, avatar_id, clients, http)
        finally:
            await asyncio.gather(*(c.close(delete=False) for c in clients))


async def _spread(
    fleet: Fleet, avatar_id: str, clients: list[LoopbackClient], http: httpx.AsyncClient
) -> None:
    for _ in range(len(NAMES) * PER_SERVER):
        clients.append(await _open(fleet, avatar_id))
        # each server's agent is read once a second: the balancer weighs the servers by what
        # they had free then (a refusal in between is retried; _at_limit tests that alone)
        await asyncio.sleep(AGENT_INTER_S)
    owners = [owner(c) for c in clients]
    assert sorted(owners) == sorted(NAMES * PER_SERVER), owners
    await asyncio.gather(*(c.wait_frames(10, within=30) for c in clients))
    for c in clients:  # GET through the balancer reaches the owner (another would 404)
        r = await http.get(f"/v1/sessions/{c.session['session_id']}")
        assert r.status_code == 200, r.text
    # audio on each session's websocket reaches its own server: it plays, then says so
    tone = (3000 * np.sin(np.arange(3200) * 2 * np.pi * 300 / 16000)).astype(np.int16)

    async def speak(c: LoopbackClient) -> None:
        t = await c.send_json({"type": "clear"})
        await c.send_pcm(tone, realtime=False)
        await c.send_json({"type": "end"})
        await c.wait_event("playback_finished", after=t, within=15)

    await asyncio.gather(*(speak(c) for c in clients))
    for c in clients:
        assert _agent(fleet.agents[owner(c)]) == "drain"  # every server full
    await asyncio.sleep(1.5)  # the balancer has read them: its own 503 says why, as they do
    with pytest.raises(SessionRefused) as refused:
        await _open(fleet, avatar_id)
    assert (refused.value.status, refused.value.reason) == (503, "limit")
    assert refused.value.retry_after is not None


async def _at_limit(
    fleet: Fleet, avatar_id: str, clients: list[LoopbackClient], http: httpx.AsyncClient
) -> None:
    """s0 full, but the balancer believes it has room: s0 refuses, the balancer retries."""
    freed = [c for c in clients if owner(c) == "s1"][:2] + [c for c in clients if owner(c) == "s2"][
        :1
    ]
    for c in freed:
        r = await http.delete(f"/v1/sessions/{c.session['session_id']}")
        assert r.status_code == 200
        clients.remove(c)
        await c.close(delete=False)
    await asyncio.sleep(1.5)  # the balancer reads s1's and s2's room from their agents
    for name in NAMES:  # equal weights, taken in turn: every third pick is s0
        fleet.admin(f"disable agent lipstream/{name}")
        fleet.admin(f"set server lipstream/{name} state ready")
        fleet.admin(f"set weight lipstream/{name} 100")
    before = fleet.refused("s0", "limit")
    for _ in range(len(freed)):
        client = await _open(fleet, avatar_id)  # raises on an error answer
        clients.append(client)
        assert owner(client) in ("s1", "s2")
    assert fleet.refused("s0", "limit") > before, "the balancer never tried the full server"
    for name in NAMES:
        fleet.admin(f"enable agent lipstream/{name}")


async def _killed(
    fleet: Fleet, avatar_id: str, clients: list[LoopbackClient], http: httpx.AsyncClient
) -> None:
    """SIGKILL s2: only its sessions end; a new session opens on a survivor within 5 s."""
    freed = next(c for c in clients if owner(c) == "s1")
    await http.delete(f"/v1/sessions/{freed.session['session_id']}")
    clients.remove(freed)
    await freed.close(delete=False)
    await asyncio.sleep(1.5)  # the balancer reads the agents again: room on s1 only
    victim = fleet.servers["s2"].proc
    assert victim is not None
    victim.send_signal(signal.SIGKILL)
    victim.wait(5)
    killed_at = time.monotonic()
    client = await _open(fleet, avatar_id)
    clients.append(client)
    assert time.monotonic() - killed_at < 5.0
    assert owner(client) == "s1"
    for c in clients:  # the balancer takes s2 out within two health checks: 404 from then on
        for _ in range(25):  # 5 s
            r = await http.get(f"/v1/sessions/{c.session['session_id']}")
            if r.status_code != 503:
                break
            await asyncio.sleep(0.2)
        assert r.status_code == (404 if owner(c) == "s2" else 200), (owner(c), r.text)
        if owner(c) != "s2":
            n = len(c.received.video)
            await c.wait_frames(n + 5, within=10)
    for c in [c for c in clients if owner(c) == "s2"]:
        clients.remove(c)
        await c.close(delete=False)


async def _drained(
    fleet: Fleet, avatar_id: str, clients: list[LoopbackClient], http: httpx.AsyncClient
) -> None:
    """SIGTERM s1: new sessions go to s0; s1's open session plays its utterance to the end."""
    kept = next(c for c in clients if owner(c) == "s1")
    for c in [c for c in clients if owner(c) == "s0"][:1]:  # room on s0 only
        await http.delete(f"/v1/sessions/{c.session['session_id']}")
        clients.remove(c)
        await c.close(delete=False)
    await asyncio.sleep(1.5)  # the balancer reads s0's room from its agent
    draining = fleet.servers["s1"].proc
    assert draining is not None
    draining.send_signal(signal.SIGTERM)
    await kept.wait_event("server_draining", within=5)
    t = await kept.send_json({"type": "clear"})
    tone = (3000 * np.sin(np.arange(16000) * 2 * np.pi * 300 / 16000)).astype(np.int16)
    client = await _open(fleet, avatar_id)
    clients.append(client)
    assert owner(client) == "s0"
    await kept.send_pcm(tone)
    await kept.send_json({"type": "end"})
    done = await kept.wait_event("playback_finished", after=t, within=10)
    assert done.get("interrupted") is False, done
    assert draining.poll() is None  # still serving its open session
    await http.delete(f"/v1/sessions/{kept.session['session_id']}")  # its last one
    assert await asyncio.to_thread(draining.wait, 15) == 0  # then it exits, drained
