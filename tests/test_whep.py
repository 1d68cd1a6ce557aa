"""WHEP (RFC 9725's HTTP exchange, playback side) against a real uvicorn server (preview engine,
an API key set) with a real aiortc client that does what the RFC says: recvonly transceivers,
the offer POSTed as application/sdp with the bearer key, the 201's answer applied, media
received, the session resource (Location) DELETEd.

The session's audio websocket, found through its Link header, drives speech: the server's
`playback_started` event comes back on it. The refusals are RFC 9457 problem documents with
the statuses of POST /v1/sessions (it is the same code), plus 415 for another content type and
405 for PATCH (no trickle ICE or ICE restart).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from test_server_rest import astronaut_png, register, wait_status

from bench.loopback import ServerThread
from engines.preview import PreviewEngine
from server.app import create_app
from server.settings import Settings

KEY = "whep-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SDP = {"Content-Type": "application/sdp"}
PROBLEM = "application/problem+json"
_LINK = re.compile(r'<([^>]*)>\s*;\s*rel="([^"]+)"')


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    settings = Settings(
        engine="preview",
        avatars_dir=tmp_path_factory.mktemp("whep") / "avatars",
        api_key=KEY,
        max_sessions=1,
        connect_timeout_s=60.0,
        ice_servers=("stun:stun.example.org:3478",),
    )
    srv = ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def avatar(server: ServerThread) -> str:
    avatar_id = str(register(server.base_url, astronaut_png(), headers=AUTH)["id"])
    final, _ = wait_status(server.base_url, avatar_id, within=30, headers=AUTH)
    assert final["status"] == "ready", final
    return avatar_id


@pytest.fixture
async def http(server: ServerThread) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as c:
        yield c
        left = list(server.app.state.sessions.sessions)
        for sid in left:
            await c.delete(f"/v1/sessions/{sid}", headers=AUTH)
    assert left == [], "the test left sessions open"


async def recvonly_offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


def links(response: httpx.Response) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for value in response.headers.get_list("link", split_commas=True):
        for url, rel in _LINK.findall(value):
            out.setdefault(rel, []).append(url)
    return out


def tone(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype(np.int16).tobytes()


async def test_whep_client_receives_video_and_audio_and_delete_ends_it(
    server: ServerThread, avatar: str, http: httpx.AsyncClient
) -> None:
    pc, sdp = await recvonly_offer()
    tracks: dict[str, object] = {}
    pc.on("track", lambda track: tracks.setdefault(track.kind, track))
    try:
        r = await http.post(f"/whep/{avatar}", content=sdp, headers={**AUTH, **SDP})
        assert r.status_code == 201, r.text
        assert r.headers["content-type"].startswith("application/sdp")
        location = r.headers["location"]
        assert re.fullmatch(r"/whep/sessions/[\w-]+", location), location
        rels = links(r)
        assert rels["ice-server"] == ["stun:stun.example.org:3478"], rels
        [audio_ws] = rels["urn:lipstream:audio-ws"]
        [session_url] = rels["urn:lipstream:session"]
        session_id = location.rsplit("/", 1)[1]
        assert session_url == f"/v1/sessions/{session_id}"
        assert audio_ws.startswith(f"/v1/sessions/{session_id}/audio?token=")
        assert r.text.startswith("v=0") and "a=fingerprint" in r.text

        await pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
        assert set(tracks) == {"video", "audio"}
        video, audio = tracks["video"], tracks["audio"]
        frames = [await asyncio.wait_for(video.recv(), 20) for _ in range(10)]  # type: ignore[attr-defined]
        assert all(f.width > 0 and f.height > 0 for f in frames)
        assert frames[-1].pts > frames[0].pts  # frames advance
        sound = [await asyncio.wait_for(audio.recv(), 10) for _ in range(5)]  # type: ignore[attr-defined]
        assert all(s.samples > 0 for s in sound)

        # the Link's websocket drives speech: the server says it started playing it
        async with websockets.connect(server.ws_url + audio_ws) as ws:
            speech = tone(2.0)
            for i in range(0, len(speech), 640):  # 20 ms messages
                await ws.send(speech[i : i + 640])
            await ws.send(json.dumps({"type": "end"}))
            event = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert event["type"] == "playback_started", event

        info = await http.get(session_url, headers=AUTH)
        assert info.status_code == 200 and info.json()["audio_bytes"] > 0, info.text

        # the session resource needs the key too; DELETE ends the session
        assert (await http.delete(location)).status_code == 401
        d = await http.delete(location, headers=AUTH)
        assert d.status_code == 200, d.text
        assert (await http.get(session_url, headers=AUTH)).status_code == 404
        again = await http.delete(location, headers=AUTH)
        assert again.status_code == 404 and again.headers["content-type"] == PROBLEM
    finally:
        await pc.close()


def _assert_problem(r: httpx.Response, status: int, words: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM, r.headers
    body = r.json()
    assert body["status"] == status and body["title"] and body["type"] == "about:blank", body
    assert words in body["detail"], body
    return dict(body)


async def test_whep_refusals_are_problem_documents(
    server: ServerThread, avatar: str, http: httpx.AsyncClient
) -> None:
    pc, sdp = await recvonly_offer()
    await pc.close()
    url = f"/whep/{avatar}"
    assert (await http.post(url, content=sdp, headers=SDP)).status_code == 401
    r = await http.post(url, content=sdp, headers={**AUTH, "Content-Type": "application/json"})
    _assert_problem(r, 415, "application/sdp")
    assert r.headers["accept-post"] == "application/sdp"
    r = await http.post(url, content=b"v=0\r\nnonsense", headers={**AUTH, **SDP})
    _assert_problem(r, 400, "media lines")
    broken = sdp.replace("a=fingerprint:sha-256", "a=fingerprint:sha-256 ZZ")
    _assert_problem(await http.post(url, content=broken, headers={**AUTH, **SDP}), 400, "offer")
    no_video = "\r\n".join(ln for ln in sdp.split("\r\n") if not ln.startswith("m=video"))
    r = await http.post(url, content=no_video, headers={**AUTH, **SDP})
    _assert_problem(r, 400, "video")
    many = sdp + "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\n" * 8
    _assert_problem(await http.post(url, content=many, headers={**AUTH, **SDP}), 400, "media")
    r = await http.post(url, content=b"\xff\xfe" + sdp.encode(), headers={**AUTH, **SDP})
    _assert_problem(r, 400, "UTF-8")
    huge = sdp + "a=x-pad:" + "x" * 70_000 + "\r\n"
    _assert_problem(await http.post(url, content=huge, headers={**AUTH, **SDP}), 413, "larger")
    r = await http.post("/whep/av_nope", content=sdp, headers={**AUTH, **SDP})
    _assert_problem(r, 404, "av_nope")
    assert server.app.state.sessions.sessions == {}


async def test_whep_limits_patch_and_options(
    server: ServerThread, avatar: str, http: httpx.AsyncClient
) -> None:
    first, sdp1 = await recvonly_offer()
    second, sdp2 = await recvonly_offer()
    try:
        r = await http.post(f"/whep/{avatar}", content=sdp1, headers={**AUTH, **SDP})
        assert r.status_code == 201, r.text
        location = r.headers["location"]
        # max_sessions is 1: the second is refused as POST /v1/sessions refuses it
        full = await http.post(f"/whep/{avatar}", content=sdp2, headers={**AUTH, **SDP})
        body = _assert_problem(full, 503, "limit")
        assert body["reason"] == "limit" and int(full.headers["retry-after"]) > 0
        p = await http.patch(
            location,
            content=b"a=ice-ufrag:x",
            headers={**AUTH, "Content-Type": "application/trickle-ice-sdpfrag"},
        )
        _assert_problem(p, 405, "trickle ICE")
        assert set(p.headers["allow"].replace(" ", "").split(",")) == {"DELETE", "OPTIONS"}
        o = await http.options(location)  # no key: a CORS preflight carries none
        assert o.status_code == 204 and "DELETE" in o.headers["allow"]
        o = await http.options(f"/whep/{avatar}")
        assert o.status_code == 204 and o.headers["accept-post"] == "application/sdp"
        assert "POST" in o.headers["allow"]
        assert (await http.delete(location, headers=AUTH)).status_code == 200
    finally:
        await first.close()
        await second.close()


def test_whep_is_in_the_api_docs() -> None:
    text = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    assert "POST /whep/{avatar_id}" in text and "urn:lipstream:audio-ws" in text


async def test_whep_answers_503_while_the_server_starts(tmp_path: Path) -> None:
    """The app before its lifespan has started its parts: a problem document, not a 500."""
    settings = Settings(engine="preview", avatars_dir=tmp_path / "avatars")
    app = create_app(settings, engine=PreviewEngine(), reason="test")
    app.state.started = False
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post("/whep/av_0123456789abcdef", content=b"v=0\r\n", headers=SDP)
        body = _assert_problem(r, 503, "starting")
        assert body["server_status"] == "starting" and r.headers["retry-after"], body
        r = await c.delete("/whep/sessions/se_0123456789abcdef")
        _assert_problem(r, 503, "starting")
