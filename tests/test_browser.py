"""The demo page in real headless Chromium against a real server (preview engine).

Chromium's fake microphone plays a wav made here (tone bursts at 48 kHz); the page connects
over WebRTC, turns the microphone on (AudioWorklet -> PCM16 16 kHz -> websocket), and we
check that the video element plays and the overlay reports decoded frames and a latency.
"""

from __future__ import annotations

import io
import math
import socket
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
    ),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_tone_bursts(path: Path, seconds: float = 3.0, rate: int = 48000) -> None:
    """Syllable-like bursts: 200 ms of a 220 Hz + 440 Hz tone, 200 ms of silence."""
    t = np.arange(int(seconds * rate)) / rate
    gate = (np.sin(2 * np.pi * 2.5 * t) > 0) * np.abs(np.sin(2 * np.pi * 5 * t))
    tone = (np.sin(2 * np.pi * 220 * t) + 0.5 * np.sin(2 * np.pi * 440 * t)) / 1.5
    pcm = (0.5 * gate * tone * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _astronaut_png() -> bytes:
    from PIL import Image
    from skimage.data import astronaut

    buf = io.BytesIO()
    Image.fromarray(astronaut()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def server_url(tmp_path: Path) -> Iterator[str]:
    """A real uvicorn server on a free loopback port, preview engine, empty avatar store."""
    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    port = _free_port()
    settings = Settings(
        engine="preview",
        host="127.0.0.1",
        port=port,
        avatars_dir=tmp_path / "avatars",
        models_dir=tmp_path / "models",
        device="cpu",
    )
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, ws="websockets", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture
def avatar_id(server_url: str) -> str:
    """The astronaut, registered over REST and prepared."""
    files = {"file": ("astronaut.png", _astronaut_png(), "image/png")}
    res = httpx.post(f"{server_url}/v1/avatars", files=files, data={"name": "astronaut"})
    assert res.status_code == 202, res.text
    avatar = res.json()["id"]
    deadline = time.monotonic() + 30
    while True:
        info = httpx.get(f"{server_url}/v1/avatars/{avatar}").json()
        if info["status"] == "ready":
            return str(avatar)
        assert info["status"] not in ("failed", "error"), info
        assert time.monotonic() < deadline, f"avatar not ready in 30 s: {info}"
        time.sleep(0.2)


def _chromium_args(fake_mic: Path) -> list[str]:
    return [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_mic}",
    ]


def _snapshot(page: Any) -> dict[str, Any]:
    """lipstreamStats, the overlay's text and the video element's state, read at one instant."""
    return dict(
        page.evaluate(
            """() => {
                const v = document.getElementById('video');
                return {
                    stats: {...window.lipstreamStats},
                    overlay: document.getElementById('overlay').innerText,
                    video: {t: v.currentTime, w: v.videoWidth, h: v.videoHeight, paused: v.paused},
                };
            }"""
        )
    )


def _has_event(kind: str, where: str = "true") -> str:
    return f"window.lipstreamStats.events.some((e) => e.type === '{kind}' && ({where}))"


def _count_events(kind: str, n: int) -> str:
    return f"window.lipstreamStats.events.filter((e) => e.type === '{kind}').length >= {n}"


def _wait(page: Any, condition: str, timeout_ms: int, console: list[str]) -> None:
    """page.wait_for_function, failing with what the page showed (status line, events, console)."""
    try:
        page.wait_for_function(f"() => {condition}", timeout=timeout_ms)
    except sync_api.TimeoutError:
        status = page.inner_text("#status")
        events = page.inner_text("#events")
        stats = page.evaluate("() => JSON.stringify(window.lipstreamStats)")
        pytest.fail(
            f"timed out waiting for {condition}\nstatus: {status}\nstats: {stats}\n"
            f"events:\n{events}\nconsole:\n" + "\n".join(console[-30:])
        )


def test_demo_page_connects_streams_and_reports(
    server_url: str, avatar_id: str, tmp_path: Path
) -> None:
    fake_mic = tmp_path / "mic.wav"
    _write_tone_bursts(fake_mic)
    problems: list[str] = []
    console: list[str] = []

    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=_chromium_args(fake_mic),
            viewport={"width": 1200, "height": 800},
        )
        try:
            page = context.new_page()
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.goto(server_url + "/")

            # The avatar registered over REST is listed and picked; Connect opens a session.
            _wait(page, "!document.getElementById('connect').disabled", 10_000, console)
            assert "astronaut" in page.inner_text("#avatar-list")
            # The header says which engine runs and why (preview is not taken for broken lip-sync).
            _wait(
                page,
                "document.getElementById('engine').dataset.engine === 'preview'",
                10_000,
                console,
            )
            assert "preview engine asked for" in page.inner_text("#engine")
            page.click("#connect")
            _wait(page, "window.lipstreamStats.connected", 20_000, console)
            page.click("#unmute")  # a user gesture: the received audio plays (and is measured)
            assert page.evaluate("() => document.getElementById('video').muted") is False

            page.click("#mic")
            _wait(page, "document.getElementById('mic').ariaPressed === 'true'", 10_000, console)

            # Frames decode and the server measures latency from the microphone's audio.
            _wait(
                page,
                "window.lipstreamStats.framesDecoded > 50"
                " && Number.isFinite(window.lipstreamStats.latencyMs)",
                30_000,
                console,
            )
            first = _snapshot(page)
            time.sleep(1.0)
            snap = _snapshot(page)
            stats, video = snap["stats"], snap["video"]
            page.screenshot(path=str(tmp_path / "demo.png"))

            assert not video["paused"], video
            assert video["t"] > first["video"]["t"] + 0.5, (first, snap)
            assert video["w"] > 0 and video["h"] > 0, video
            assert stats["framesDecoded"] > first["stats"]["framesDecoded"] > 50, (first, snap)
            assert 15 < stats["fps"] < 35, stats
            assert 0 < stats["latencyMs"] < 5000, stats
            assert f"frames {stats['framesDecoded']}" in snap["overlay"], snap
            assert f"latency p50 {math.floor(stats['latencyMs'] + 0.5)}" in snap["overlay"], snap
            assert [e["type"] for e in stats["events"]] == ["playback_started"], stats
            # The driving audio comes back over WebRTC, without gaps the jitter buffer fills in.
            assert stats["audioEnergy"] > 0, stats
            assert stats["audioConcealed"] < 0.25, stats
            session_id = stats["sessionId"]
            served = httpx.get(f"{server_url}/v1/sessions/{session_id}").json()
            assert served["audio_bytes"] > 16000 and served["speech_frames"] > 0, served

            # Microphone off ends the utterance; the server finishes playing it.
            page.click("#mic")
            _wait(page, _has_event("playback_finished", "!e.interrupted"), 10_000, console)

            # A chosen file is spoken (decoded and resampled in the page), then interrupted.
            speech = tmp_path / "speech.wav"
            _write_tone_bursts(speech, seconds=4.0, rate=44100)
            page.set_input_files("#speak-file", str(speech))
            page.click("#speak")
            _wait(page, _count_events("playback_started", 2), 10_000, console)
            time.sleep(0.5)
            page.click("#interrupt")
            _wait(page, _has_event("playback_finished", "e.interrupted"), 5_000, console)
            finished = page.evaluate("() => window.lipstreamStats.events.at(-1)")
            assert finished["type"] == "playback_finished" and finished["position"] < 3.5, finished
            status_class = page.get_attribute("#status", "class") or ""
            assert "error" not in status_class, page.inner_text("#status")

            # Disconnect ends the session on the server too.
            page.click("#disconnect")
            _wait(page, "!window.lipstreamStats.connected", 5_000, console)
            deadline = time.monotonic() + 5
            while httpx.get(f"{server_url}/v1/sessions/{session_id}").status_code != 404:
                assert time.monotonic() < deadline, "the session outlived Disconnect"
                time.sleep(0.1)
        finally:
            context.close()

    assert not problems, problems
