"""REST over a real server on loopback (preview engine): avatars, sessions, limits, health."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from aiortc import RTCPeerConnection

from avatars.store import AvatarStore
from bench.loopback import ServerThread
from engines.preview import PreviewEngine
from server.app import create_app
from server.settings import Settings

MAX_UPLOAD = 1024 * 1024


def astronaut_png() -> bytes:
    from skimage.data import astronaut

    ok, png = cv2.imencode(".png", cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    assert ok
    return png.tobytes()


def faceless_png() -> bytes:
    ramp = np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))
    ok, png = cv2.imencode(".png", np.dstack([ramp, ramp, ramp]))
    assert ok
    return png.tobytes()


def serve(root: Path, **overrides: object) -> ServerThread:
    values: dict[str, object] = {
        "engine": "preview",
        "avatars_dir": root,
        "max_sessions": 2,
        "max_upload_bytes": MAX_UPLOAD,
        "connect_timeout_s": 120.0,
    }
    values.update(overrides)
    settings = Settings(**values)  # type: ignore[arg-type]
    return ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")).start()


def wait_status(
    base: str, avatar_id: str, within: float = 60.0, headers: dict[str, str] | None = None
) -> tuple[dict, list[float]]:
    progress = []
    deadline = time.monotonic() + within
    while True:
        info = httpx.get(f"{base}/v1/avatars/{avatar_id}", headers=headers).json()
        progress.append(info["progress"])
        if info["status"] in ("ready", "failed") or time.monotonic() > deadline:
            return info, progress
        time.sleep(0.02)


def register(
    base: str, data: bytes, name: str = "astronaut", headers: dict[str, str] | None = None
) -> dict:
    r = httpx.post(
        f"{base}/v1/avatars",
        files={"file": ("x.png", data, "image/png")},
        data={"name": name},
        headers=headers,
    )
    assert r.status_code == 202, r.text
    return dict(r.json())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = serve(tmp_path_factory.mktemp("rest") / "avatars")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ready_avatar(server: ServerThread) -> str:
    info = register(server.base_url, astronaut_png())
    final, _ = wait_status(server.base_url, info["id"])
    assert final["status"] == "ready", final
    return str(info["id"])


async def offer(
    video: str | None = "recvonly", audio: str | None = "recvonly"
) -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection()
    if video:
        pc.addTransceiver("video", direction=video)
    if audio:
        pc.addTransceiver("audio", direction=audio)
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


@pytest.fixture
async def client(server: ServerThread) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as c:
        yield c
        left = list(server.app.state.sessions.sessions)
        for sid in left:
            await c.delete(f"/v1/sessions/{sid}")
    assert left == [], "the test left sessions open"


# -- avatars ---------------------------------------------------------------------------
def test_upload_answers_202_at_once_and_reports_progress(server: ServerThread) -> None:
    t0 = time.monotonic()
    r = httpx.post(
        f"{server.base_url}/v1/avatars",
        files={"file": ("../../etc/passwd.m3u8", astronaut_png(), "image/png")},
        data={"name": "astro", "bbox_shift": "-3"},
    )
    assert r.status_code == 202, r.text
    assert time.monotonic() - t0 < 2.0
    info = r.json()
    assert info["id"].startswith("av_") and info["status"] in ("pending", "preparing")
    assert r.headers["location"] == f"/v1/avatars/{info['id']}"
    final, progress = wait_status(server.base_url, info["id"])
    assert final["status"] == "ready" and final["progress"] == 1.0 and final["error"] is None
    assert final["n_frames"] == 1 and final["size"] == [512, 512] and final["bbox_shift"] == -3
    assert progress == sorted(progress), "progress went back"
    listed = httpx.get(f"{server.base_url}/v1/avatars").json()["avatars"]
    assert info["id"] in [a["id"] for a in listed]
    # the upload was stored under a server-made name and is gone once prepared
    uploads = server.app.state.avatars.uploads_dir
    assert not any(uploads.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({"content": b"{}", "headers": {"content-type": "application/json"}}, 400, "multipart"),
        ({"data": {"name": "x"}, "files": {"other": ("a", b"123")}}, 400, "no `file` part"),
        ({"files": {"file": ("a.png", b"")}}, 400, "empty"),
        ({"files": {"file": ("a.png", b"\0" * (MAX_UPLOAD + 1))}}, 413, "larger than"),
        ({"files": {"file": ("a.png", b"12")}, "data": {"bbox_shift": "up"}}, 400, "bbox_shift"),
        ({"files": {"file": ("a.png", b"12")}, "data": {"bbox_shift": "500"}}, 400, "bbox_shift"),
        ({"files": {"file": ("a.png", b"12")}, "data": {"name": "n" * 100}}, 400, "name"),
    ],
)
def test_bad_uploads_are_refused_with_a_message(
    server: ServerThread, kwargs: dict, status: int, words: str
) -> None:
    before = len(httpx.get(f"{server.base_url}/v1/avatars").json()["avatars"])
    r = httpx.post(f"{server.base_url}/v1/avatars", **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert len(httpx.get(f"{server.base_url}/v1/avatars").json()["avatars"]) == before
    assert not any(server.app.state.avatars.uploads_dir.iterdir())


def test_oversized_upload_without_content_length_is_cut_off(server: ServerThread) -> None:
    boundary = "xyzzy"
    sent = [0]

    def body() -> Iterator[bytes]:
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'.encode()
        for _ in range(40):  # 2.5 MiB in 64 KiB pieces, far past the 1 MiB limit
            sent[0] += 1
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    try:
        r = httpx.post(f"{server.base_url}/v1/avatars", content=body(), headers=headers)
        assert r.status_code == 413, r.text
    except httpx.HTTPError:
        pass  # the server may answer and close before the client finished sending
    assert not any(server.app.state.avatars.uploads_dir.iterdir())


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"this is not a picture", "unsupported file type"),
        (faceless_png(), "no face"),
    ],
)
def test_a_failed_preparation_has_a_readable_error(
    server: ServerThread, data: bytes, words: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="server.avatar_service")
    info = register(server.base_url, data, name="bad")
    final, _ = wait_status(server.base_url, info["id"])
    assert final["status"] == "failed"
    assert words in final["error"] and "Traceback" not in final["error"]
    # the server's log says which avatar failed and why, as fields
    logged = [
        r
        for r in caplog.records
        if r.getMessage() == "avatar preparation failed"
        and getattr(r, "avatar_id", None) == info["id"]
    ]
    assert len(logged) == 1 and words in logged[0].reason  # type: ignore[attr-defined]


def test_unknown_avatars_are_404(server: ServerThread) -> None:
    for aid in ("av_0123456789abcdef", "..%2F..%2Fetc", "nope", "av_../../x"):
        r = httpx.get(f"{server.base_url}/v1/avatars/{aid}")
        assert r.status_code == 404
        assert httpx.delete(f"{server.base_url}/v1/avatars/{aid}").status_code == 404
    r = httpx.get(f"{server.base_url}/v1/avatars/av_0123456789abcdef")
    assert "no avatar" in r.json()["detail"]


# -- sessions --------------------------------------------------------------------------
async def test_session_answer_shape(
    client: httpx.AsyncClient, ready_avatar: str, server: ServerThread
) -> None:
    pc, sdp = await offer()
    try:
        r = await client.post(
            "/v1/sessions", json={"avatar_id": ready_avatar, "sdp": sdp, "type": "offer"}
        )
        assert r.status_code == 201, r.text
        body = r.json()
        assert set(body) == {"session_id", "sdp", "type", "audio_ws", "token"}
        assert body["type"] == "answer" and "m=video" in body["sdp"] and "m=audio" in body["sdp"]
        assert body["audio_ws"] == f"/v1/sessions/{body['session_id']}/audio"
        assert len(body["token"]) >= 24
        info = (await client.get(f"/v1/sessions/{body['session_id']}")).json()
        assert info["state"] == "new" and info["avatar_id"] == ready_avatar
        assert "latency_ms" in info and "fps" in info
        # video only is fine too
        pc2, sdp2 = await offer(audio=None)
        r2 = await client.post(
            "/v1/sessions", json={"avatar_id": ready_avatar, "sdp": sdp2, "type": "offer"}
        )
        assert r2.status_code == 201 and "m=audio" not in r2.json()["sdp"]
        await pc2.close()
        for sid in (body["session_id"], r2.json()["session_id"]):
            assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 200
    finally:
        await pc.close()


async def test_session_refusals(
    client: httpx.AsyncClient, ready_avatar: str, server: ServerThread
) -> None:
    pc, sdp = await offer()
    _, sendonly = await offer(video="sendonly")
    _, audio_only = await offer(video=None)
    store: AvatarStore = server.app.state.avatars.store
    pending = store.create("pending one")
    failed = store.create("failed one")
    store.set_status(failed, "failed", error="no face found")
    cases = [
        ({"avatar_id": "av_0123456789abcdef", "sdp": sdp, "type": "offer"}, 404, "no avatar"),
        ({"avatar_id": pending, "sdp": sdp, "type": "offer"}, 409, "pending"),
        ({"avatar_id": failed, "sdp": sdp, "type": "offer"}, 409, "no face found"),
        (
            {"avatar_id": ready_avatar, "sdp": "v=0\r\nm=video 9 UDP\r\nbogus", "type": "offer"},
            400,
            "offer",
        ),
        (
            {"avatar_id": ready_avatar, "sdp": sdp.replace("m=video", "m=text"), "type": "offer"},
            400,
            "video",
        ),
        ({"avatar_id": ready_avatar, "sdp": sendonly, "type": "offer"}, 400, "receive video"),
        ({"avatar_id": ready_avatar, "sdp": audio_only, "type": "offer"}, 400, "video"),
        (
            {"avatar_id": ready_avatar, "sdp": sdp + "a=x\r\n" * 20000, "type": "offer"},
            413,
            "larger",
        ),
        (
            {
                "avatar_id": ready_avatar,
                "sdp": sdp + ("a=" + "x" * 200 + "\r\n") * 320,
                "type": "offer",
            },
            400,
            "larger than",
        ),
        (
            {"avatar_id": ready_avatar, "sdp": sdp + "m=video 9\r\n" * 5, "type": "offer"},
            400,
            "media lines",
        ),
        ({"avatar_id": ready_avatar, "sdp": sdp, "type": "answer"}, 400, "offer"),
        ({"avatar_id": ready_avatar, "sdp": 12, "type": "offer"}, 400, "sdp"),
        ({"sdp": sdp, "type": "offer"}, 400, "avatar_id"),
        ([1, 2], 400, "JSON object"),
    ]
    try:
        for body, status, words in cases:
            r = await client.post("/v1/sessions", json=body)
            assert r.status_code == status, (
                body if not isinstance(body, dict) else body.get("avatar_id"),
                r.text,
            )
            assert words in r.json()["detail"], r.text
        r = await client.post(
            "/v1/sessions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400
    finally:
        await pc.close()
    manager = server.app.state.sessions
    assert manager.sessions == {} and manager._opening == 0


async def test_session_limit_answers_503_with_retry_after(
    client: httpx.AsyncClient, ready_avatar: str, server: ServerThread
) -> None:
    pcs = []
    ids = []
    try:
        for _ in range(2):
            pc, sdp = await offer()
            pcs.append(pc)
            r = await client.post(
                "/v1/sessions", json={"avatar_id": ready_avatar, "sdp": sdp, "type": "offer"}
            )
            assert r.status_code == 201
            ids.append(r.json()["session_id"])
        pc, sdp = await offer()
        pcs.append(pc)
        body = {"avatar_id": ready_avatar, "sdp": sdp, "type": "offer"}
        r = await client.post("/v1/sessions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert "limit of 2 sessions" in r.json()["detail"] and r.json()["reason"] == "limit"
        assert (await client.delete(f"/v1/sessions/{ids.pop()}")).status_code == 200
        r = await client.post("/v1/sessions", json=body)
        assert r.status_code == 201
        ids.append(r.json()["session_id"])
    finally:
        for sid in ids:
            await client.delete(f"/v1/sessions/{sid}")
        for pc in pcs:
            await pc.close()
    metrics = (await client.get("/metrics")).text
    assert 'lipstream_sessions_refused_total{reason="limit"} 1.0' in metrics


async def test_deleting_a_session_frees_everything(
    client: httpx.AsyncClient,
    ready_avatar: str,
    server: ServerThread,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="server")
    pc, sdp = await offer()
    try:
        r = await client.post(
            "/v1/sessions", json={"avatar_id": ready_avatar, "sdp": sdp, "type": "offer"}
        )
        sid = r.json()["session_id"]
        session = server.app.state.sessions.get(sid)
        media = session.media
        server_pc = media.pc
        assert session is not None and session._clock is not None
        r = await client.delete(f"/v1/sessions/{sid}")
        assert r.status_code == 200 and r.json() == {"session_id": sid, "ended": True}
        assert (await client.get(f"/v1/sessions/{sid}")).status_code == 404
        assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 404
    finally:
        await pc.close()
    assert session.closed and session.end_reason == "deleted"
    assert session.media is None and server_pc.connectionState == "closed"
    assert session._clock is None
    assert media.video.readyState == "ended" and media.audio.readyState == "ended"
    assert not session.playout.speaking and session.ws is None
    assert server.app.state.devices.primary.worker.queued(sid) == 0
    assert server.app.state.sessions.sessions == {}
    assert "lipstream_sessions_active 0.0" in (await client.get("/metrics")).text
    # the log lines of its life carry its id (and its avatar's) as fields
    lines = {r.getMessage(): vars(r) for r in caplog.records if vars(r).get("session_id") == sid}
    assert lines["session opened"]["avatar_id"] == ready_avatar
    assert lines["session ended"]["reason"] == "deleted"


async def test_deleting_an_avatar_ends_its_sessions_and_frees_it(
    client: httpx.AsyncClient, server: ServerThread
) -> None:
    info = register(server.base_url, astronaut_png(), name="doomed")
    assert wait_status(server.base_url, info["id"])[0]["status"] == "ready"
    aid = info["id"]
    pc, sdp = await offer()
    try:
        r = await client.post("/v1/sessions", json={"avatar_id": aid, "sdp": sdp, "type": "offer"})
        assert r.status_code == 201
        sid = r.json()["session_id"]
        engine: PreviewEngine = server.app.state.engine
        assert aid in engine._avatars
        r = await client.delete(f"/v1/avatars/{aid}")
        assert r.status_code == 200 and r.json()["sessions_ended"] == 1
        assert (await client.get(f"/v1/sessions/{sid}")).status_code == 404
        assert (await client.get(f"/v1/avatars/{aid}")).status_code == 404
        assert aid not in engine._avatars
        assert not (server.app.state.avatars.store.root / aid).exists()
        pc2, sdp2 = await offer()
        r = await client.post("/v1/sessions", json={"avatar_id": aid, "sdp": sdp2, "type": "offer"})
        assert r.status_code == 404
        await pc2.close()
    finally:
        await pc.close()


def test_avatars_survive_a_restart_and_interrupted_ones_fail(tmp_path: Path) -> None:
    root = tmp_path / "avatars"
    srv = serve(root, demo_avatar=True)
    try:
        listed = httpx.get(f"{srv.base_url}/v1/avatars").json()["avatars"]
        assert [a["name"] for a in listed] == ["astronaut"]
        final, _ = wait_status(srv.base_url, listed[0]["id"])
        assert final["status"] == "ready"
    finally:
        srv.stop()
    store = AvatarStore(root)
    cut = store.create("cut short")
    store.set_status(cut, "preparing", progress=0.4)
    srv = serve(root, demo_avatar=True)
    try:
        listed = {a["name"]: a for a in httpx.get(f"{srv.base_url}/v1/avatars").json()["avatars"]}
        assert set(listed) == {"astronaut", "cut short"}  # the demo avatar is not added twice
        assert listed["astronaut"]["status"] == "ready"
        assert (
            listed["cut short"]["status"] == "failed"
            and "interrupted" in listed["cut short"]["error"]
        )
    finally:
        srv.stop()


async def test_a_peer_that_never_connects_is_reaped(tmp_path: Path) -> None:
    srv = serve(tmp_path / "avatars", connect_timeout_s=0.5, demo_avatar=True)
    try:
        pc, sdp = await offer()
        async with httpx.AsyncClient(base_url=srv.base_url) as c:
            aid = (await c.get("/v1/avatars")).json()["avatars"][0]["id"]
            for _ in range(600):
                if (await c.get(f"/v1/avatars/{aid}")).json()["status"] == "ready":
                    break
                await asyncio.sleep(0.05)
            r = await c.post("/v1/sessions", json={"avatar_id": aid, "sdp": sdp, "type": "offer"})
            sid = r.json()["session_id"]
            await asyncio.sleep(2.0)
            assert (await c.get(f"/v1/sessions/{sid}")).status_code == 404
            assert (
                'lipstream_sessions_ended_total{reason="connect_timeout"} 1.0'
                in (await c.get("/metrics")).text
            )
        await pc.close()
    finally:
        srv.stop()


# -- health and the demo page ------------------------------------------------------------
def test_health_readiness_metrics_and_demo_page(server: ServerThread) -> None:
    base = server.base_url
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200 and ready.json()["engine"] == "preview"
    metrics = httpx.get(f"{base}/metrics")
    assert metrics.status_code == 200 and "lipstream_sessions_active" in metrics.text
    # the stall watch runs: loop lag sampled every 20 ms since the server was ready
    lags = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.text.splitlines()
        if line.startswith("lipstream_event_loop_lag_seconds_count")
    ]
    assert lags and lags[0] > 0
    assert "lipstream_gc_pause_seconds" in metrics.text
    assert server.app.state.gc_pauses._callback in gc.callbacks
    page = httpx.get(f"{base}/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    js = httpx.get(f"{base}/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    for bad in ("/..%2Fserver%2Fapp.py", "/__init__.py", "/nothing.js", "/v1/nothing"):
        r = httpx.get(base + bad)
        assert r.status_code == 404, bad


def test_an_api_key_guards_the_rest_api(tmp_path: Path) -> None:
    srv = serve(tmp_path / "avatars", api_key="s3cret-key-123")
    try:
        base = srv.base_url
        for method, path in (
            ("GET", "/v1/avatars"),
            ("POST", "/v1/avatars"),
            ("POST", "/v1/sessions"),
            ("GET", "/v1/sessions/x"),
        ):
            r = httpx.request(method, base + path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (
                method,
                path,
            )
        wrong = {"authorization": "Bearer nope"}
        assert httpx.get(f"{base}/v1/avatars", headers=wrong).status_code == 401
        good = {"authorization": "Bearer s3cret-key-123"}
        assert httpx.get(f"{base}/v1/avatars", headers=good).status_code == 200
        assert httpx.get(f"{base}/healthz").status_code == 200  # probes need no key
        ready = httpx.get(f"{base}/readyz").text
        assert "s3cret" not in ready
    finally:
        srv.stop()
