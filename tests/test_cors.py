"""Browser pages on other origins (`cors_origins`): a real server on loopback answers the CORS
preflight of an allowed origin for /v1 and /whep (the bearer key and the SDP content type
allowed, WHEP's Location and Link readable), refuses other origins, and sends no CORS headers
at all by default."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from bench.loopback import ServerThread, wait_first_avatar_ready
from engines.preview import PreviewEngine
from server.app import create_app
from server.settings import Settings, SettingsError

APP = "https://app.example.com"
KEY = "a-long-test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def server(tmp_path: Path, **kwargs: object) -> ServerThread:
    settings = Settings(
        engine="preview", avatars_dir=tmp_path / "avatars", demo_avatar=True, api_key=KEY, **kwargs
    )
    return ServerThread(create_app(settings, engine=PreviewEngine(), reason="test"))


def preflight(c: httpx.Client, path: str, origin: str, method: str) -> httpx.Response:
    return c.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_an_allowed_origin_may_call_the_api_and_whep(tmp_path: Path) -> None:
    with (
        server(tmp_path, cors_origins=(APP,)) as srv,
        httpx.Client(base_url=srv.base_url, timeout=10) as c,
    ):
        avatar = wait_first_avatar_ready(srv.base_url, headers=AUTH)
        for path, method in (("/v1/avatars", "GET"), (f"/whep/{avatar}", "POST")):
            r = preflight(c, path, APP, method)
            assert r.status_code == 200, (path, r.text)
            assert r.headers["access-control-allow-origin"] == APP
            allowed = r.headers["access-control-allow-headers"].lower()
            assert "authorization" in allowed and "content-type" in allowed
            assert method in r.headers["access-control-allow-methods"]
        r = c.get("/v1/avatars", headers={**AUTH, "Origin": APP})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
        # a refused WHEP offer still tells the page why, and what it may read
        r = c.post(
            f"/whep/{avatar}",
            content=b"not sdp",
            headers={**AUTH, "Origin": APP, "Content-Type": "text/plain"},
        )
        assert r.status_code == 415 and r.headers["access-control-allow-origin"] == APP
        exposed = r.headers["access-control-expose-headers"]
        assert "Location" in exposed and "Link" in exposed
        r = preflight(c, "/v1/avatars", "https://evil.example.net", "GET")
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


def test_no_cors_headers_by_default(tmp_path: Path) -> None:
    with server(tmp_path) as srv, httpx.Client(base_url=srv.base_url, timeout=10) as c:
        wait_first_avatar_ready(srv.base_url, headers=AUTH)
        r = c.get("/v1/avatars", headers={**AUTH, "Origin": APP})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in preflight(c, "/v1/avatars", APP, "GET").headers


def test_origins_are_checked() -> None:
    assert Settings(cors_origins=("*",)).cors_origins == ("*",)
    assert Settings.from_env(
        {"LIPSTREAM_CORS_ORIGINS": f"{APP}, http://localhost:3000"}
    ).cors_origins == (
        APP,
        "http://localhost:3000",
    )
    for bad in ("app.example.com", "https://app.example.com/path", "ftp://x"):
        with pytest.raises(SettingsError, match="cors_origins"):
            Settings(cors_origins=(bad,))
