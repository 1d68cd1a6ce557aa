"""`POST /v1/sessions` racing `DELETE /v1/avatars/{id}` on a real server: the two are ordered.
Either the open answers 404, or it opened a session that the delete ended (and counted in its
`sessions_ended`); no session outlives its avatar, and the engine keeps nothing of it."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from avatars.avatar import Avatar
from avatars.store import AvatarStore
from bench.loopback import ServerThread
from engines.preview import PreviewEngine
from server.app import create_app
from server.settings import Settings

ROUNDS = 30
MAX_OFFSET_S = 0.04


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    settings = Settings(
        engine="preview", avatars_dir=tmp_path / "avatars", connect_timeout_s=60.0, max_sessions=8
    )
    srv = ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")).start()
    try:
        yield srv
    finally:
        srv.stop()


async def offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def race(
    http: httpx.AsyncClient, avatar_id: str, sdp: str, offset_s: float
) -> tuple[httpx.Response, httpx.Response]:
    body = {"avatar_id": avatar_id, "sdp": sdp, "type": "offer"}
    opening = asyncio.ensure_future(http.post("/v1/sessions", json=body))
    await asyncio.sleep(offset_s)
    deleted = await http.delete(f"/v1/avatars/{avatar_id}")
    return await opening, deleted


async def test_opening_a_session_while_its_avatar_is_deleted_is_ordered(
    server: ServerThread, preview_avatar: Avatar
) -> None:
    store: AvatarStore = server.app.state.avatars.store
    engine: PreviewEngine = server.app.state.engine
    manager = server.app.state.sessions
    rng = random.Random(27)
    outcomes: list[tuple[float, int, int]] = []
    wrong: list[str] = []
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        for i in range(ROUNDS):
            avatar_id = f"av_{0xD00000 + i:016x}"
            store.save(dataclasses.replace(preview_avatar, id=avatar_id, name=f"racer {i}"))
            pc, sdp = await offer()
            offset = rng.uniform(0.0, MAX_OFFSET_S)
            try:
                opened, deleted = await race(http, avatar_id, sdp, offset)
            finally:
                await pc.close()
            assert deleted.status_code == 200, deleted.text
            ended = int(deleted.json()["sessions_ended"])
            outcomes.append((round(offset * 1000, 1), opened.status_code, ended))
            if opened.status_code == 201:
                sid = opened.json()["session_id"]
                alive = (await http.get(f"/v1/sessions/{sid}")).status_code != 404
                if ended != 1 or alive:
                    wrong.append(f"round {i}: opened, delete ended {ended}, alive={alive}")
                    await http.delete(f"/v1/sessions/{sid}")
            elif opened.status_code != 404:
                wrong.append(f"round {i}: open answered {opened.status_code} {opened.text}")
            elif ended != 0:
                wrong.append(f"round {i}: open refused, but the delete ended {ended}")
            left = [s.id for s in manager.sessions.values() if s.avatar.id == avatar_id]
            if left or avatar_id in engine._avatars:
                wrong.append(f"round {i}: sessions {left} or the engine still hold the avatar")
                for sid in left:
                    await http.delete(f"/v1/sessions/{sid}")
    assert not wrong, (wrong, outcomes)
    statuses = {status for _, status, _ in outcomes}
    assert statuses <= {201, 404}, outcomes
    assert manager.sessions == {} and manager._opening == 0
