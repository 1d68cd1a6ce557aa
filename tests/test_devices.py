"""One server, several devices (`server.session.devices`): sessions are spread over the devices,
an avatar is loaded on a device when a session there first needs it and unloaded when none
there uses it, a device that faults ends only its own sessions (the others keep their frames,
new sessions go elsewhere), and /readyz and /metrics report per device.

The server is real (uvicorn on loopback, aiortc peers, speech over the websocket). Its two
"devices" are two preview engines, each with its own frame worker: CI has no GPU. The fault is
modelled the same way: the engine of device `gpu:0` raises CUDA's own error text once told to,
which is what a kernel fault makes a real engine raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

from avatars.avatar import Avatar
from bench.loopback import LoopbackClient, ServerThread, SessionRefused, wait_first_avatar_ready
from engines.preview import PreviewEngine
from server.app import create_app
from server.session.devices import Devices, Unit
from server.session.worker import FrameWorker
from server.settings import Settings

CUDA_FAULT = "CUDA error: an illegal memory access was encountered"


class RecordingPreview(PreviewEngine):
    """The preview engine, recording loads and unloads, and faulting on request."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.fault = threading.Event()

    def load_avatar(self, avatar: Avatar) -> None:
        self.loads.append(avatar.id)
        super().load_avatar(avatar)

    def unload_avatar(self, avatar_id: str) -> None:
        self.unloads.append(avatar_id)
        super().unload_avatar(avatar_id)

    def render(
        self, avatar_id: str, loop_positions: Sequence[int], features: np.ndarray
    ) -> np.ndarray:
        if self.fault.is_set():
            raise RuntimeError(CUDA_FAULT)
        return super().render(avatar_id, loop_positions, features)


@pytest.fixture
def two_units() -> Iterator[list[Unit]]:
    """Two started units "gpu:0" and "gpu:1", each a RecordingPreview and its FrameWorker."""
    units = [
        Unit(f"gpu:{k}", e, FrameWorker(e))
        for k, e in enumerate([RecordingPreview(), RecordingPreview()])
    ]
    for unit in units:
        unit.worker.start()
    yield units
    for unit in units:
        unit.worker.stop()


def engines_of(units: list[Unit]) -> list[RecordingPreview]:
    return [u.engine for u in units]  # type: ignore[misc]


def speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * 32767).astype("<i2")


async def session_info(base_url: str, sid: str) -> dict[str, Any] | None:
    async with httpx.AsyncClient(base_url=base_url) as c:
        r = await c.get(f"/v1/sessions/{sid}")
    return r.json() if r.status_code == 200 else None


async def wait_ended(base_url: str, sid: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while await session_info(base_url, sid) is not None:
        assert time.monotonic() < deadline, f"session {sid} was not ended"
        await asyncio.sleep(0.1)


async def one_on_each(
    base_url: str, avatar: str, clients: list[LoopbackClient]
) -> dict[str, LoopbackClient]:
    """Two sessions with audio sockets, streaming; {device: its client} (one on each: the
    device with most room). The clients are added to `clients` (for the clean-up)."""
    for _ in range(2):
        client = LoopbackClient(base_url)
        clients.append(client)
        await client.open(avatar)
        await client.connect_audio()
        await client.wait_frames(5)
    by_device: dict[str, LoopbackClient] = {}
    for client in clients[-2:]:
        info = await session_info(base_url, client.session["session_id"])
        assert info is not None
        by_device[info["device"]] = client
    assert sorted(by_device) == ["gpu:0", "gpu:1"]
    return by_device


async def test_two_devices_share_sessions_and_a_fault_ends_only_its_own(tmp_path: Path) -> None:
    engines = {"gpu:0": RecordingPreview(), "gpu:1": RecordingPreview()}
    settings = Settings(
        engine="preview",
        avatars_dir=tmp_path / "avatars",
        demo_avatar=True,
        max_sessions=4,
        connect_timeout_s=120.0,
    )
    srv = ServerThread(create_app(settings, engine=dict(engines), reason="test")).start()
    clients: list[LoopbackClient] = []
    try:
        avatar = wait_first_avatar_ready(srv.base_url)
        by_device = await one_on_each(srv.base_url, avatar, clients)
        assert engines["gpu:0"].loads == [avatar] and engines["gpu:1"].loads == [avatar]

        faulted, healthy = by_device["gpu:0"], by_device["gpu:1"]
        await healthy.send_pcm(speech(1.5))
        engines["gpu:0"].fault.set()
        with contextlib.suppress(ConnectionClosed):  # it may end while its speech goes out
            await faulted.send_pcm(speech(1.0))
        await wait_ended(srv.base_url, faulted.session["session_id"])
        await asyncio.sleep(0.3)  # its last events arrive
        said = [e for _, e in faulted.received.events if e.get("code") == "engine"]
        assert 1 <= len(said) <= 2, said  # told, at most once a second, until it ended
        ended = [e for _, e in faulted.received.events if e.get("type") == "session_ended"]
        assert [e["reason"] for e in ended] == ["device_failed"]
        frames = len(healthy.received.video)
        await healthy.wait_frames(frames + 25)  # a second more of frames: it goes on
        assert await session_info(srv.base_url, healthy.session["session_id"]) is not None

        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            ready = await c.get("/readyz")
            metrics = (await c.get("/metrics")).text
        body = ready.json()
        assert ready.status_code == 200 and body["status"] == "degraded"
        assert CUDA_FAULT in body["devices"]["gpu:0"]["failed"]
        assert body["devices"]["gpu:1"]["failed"] is None
        assert body["devices"]["gpu:1"]["sessions"] == 1
        assert 'lipstream_device_failed{device="gpu:0"} 1.0' in metrics
        assert 'lipstream_device_failed{device="gpu:1"} 0.0' in metrics
        assert 'lipstream_sessions_ended_total{reason="device_failed"} 1.0' in metrics

        late = LoopbackClient(srv.base_url)  # a new session: only the healthy device is left
        clients.append(late)
        await late.open(avatar)
        await late.wait_frames(5)
        info = await session_info(srv.base_url, late.session["session_id"])
        assert info is not None and info["device"] == "gpu:1"
        assert engines["gpu:1"].loads == [avatar]  # resident there already: no second load

        for client in (healthy, late):
            await client.close()
        deadline = time.monotonic() + 10
        while engines["gpu:1"].unloads != [avatar]:  # unused on gpu:1 now: unloaded
            assert time.monotonic() < deadline, engines["gpu:1"].unloads
            await asyncio.sleep(0.05)
    finally:
        for client in clients:
            await client.close(delete=False)
        srv.stop()


async def test_a_session_that_finds_its_worker_stopped_ends_at_once(tmp_path: Path) -> None:
    """Without the reaper's look at the devices, the faulted device's session still ends
    (`device_failed`) as soon as it finds its worker stopped; the other one goes on."""
    engines = {"gpu:0": RecordingPreview(), "gpu:1": RecordingPreview()}
    settings = Settings(
        engine="preview", avatars_dir=tmp_path / "avatars", demo_avatar=True, max_sessions=4
    )
    srv = ServerThread(create_app(settings, engine=dict(engines), reason="test")).start()
    clients: list[LoopbackClient] = []
    try:
        avatar = wait_first_avatar_ready(srv.base_url)
        manager = srv.app.state.sessions

        async def no_look() -> dict[str, list[str]]:
            return {}

        manager.end_failed_devices = no_look  # the reaper no longer ends faulted devices' sessions
        by_device = await one_on_each(srv.base_url, avatar, clients)
        engines["gpu:0"].fault.set()
        for _ in range(2):  # the first utterance meets the fault, the next a stopped worker
            with contextlib.suppress(ConnectionClosed):
                await by_device["gpu:0"].send_pcm(speech(0.6))
        await wait_ended(srv.base_url, by_device["gpu:0"].session["session_id"], within=5)
        ended = [
            e for _, e in by_device["gpu:0"].received.events if e.get("type") == "session_ended"
        ]
        assert [e["reason"] for e in ended] == ["device_failed"]
        assert await session_info(srv.base_url, by_device["gpu:1"].session["session_id"])
    finally:
        for client in clients:
            await client.close(delete=False)
        srv.stop()


async def test_every_device_failed_refuses_new_sessions_and_says_so(tmp_path: Path) -> None:
    engines = {"gpu:0": RecordingPreview(), "gpu:1": RecordingPreview()}
    settings = Settings(
        engine="preview", avatars_dir=tmp_path / "avatars", demo_avatar=True, max_sessions=4
    )
    srv = ServerThread(create_app(settings, engine=dict(engines), reason="test")).start()
    clients = [LoopbackClient(srv.base_url), LoopbackClient(srv.base_url)]
    try:
        avatar = wait_first_avatar_ready(srv.base_url)
        for client in clients:  # one on each device
            await client.open(avatar)
            await client.connect_audio()
            await client.wait_frames(3)
        for engine in engines.values():
            engine.fault.set()
        for client in clients:
            with contextlib.suppress(ConnectionClosed):  # it may end while its speech goes out
                await client.send_pcm(speech(1.0))
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            deadline = time.monotonic() + 10
            while (ready := await c.get("/readyz")).json()["status"] != "engine_failed":
                assert time.monotonic() < deadline, ready.json()
                await asyncio.sleep(0.1)
        assert ready.status_code == 503
        assert set(ready.json()["devices"]) == {"gpu:0", "gpu:1"}
        refused = LoopbackClient(srv.base_url)
        clients.append(refused)
        with pytest.raises(SessionRefused) as err:
            await refused.open(avatar)
        assert err.value.status == 503 and err.value.reason == "engine_failed"
        assert "every device failed" in err.value.detail
    finally:
        for client in clients:
            await client.close(delete=False)
        srv.stop()


def test_a_fault_noticed_at_placement_still_ends_its_sessions_once(
    two_units: list[Unit],
) -> None:
    """A new session's placement that first notices a device's fault marks it failed (it is
    not chosen), and the device's sessions still come back, once, from the reaper's check."""
    devices = Devices(two_units, max_sessions=8)
    placed = {sid: devices.place(sid, "av", now=0.0).device for sid in ("a", "b", "c", "d")}
    on0 = sorted(s for s, d in placed.items() if d == "gpu:0")
    two_units[0].worker.stop()  # as a fault stops it
    assert devices.place("e", "av", now=0.0).device == "gpu:1"
    assert devices.check() == {"gpu:0": on0}
    assert devices.check() == {}
    assert devices.failed == {"gpu:0": "its frame worker stopped"} and devices.alive


async def test_a_device_failing_while_a_session_opens_is_a_503_to_retry(
    tmp_path: Path, preview_avatar: Avatar
) -> None:
    """The device chosen for a session faults before the avatar is resident there: the open
    is refused with 503 `engine_failed` and Retry-After (not an internal error)."""
    from types import SimpleNamespace

    from avatars.decode import DecodeLimits
    from avatars.store import AvatarStore
    from server.api.sessions import BadRequest, session_parts
    from server.avatar_service import AvatarService
    from server.media.pictures import IdleFrames
    from server.metrics import ServerMetrics

    store = AvatarStore(tmp_path / "avatars")
    store.save(preview_avatar)
    engine = RecordingPreview()
    unit = Unit("gpu:0", engine, FrameWorker(engine))  # never started, then stopped: faulted
    unit.worker.stop()
    devices = Devices([unit], max_sessions=2)
    avatars = AvatarService(store, devices, ServerMetrics(), DecodeLimits(), IdleFrames())
    app = SimpleNamespace(
        state=SimpleNamespace(avatars=avatars, devices=devices, settings=Settings())
    )
    with pytest.raises(BadRequest) as err:
        await session_parts(app, "se_x", unit, preview_avatar.id)
    assert err.value.status == 503 and err.value.extra == {"reason": "engine_failed"}
    assert err.value.headers == {"Retry-After": str(Settings().retry_after_s)}
    assert "gpu:0 failed" in str(err.value) and engine.loads == []


async def test_an_unload_waits_for_a_session_placed_meanwhile(
    tmp_path: Path, preview_avatar: Avatar, two_units: list[Unit]
) -> None:
    """`release` re-reads whether the avatar is in use under the avatar's lock: a session
    placed on the device between the end and the unload keeps it resident; the host copy
    goes once no device holds the avatar."""
    from avatars.decode import DecodeLimits
    from avatars.store import AvatarStore
    from server.avatar_service import AvatarService
    from server.media.pictures import IdleFrames
    from server.metrics import ServerMetrics

    store = AvatarStore(tmp_path / "avatars")
    store.save(preview_avatar)
    units, engines = two_units, engines_of(two_units)
    devices = Devices(units, max_sessions=4)
    service = AvatarService(store, devices, ServerMetrics(), DecodeLimits(), IdleFrames())
    avatar_id = preview_avatar.id
    for unit in units:
        await service.ready(avatar_id, unit)
    assert [e.loads for e in engines] == [[avatar_id], [avatar_id]]
    await service.release(avatar_id, units[0], lambda: True)  # placed again meanwhile
    assert engines[0].unloads == []
    await service.release(avatar_id, units[0], lambda: False)
    assert engines[0].unloads == [avatar_id] and engines[1].unloads == []
    assert avatar_id in service._loaded  # gpu:1 still holds it
    await service.ready(avatar_id, units[0])  # needed there again: loaded again
    assert engines[0].loads == [avatar_id, avatar_id]
    for unit in units:
        await service.release(avatar_id, unit, lambda: False)
    assert avatar_id not in service._loaded


# -- two real GPUs (skipped unless torch sees two) -----------------------------------------
@pytest.mark.gpu
@pytest.mark.allow_leaks("CUDA's device files live as long as the process")
def test_two_gpus_each_make_their_own_sessions_frames(tmp_path: Path) -> None:
    """MuseTalk (tiny random weights, eager torch backend) on cuda:0 and cuda:1 behind one
    server: two sessions land one on each GPU, each GPU's scheduler makes its own session's
    lip-synced frames, and /readyz lists both devices."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    import os
    import shutil

    from engines.backends import create_engine
    from engines.musetalk.weights import make_random

    made = os.environ.get("LIPSTREAM_TEST_AVATARS_DIR")  # a prepared store (see gpu_tests.sh)
    if made:
        shutil.copytree(made, tmp_path / "avatars")

    models = tmp_path / "models"
    make_random(models, size="tiny", seed=0)
    engines = {
        f"cuda:{i}": create_engine("musetalk", models, f"cuda:{i}", "torch")[0] for i in range(2)
    }
    settings = Settings(
        engine="musetalk",
        backend="torch",
        avatars_dir=tmp_path / "avatars",
        demo_avatar=not made,
        max_sessions=4,
        connect_timeout_s=120.0,
    )

    async def drive(base_url: str, avatar: str) -> list[dict[str, Any]]:
        clients = [LoopbackClient(base_url), LoopbackClient(base_url)]
        try:
            for client in clients:
                await client.open(avatar)
                await client.connect_audio()
                await client.wait_frames(10, within=120)
            for client in clients:
                await client.send_pcm(speech(2.0))
                await client.send_json({"type": "end"})
            for client in clients:
                await client.wait_event("playback_finished", within=60)
            infos = [await session_info(base_url, c.session["session_id"]) for c in clients]
            return [i for i in infos if i is not None]
        finally:
            for client in clients:
                await client.close()

    app = create_app(settings, engine=engines, reason="test")
    with ServerThread(app, start_timeout=400.0) as srv:
        avatar = wait_first_avatar_ready(srv.base_url, within=300)
        infos = asyncio.run(drive(srv.base_url, avatar))
        ready = httpx.get(f"{srv.base_url}/readyz").json()
    assert sorted(i["device"] for i in infos) == ["cuda:0", "cuda:1"]
    assert all(i["speech_frames"] >= 40 and i["frames_dropped"] == 0 for i in infos), infos
    assert set(ready["devices"]) == {"cuda:0", "cuda:1"}
    assert all(row["failed"] is None for row in ready["devices"].values())
    frames = {d: u.worker.frames for d, u in app.state.devices.units.items()}
    assert all(n > 0 for n in frames.values()), frames


async def test_one_device_keeps_the_most_recently_used_idle_avatars(
    tmp_path: Path, preview_avatar: Avatar, two_units: list[Unit]
) -> None:
    """`trim`: the avatars no session uses beyond `keep` leave the device, least recently used
    first; one in use stays whatever its age."""
    import dataclasses

    from avatars.decode import DecodeLimits
    from avatars.store import AvatarStore
    from server.avatar_service import AvatarService
    from server.media.pictures import IdleFrames
    from server.metrics import ServerMetrics

    store = AvatarStore(tmp_path / "avatars")
    ids = [f"av_00000000000000a{k}" for k in range(4)]
    for avatar_id in ids:
        store.save(dataclasses.replace(preview_avatar, id=avatar_id))
    unit, engine = two_units[0], engines_of(two_units)[0]
    service = AvatarService(
        store, Devices([unit], max_sessions=4), ServerMetrics(), DecodeLimits(), IdleFrames()
    )
    for avatar_id in ids:
        await service.ready(avatar_id, unit)
    await service.ready(ids[0], unit)  # a0 used again: from oldest, a1 a2 a3 a0
    in_use = {ids[1]}  # a session still has a1
    assert await service.trim(unit, 1, lambda: in_use) == (ids[2], ids[3])  # a0 kept
    assert engine.unloads == [ids[2], ids[3]]
    assert await service.trim(unit, 1, lambda: in_use) == ()
    in_use.clear()
    assert await service.trim(unit, 0, lambda: in_use) == (ids[1], ids[0])
    assert not service._loaded  # no device holds any: the host copies went too


@pytest.mark.parametrize("idle_avatars", [0, 8])
async def test_a_lone_device_unloads_an_unused_avatar_beyond_idle_avatars(
    tmp_path: Path, idle_avatars: int
) -> None:
    engine = RecordingPreview()
    settings = Settings(
        engine="preview",
        avatars_dir=tmp_path / "avatars",
        demo_avatar=True,
        idle_avatars=idle_avatars,
    )
    srv = ServerThread(create_app(settings, engine=engine, reason="test")).start()
    client = LoopbackClient(srv.base_url)
    try:
        avatar = wait_first_avatar_ready(srv.base_url)
        await client.open(avatar)
        await client.wait_frames(3)
        await client.close()  # DELETE: its session ends
        want = [avatar] if idle_avatars == 0 else []
        deadline = time.monotonic() + 5
        while engine.unloads != want:
            assert time.monotonic() < deadline, engine.unloads
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # nothing more comes
        assert engine.unloads == want and engine.loads == [avatar]
    finally:
        await client.close(delete=False)
        srv.stop()
