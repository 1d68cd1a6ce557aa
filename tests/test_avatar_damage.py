"""Damaged avatar files on a real server.

- Files damaged at rest (garbage or ill-typed meta.json, a truncated frames.npy, a missing
  masks.npz): the avatar lists as `failed` with the reason, GET shows it, opening a session
  answers 409 with it, DELETE removes it; never a 500.
- frames.npy truncated under live sessions, on a real `lipstream serve` process (a memory map
  of a truncated file raises SIGBUS, which would take the whole process down): the process and
  every session live on, the damaged avatar reports `failed` and refuses new sessions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from avatars.avatar import Avatar
from avatars.store import AvatarStore
from bench.loopback import LoopbackClient, ServerThread, SessionRefused
from engines.preview import PreviewEngine
from server.app import create_app
from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
LIPSTREAM = [sys.executable, "-c", "from lipstream.cli import main; main()"]

GOOD, BAD_JSON, ILL_TYPED, TRUNCATED, NO_MASKS = (
    "av_00000000000d0001",
    "av_00000000000d0002",
    "av_00000000000d0003",
    "av_00000000000d0004",
    "av_00000000000d0005",
)


def save_copies(root: Path, avatar: Avatar, ids: list[str]) -> AvatarStore:
    store = AvatarStore(root)
    for i, avatar_id in enumerate(ids):
        store.save(dataclasses.replace(avatar, id=avatar_id, name=f"avatar {i}"))
    return store


def truncate(path: Path, keep: int) -> None:
    os.truncate(path, keep)  # in place, as an operator's `truncate` or a crashed writer does


async def offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


# -- damaged at rest -----------------------------------------------------------------------
def damage_at_rest(root: Path) -> dict[str, str]:
    """Damage four of five saved avatars; the words each one's error must contain."""
    (root / BAD_JSON / "meta.json").write_text("{not json")
    meta = json.loads((root / ILL_TYPED / "meta.json").read_text())
    meta.update(n_frames="three", size=None)
    (root / ILL_TYPED / "meta.json").write_text(json.dumps(meta))
    frames = root / TRUNCATED / "frames.npy"
    truncate(frames, frames.stat().st_size // 2)
    (root / NO_MASKS / "masks.npz").unlink()
    return {
        BAD_JSON: "meta.json",
        ILL_TYPED: "meta.json",
        TRUNCATED: "frames.npy",
        NO_MASKS: "masks.npz",
    }


async def test_damaged_avatars_list_as_failed_refuse_sessions_and_can_be_deleted(
    tmp_path: Path, preview_avatar: Avatar
) -> None:
    root = tmp_path / "avatars"
    save_copies(root, preview_avatar, [GOOD, BAD_JSON, ILL_TYPED, TRUNCATED, NO_MASKS])
    damaged = damage_at_rest(root)
    settings = Settings(engine="preview", avatars_dir=root, connect_timeout_s=60.0)
    srv = ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")).start()
    pc, sdp = await offer()
    try:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=30) as http:
            listed = {a["id"]: a for a in (await http.get("/v1/avatars")).json()["avatars"]}
            assert set(listed) == {GOOD, *damaged}, listed
            assert listed[GOOD]["status"] == "ready" and listed[GOOD]["error"] is None
            for avatar_id, words in damaged.items():
                for shown in (listed[avatar_id], (await http.get(f"/v1/avatars/{avatar_id}"))):
                    info = shown if isinstance(shown, dict) else shown.json()
                    assert info["status"] == "failed", info
                    assert words in info["error"], info
                body = {"avatar_id": avatar_id, "sdp": sdp, "type": "offer"}
                r = await http.post("/v1/sessions", json=body)
                assert r.status_code == 409, (avatar_id, r.status_code, r.text)
                assert words in r.json()["detail"], r.text
            r = await http.post("/v1/sessions", json={"avatar_id": GOOD, "sdp": sdp})
            assert r.status_code == 201, r.text
            await http.delete(f"/v1/sessions/{r.json()['session_id']}")
            metrics = (await http.get("/metrics")).text
            assert 'lipstream_avatars{status="failed"} 4.0' in metrics
            for avatar_id in damaged:
                r = await http.delete(f"/v1/avatars/{avatar_id}")
                assert r.status_code == 200, (avatar_id, r.text)
                assert (await http.get(f"/v1/avatars/{avatar_id}")).status_code == 404
                assert not (root / avatar_id).exists()
            listed_after = [a["id"] for a in (await http.get("/v1/avatars")).json()["avatars"]]
            assert listed_after == [GOOD]
    finally:
        await pc.close()
        srv.stop()


# -- damaged under live sessions -------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server_process(
    tmp_path: Path, preview_avatar: Avatar
) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """`lipstream serve` (preview engine) over a store holding two avatars."""
    root = tmp_path / "avatars"
    save_copies(root, preview_avatar, [GOOD, TRUNCATED])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSTREAM_")}
    proc = subprocess.Popen(
        [
            *LIPSTREAM,
            "serve",
            "--engine",
            "preview",
            "--port",
            str(port),
            "--avatars-dir",
            str(root),
            "--no-demo-avatar",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, f"http://127.0.0.1:{port}", root
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # drains: its sessions are ended by now
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


async def wait_up(http: httpx.AsyncClient, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited"
        try:
            if (await http.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("the server did not become ready")


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (
        0.4 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) * 32767
    ).astype(np.int16)


def fps_between(client: LoopbackClient, start: float, stop: float) -> float:
    n = sum(1 for t, _ in client.received.video if start <= t < stop)
    return n / (stop - start)


async def speak(client: LoopbackClient, seconds: float) -> None:
    await client.send_pcm(tone(seconds))
    await client.send_json({"type": "end"})


async def open_client(base: str, avatar_id: str) -> LoopbackClient:
    client = LoopbackClient(base)
    client.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    await client.open(avatar_id)
    await client.connect_audio()
    await client.wait_frames(10)
    return client


async def test_frames_truncated_under_live_sessions_leave_the_server_and_sessions_alive(
    server_process: tuple[subprocess.Popen[str], str, Path],
) -> None:
    proc, base, root = server_process
    clients: list[LoopbackClient] = []
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        await wait_up(http, proc)
        try:
            other = await open_client(base, GOOD)
            clients.append(other)
            victim = await open_client(base, TRUNCATED)
            clients.append(victim)
            # a baseline of the other session's frame rate while both speak
            t0 = time.monotonic()
            await asyncio.gather(speak(other, 1.5), speak(victim, 1.5))
            baseline = fps_between(other, t0 + 0.3, time.monotonic())
            # the damaged avatar's frames.npy loses all but its header, then both speak again
            truncate(root / TRUNCATED / "frames.npy", 128)
            t1 = time.monotonic()
            spoken = await asyncio.gather(
                speak(other, 2.0), speak(victim, 2.0), return_exceptions=True
            )
            await asyncio.sleep(0.5)
            t2 = time.monotonic()
            assert proc.poll() is None, f"the server died (exit status {proc.returncode})"
            assert spoken == [None, None], spoken
            assert (await http.get("/healthz")).status_code == 200
            during = fps_between(other, t1 + 0.3, t2)
            assert during >= min(20.0, 0.8 * baseline), (baseline, during)
            # the damaged avatar's own session plays on from the server's copy
            assert fps_between(victim, t1 + 0.3, t2) >= min(20.0, 0.8 * baseline)
            info = (await http.get(f"/v1/avatars/{TRUNCATED}")).json()
            assert info["status"] == "failed" and "frames.npy" in info["error"], info
            refused = LoopbackClient(base)
            refused.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            with pytest.raises(SessionRefused) as excinfo:
                await refused.open(TRUNCATED)
            await refused.close(delete=False)
            assert excinfo.value.status == 409 and "frames.npy" in excinfo.value.detail
            r = await http.delete(f"/v1/avatars/{TRUNCATED}")
            assert r.status_code == 200 and r.json()["sessions_ended"] == 1, r.text
            assert (
                await http.get(f"/v1/sessions/{other.session['session_id']}")
            ).status_code == 200
        finally:
            for client in clients:
                await client.close()
    assert proc.poll() is None, f"the server died (exit status {proc.returncode})"
