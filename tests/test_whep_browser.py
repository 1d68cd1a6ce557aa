"""WHEP with a WebRTC stack that is not aiortc: headless Chromium runs the small WHEP client page
the server ships (`/whep.html`) against a real uvicorn server (preview engine, an API key set).

The page POSTs its offer as application/sdp with the bearer key, applies the answer and plays
the video; we check that the video element has a size and that its frames advance (counted by
requestVideoFrameCallback, and currentTime), that the server holds the session named by the
page's Location, and that Stop (DELETE on it) ends that session.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_server_rest import astronaut_png, register, wait_status

from bench.loopback import ServerThread
from engines.preview import PreviewEngine
from server.app import create_app
from server.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
KEY = "whep-browser-key"
AUTH = {"Authorization": f"Bearer {KEY}"}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
    ),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")

COUNT_FRAMES = """() => {
    const v = document.getElementById('video');
    window.framesSeen = 0;
    const tick = () => { window.framesSeen += 1; v.requestVideoFrameCallback(tick); };
    v.requestVideoFrameCallback(tick);
}"""
SNAPSHOT = """() => {
    const v = document.getElementById('video');
    return {frames: window.framesSeen, t: v.currentTime, w: v.videoWidth, h: v.videoHeight,
            paused: v.paused};
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    settings = Settings(
        engine="preview",
        avatars_dir=tmp_path_factory.mktemp("whep-browser") / "avatars",
        api_key=KEY,
        connect_timeout_s=60.0,
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


def test_chromium_whep_client_plays_the_avatar(
    server: ServerThread, avatar: str, tmp_path: Path
) -> None:
    problems: list[str] = []
    console: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"],
        )
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.goto(f"{server.base_url}/whep.html?avatar={avatar}&key={KEY}")
            try:
                page.wait_for_function(
                    "() => window.whep.state !== 'starting'"
                    " && document.getElementById('video').videoWidth > 0",
                    timeout=30_000,
                )
            except sync_api.TimeoutError:
                pytest.fail(f"no video: {page.evaluate('() => window.whep')}\n{console[-20:]}")
            whep = page.evaluate("() => window.whep")
            assert whep["state"] == "playing" and whep["error"] is None, whep
            assert 'rel="urn:lipstream:audio-ws"' in whep["links"], whep
            session_id = whep["resource"].rsplit("/", 1)[1]
            assert session_id in server.app.state.sessions.sessions

            page.evaluate(COUNT_FRAMES)
            first = page.evaluate(SNAPSHOT)
            time.sleep(2.0)
            later = page.evaluate(SNAPSHOT)
            assert later["w"] > 0 and later["h"] > 0 and not later["paused"], later
            assert later["frames"] >= 25, (first, later)  # 25 fps sent: >= 12.5 fps shown
            assert later["t"] > first["t"] + 1.0, (first, later)

            page.click("#stop")
            page.wait_for_function("() => window.whep.state === 'stopped'", timeout=5_000)
            deadline = time.monotonic() + 5
            while session_id in server.app.state.sessions.sessions:
                assert time.monotonic() < deadline, "Stop (DELETE) did not end the session"
                time.sleep(0.05)
            gone = httpx.get(f"{server.base_url}/v1/sessions/{session_id}", headers=AUTH)
            assert gone.status_code == 404
        finally:
            browser.close()
    assert not problems, problems
