"""Authentication: API keys for REST (several may be set), refused before any body read or
engine work, session tokens for websockets, no key or token in any log line, and no
unauthenticated server on a non-loopback address."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from bench.loopback import LoopbackClient, ServerThread
from engines.preview import PreviewEngine
from server.api import avatars as avatars_api
from server.api import sessions as sessions_api
from server.app import create_app
from server.auth import key_matches, redact
from server.media import link as media_link
from server.settings import Settings, SettingsError

KEY1 = "first-key-0123456789abcdef"
KEY2 = "second-key-fedcba9876543210"
ROOT = Path(__file__).resolve().parent.parent
LIPSTREAM = [sys.executable, "-c", "from lipstream.cli import main; main()"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    settings = Settings(
        engine="preview",
        avatars_dir=tmp_path_factory.mktemp("auth") / "avatars",
        demo_avatar=True,
        api_key=f"{KEY1}, {KEY2}",
    )
    srv = ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")).start()
    try:
        yield srv
    finally:
        srv.stop()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def ready_avatar(srv: ServerThread) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listed = httpx.get(f"{srv.base_url}/v1/avatars", headers=bearer(KEY1)).json()
        if listed["avatars"] and listed["avatars"][0]["status"] == "ready":
            return str(listed["avatars"][0]["id"])
        time.sleep(0.05)
    raise TimeoutError("the demo avatar did not become ready")


def test_every_api_route_wants_a_key_and_either_key_works(server: ServerThread) -> None:
    base = server.base_url
    routes = [
        ("GET", "/v1/avatars"),
        ("POST", "/v1/avatars"),
        ("GET", "/v1/avatars/av_0123456789abcdef"),
        ("DELETE", "/v1/avatars/av_0123456789abcdef"),
        ("POST", "/v1/sessions"),
        ("GET", "/v1/sessions/se_0123456789abcdef"),
        ("DELETE", "/v1/sessions/se_0123456789abcdef"),
        ("GET", "/metrics"),
    ]
    refusals = [
        {},
        bearer("wrong-key-0123456789abcdef"),
        bearer(KEY1[:-1]),
        bearer(KEY1 + "x"),
        bearer(f"{KEY1},{KEY2}"),
        {"authorization": KEY1},
        {"authorization": f"Basic {KEY1}"},
        {"x-api-key": KEY1},
    ]
    for method, path in routes:
        for headers in refusals:
            r = httpx.request(method, base + path, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            assert KEY1 not in r.text and KEY2 not in r.text
        for key in (KEY1, KEY2):
            r = httpx.request(method, base + path, headers=bearer(key))
            assert r.status_code != 401, (method, path)
    r = httpx.get(f"{base}/v1/avatars", params={"token": KEY1, "api_key": KEY1})
    assert r.status_code == 401  # keys are taken from the header only
    for path in ("/healthz", "/readyz", "/", "/app.js"):  # probes and the demo page stay open
        assert httpx.get(base + path).status_code == 200, path


def test_refused_before_any_body_read_or_engine_work(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def spy(name: str, original):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(name)
            return original(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(avatars_api, "receive_upload", spy("upload", avatars_api.receive_upload))
    monkeypatch.setattr(sessions_api, "_read_json", spy("json", sessions_api._read_json))
    monkeypatch.setattr(media_link, "make_peer", spy("peer", media_link.make_peer))
    sent = [0]

    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(80):  # 5 MiB
            sent[0] += 1
            yield b"\x89PNG" * 16384
        yield b"\r\n--b--\r\n"

    t0 = time.monotonic()
    try:
        r = httpx.post(
            f"{server.base_url}/v1/avatars",
            content=body(),
            headers={"content-type": "multipart/form-data; boundary=b", **bearer("nope-nope-nope")},
        )
        assert r.status_code == 401
    except httpx.HTTPError:
        pass  # the server may answer 401 and close before the client finished sending
    r = httpx.post(
        f"{server.base_url}/v1/sessions",
        json={"avatar_id": "av_0123456789abcdef", "sdp": "v=0\r\n" * 100, "type": "offer"},
    )
    assert r.status_code == 401
    assert calls == [], calls
    assert time.monotonic() - t0 < 10
    uploads = server.app.state.avatars.uploads_dir
    assert not uploads.exists() or not any(uploads.iterdir())
    assert server.app.state.sessions.sessions == {}
    metrics = httpx.get(f"{server.base_url}/metrics", headers=bearer(KEY2)).text
    assert "lipstream_auth_refused_total" in metrics


async def test_a_session_token_opens_only_its_own_socket(server: ServerThread) -> None:
    aid = ready_avatar(server)
    a = LoopbackClient(server.base_url, headers=bearer(KEY1))
    b = LoopbackClient(server.base_url, headers=bearer(KEY2))
    try:
        sa, sb = await a.open(aid), await b.open(aid)
        assert sa["token"] != sb["token"]
        wrong = [
            f"{server.ws_url}{sa['audio_ws']}?token={sb['token']}",
            f"{server.ws_url}{sa['audio_ws']}?token={sa['token'][:-1]}",
            f"{server.ws_url}{sa['audio_ws']}?token={KEY1}",
            f"{server.ws_url}{sa['audio_ws']}",
        ]
        for url in wrong:
            with pytest.raises(InvalidStatus) as err:
                await websockets.connect(url)
            assert err.value.response.status_code == 403  # closed (1008) before accept
        async with websockets.connect(f"{server.ws_url}{sa['audio_ws']}?token={sa['token']}"):
            pass
    finally:
        await a.close()
        await b.close()


async def test_keys_and_tokens_never_reach_the_logs(server: ServerThread) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s %(args)s"))
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # attached after startup: redaction must not rely on the handler
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    server.server.config.access_log = True
    try:
        aid = ready_avatar(server)
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            await http.get(f"/v1/avatars?token={KEY1}", headers=bearer(KEY1))
            await http.get("/v1/avatars", headers=bearer(KEY2 + "-wrong"))
        client = LoopbackClient(server.base_url, headers=bearer(KEY2))
        try:
            session = await client.open(aid)
            await client.connect_audio()
            await client.send_json({"type": "end"})
            bad = f"{server.ws_url}{session['audio_ws']}?token=not-{session['token']}"
            with pytest.raises(InvalidStatus):
                await websockets.connect(bad)
        finally:
            await client.close()
        logging.getLogger("uvicorn.error").info("echo token=%s", session["token"])
        logging.getLogger("server.test").warning("Authorization: Bearer %s", KEY1)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
    text = stream.getvalue()
    assert "/audio?token=<redacted>" in text, text[-2000:]  # the socket's line was logged
    assert "Bearer <redacted>" in text
    for secret in (KEY1, KEY2, session["token"]):
        assert secret not in text


def test_redact_and_key_matching() -> None:
    assert redact("GET /x?a=1&token=abc&b=2") == "GET /x?a=1&token=<redacted>&b=2"
    assert redact('"WebSocket /v1/s/audio?token=Zz-9_" 403') == (
        '"WebSocket /v1/s/audio?token=<redacted>" 403'
    )
    assert redact("authorization: Bearer xyz") == "authorization: Bearer <redacted>"
    assert redact(f"leaked {KEY1} here", (KEY1,)) == "leaked <redacted> here"
    assert key_matches(KEY2, (KEY1, KEY2)) and not key_matches("", (KEY1, KEY2))
    assert not key_matches(KEY1, ())


def test_no_unauthenticated_server_on_a_public_address(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10", "example.com"):
        with pytest.raises(SettingsError, match="--insecure"):
            Settings(host=host)
        assert Settings(host=host, insecure=True).host == host
        assert Settings(host=host, api_key=KEY1).api_keys == (KEY1,)
    for host in ("127.0.0.1", "127.5.5.5", "::1", "[::1]", "localhost"):
        assert Settings(host=host).host == host
    with pytest.raises(SettingsError, match="8 characters"):
        Settings(api_key=f"{KEY1},short")
    assert KEY1 not in repr(Settings(api_key=KEY1))
    assert KEY1 not in str(Settings(api_key=KEY1).public())
    env = {
        **os.environ,
        "LIPSTREAM_AVATARS_DIR": str(tmp_path),
        "LIPSTREAM_API_KEY": "",
        "LIPSTREAM_HOST": "",
    }
    t0 = time.monotonic()
    done = subprocess.run(
        [*LIPSTREAM, "serve", "--engine", "preview", "--host", "0.0.0.0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    said = " ".join(re.sub("[│╭╮╰╯─]", " ", done.stderr).split())  # unwrap typer's panel
    assert "without an API key" in said and "--insecure" in said, said
    assert time.monotonic() - t0 < 60
