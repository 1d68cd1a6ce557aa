"""End to end: a real uvicorn server on loopback (preview engine) and a real aiortc client.

One recorded session drives every check: the astronaut PNG is registered over REST; a session
is opened; after a second of idle video, 3 s of "speech" (tone bursts) are streamed over the
websocket in 20 ms chunks at real-time pace, then `end`; after the idle loop is back, a
continuous tone is streamed and interrupted with `clear`. The client keeps, per received video
frame, its arrival time, RTP timestamp and pixels (mouth region at full size, the rest at half
size), and the received audio placed by its RTP timestamps.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from avatars.store import AvatarStore
from bench.loopback import LoopbackClient, Received, ServerThread
from engines.preview import PreviewEngine
from server.app import create_app
from server.settings import Settings

SR = 16_000
RX_SR = 48_000  # the client's Opus decoder output rate
TICK = 1920  # received audio samples per video frame (40 ms at 48 kHz)
BURST_S, GAP_S, BURSTS = 0.2, 0.3, 6  # 6 x (200 ms tone + 300 ms silence) = 3 s


def tone(seconds: float, amp: float = 0.3, freq: float = 300.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)


def bursts() -> np.ndarray:
    """Silence first: a burst at an utterance's very start has no earlier frames to open the
    mouth in ahead of the sound, as the 120 ms lookahead does everywhere else."""
    one = np.concatenate([np.zeros(int(GAP_S * SR), np.int16), tone(BURST_S)])
    return np.tile(one, BURSTS)


@dataclass
class Recording:
    box: tuple[int, int, int, int]  # the mouth region the preview engine moves (y0, y1, x0, x1)
    outside: np.ndarray  # (H/2, W/2) bool: far from the mouth region
    ticks: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    mouth: list[np.ndarray] = field(default_factory=list)
    small: list[np.ndarray] = field(default_factory=list)
    received: Received | None = None
    marks: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def sink(self, now: float, pts: int, frame: Any) -> None:
        rgb = frame.to_ndarray(format="rgb24")
        y0, y1, x0, x1 = self.box
        self.times.append(now)
        self.ticks.append(pts)
        self.mouth.append(rgb[y0:y1, x0:x1].astype(np.int16))
        self.small.append(
            cv2.resize(rgb, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA).astype(np.int16)
        )

    # -- derived -------------------------------------------------------------------------
    def tick_index(self) -> np.ndarray:
        pts = np.asarray(self.ticks, dtype=np.int64)
        return np.round((pts - pts[0]) / 3600).astype(int)

    def frames_between(self, t0: float, t1: float) -> np.ndarray:
        t = np.asarray(self.times)
        return np.flatnonzero((t >= t0) & (t < t1))

    def idle_reference(self) -> tuple[np.ndarray, np.ndarray]:
        idx = self.frames_between(self.marks["idle_ref_start"], self.marks["speech_start"])
        return (
            np.median(np.stack([self.mouth[i] for i in idx]), axis=0),
            np.median(np.stack([self.small[i] for i in idx]), axis=0),
        )

    def mouth_change(self) -> np.ndarray:
        """Per frame: mean |frame - idle| over the mouth region."""
        ref, _ = self.idle_reference()
        return np.array([np.abs(m - ref).mean() for m in self.mouth])

    def outside_change(self) -> np.ndarray:
        """Per frame: mean |frame - idle| away from the mouth region."""
        _, ref = self.idle_reference()
        return np.array([np.abs(s - ref).mean(axis=2)[self.outside].mean() for s in self.small])


def _mouth_region(
    face_box: np.ndarray, shape: tuple[int, int]
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    x1, y1, x2, y2 = (int(v) for v in face_box)
    h, w = y2 - y1, x2 - x1
    y0, yb = y1 + (2 * h) // 3, min(shape[0], y2 + h // 6)  # as engines.preview moves it
    x0, xb = max(0, x1 + w // 8), min(shape[1], x2 - w // 8)
    margin = 24  # VP8 macroblocks next to a change are coded differently too
    near = np.zeros(shape, bool)
    near[max(0, y0 - margin) : yb + margin, max(0, x0 - margin) : xb + margin] = True
    outside = cv2.resize(
        (~near).astype(np.uint8), (shape[1] // 2, shape[0] // 2), interpolation=cv2.INTER_NEAREST
    )
    return (y0, yb, x0, xb), outside.astype(bool)


async def _drive(srv: ServerThread, avatar_id: str, rec: Recording) -> None:
    client = LoopbackClient(srv.base_url, video_sink=rec.sink)
    try:
        await client.open(avatar_id)
        await client.connect_audio()
        await client.wait_frames(40)  # 1.6 s of idle video
        rec.marks["idle_ref_start"] = rec.times[15]
        rec.marks["speech_start"] = time.monotonic()
        await client.send_pcm(bursts())
        rec.marks["end_sent"] = await client.send_json({"type": "end"})
        await client.wait_event("playback_finished", after=rec.marks["speech_start"])
        rec.marks["finished"] = time.monotonic()
        await asyncio.sleep(1.0)
        rec.marks["tone_start"] = time.monotonic()
        await client.send_pcm(tone(1.2))
        await asyncio.sleep(0.2)  # let the last sent frames play: the mouth is open now
        rec.marks["clear_sent"] = await client.send_json({"type": "clear"})
        await client.wait_event("playback_finished", after=rec.marks["clear_sent"])
        await asyncio.sleep(0.8)
        r = await client.http.get(f"/v1/sessions/{client.session['session_id']}")
        rec.info = r.json()
    finally:
        rec.received = client.received
        rec.events = list(client.received.events)
        await client.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("e2e")
    settings = Settings(engine="preview", avatars_dir=root / "avatars", max_sessions=4)
    with ServerThread(create_app(settings, engine=PreviewEngine(), reason="e2e test")) as srv:
        yield srv, root / "avatars"


@pytest.fixture(scope="module")
def avatar_id(served: tuple[ServerThread, Path]) -> str:
    from skimage.data import astronaut

    srv, _ = served
    ok, png = cv2.imencode(".png", cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    assert ok
    r = httpx.post(
        srv.base_url + "/v1/avatars",
        files={"file": ("astronaut.png", png.tobytes(), "image/png")},
        data={"name": "astronaut"},
    )
    assert r.status_code == 202, r.text
    aid = r.json()["id"]
    deadline = time.monotonic() + 60
    while True:
        info = httpx.get(f"{srv.base_url}/v1/avatars/{aid}").json()
        if info["status"] in ("ready", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert info["status"] == "ready", info
    return str(aid)


@pytest.fixture(scope="module")
def recording(served: tuple[ServerThread, Path], avatar_id: str) -> Recording:
    srv, avatars_root = served
    avatar = AvatarStore(avatars_root).load(avatar_id)
    box, outside = _mouth_region(avatar.face_boxes[0], avatar.size)
    rec = Recording(box=box, outside=outside)
    asyncio.run(_drive(srv, avatar_id, rec))
    return rec


# -- checks ----------------------------------------------------------------------------
def test_video_arrives_at_25_fps(recording: Recording) -> None:
    t = np.asarray(recording.times)
    span = t[-1] - t[0]
    fps = (len(t) - 1) / span
    assert span > 7.0
    assert 24.0 <= fps <= 26.0, fps
    ticks = recording.tick_index()
    assert np.all(np.diff(ticks) >= 1), "RTP timestamps go back"
    assert ticks[-1] - ticks[0] + 1 - len(ticks) <= 2, "frames missing"
    # and over every 2 s window, not just on average
    for start in np.arange(t[0], t[-1] - 2.0, 1.0):
        n = np.count_nonzero((t >= start) & (t < start + 2.0))
        assert 46 <= n <= 54, (start - t[0], n)


def test_speech_moves_the_mouth_only(recording: Recording) -> None:
    marks = recording.marks
    mouth = recording.mouth_change()
    outside = recording.outside_change()
    idle = np.concatenate(
        [
            recording.frames_between(marks["idle_ref_start"], marks["speech_start"]),
            recording.frames_between(marks["finished"] + 0.2, marks["tone_start"]),
        ]
    )
    speech = recording.frames_between(marks["speech_start"], marks["finished"])
    idle_level = float(np.percentile(mouth[idle], 95))
    moving = speech[mouth[speech] > idle_level + 8.0]
    assert len(moving) >= 30, (len(moving), idle_level, np.round(mouth[speech], 1))
    # away from the mouth, speaking frames differ from the idle picture no more than idle
    # frames do (VP8's quality drifts with its bitrate estimate: that is the noise floor)
    assert outside[moving].mean() < 4.0, outside[moving].mean()
    assert outside[moving].mean() <= outside[idle].mean() + 1.0, (
        outside[moving].mean(),
        outside[idle].mean(),
    )
    assert np.median(mouth[moving]) > 5 * np.median(outside[moving])


def test_idle_loop_resumes_after_end(recording: Recording) -> None:
    mouth = recording.mouth_change()
    marks = recording.marks
    after = recording.frames_between(marks["finished"] + 0.2, marks["tone_start"])
    idle = recording.frames_between(marks["idle_ref_start"], marks["speech_start"])
    speech = recording.frames_between(marks["speech_start"], marks["finished"])
    assert len(after) >= 15
    # closed again: within VP8's drift of the idle picture, far from an open mouth
    assert mouth[after].max() < np.percentile(mouth[idle], 95) + 4.0, np.round(mouth[after], 1)
    assert mouth[after].max() < 0.3 * np.percentile(mouth[speech], 90)
    kinds = [e["type"] for _, e in recording.events]
    assert kinds.count("playback_started") >= 2
    finished = [e for _, e in recording.events if e["type"] == "playback_finished"]
    assert finished[0]["interrupted"] is False
    assert abs(finished[0]["position"] - BURSTS * (BURST_S + GAP_S)) <= 0.08, finished[0]


def test_clear_stops_speech_within_two_frames(recording: Recording) -> None:
    mouth = recording.mouth_change()
    idle = recording.frames_between(
        recording.marks["idle_ref_start"], recording.marks["speech_start"]
    )
    threshold = np.percentile(mouth[idle], 95) + 4.0
    t_clear = recording.marks["clear_sent"]
    before = recording.frames_between(t_clear - 0.3, t_clear)
    assert (mouth[before] > threshold).all(), "the mouth should be open when clear is sent"
    after = recording.frames_between(t_clear, t_clear + 1.0)
    still_speaking = [i for i in after if mouth[i] > threshold]
    # frames still speaking after the clear left the client: those already on their way
    first_idle = next(k for k, i in enumerate(after) if mouth[i] <= threshold)
    assert first_idle <= 2, (first_idle, np.round(mouth[after[:6]], 1))
    assert all(i < after[first_idle] for i in still_speaking), "speech came back after clear"
    finished = [e for t, e in recording.events if t >= t_clear and e["type"] == "playback_finished"]
    assert finished and finished[0]["interrupted"] is True
    assert 0.4 < finished[0]["position"] < 1.4, finished[0]


def test_audio_lines_up_with_frames(recording: Recording) -> None:
    """The mouth the client sees at frame k is the one the audio it hears at frame k makes."""
    assert recording.received is not None
    audio, _ = recording.received.audio_track()
    ticks = recording.tick_index()
    n = ticks[-1] + 1
    assert abs(audio.size / TICK - n) <= 3, (audio.size / TICK, n)  # audio covers the frames
    # what the preview engine's mouth would be for the received audio, frame by frame
    pcm16 = audio[: n * TICK : 3].astype(np.float32) / 32768.0  # 48 kHz -> 16 kHz (band-limited)
    engine = PreviewEngine()
    predicted = np.array([engine.level(f) for f in engine.offline_features(pcm16)])
    seen = np.zeros(n)
    seen[ticks] = recording.mouth_change()
    span = slice(
        ticks[
            recording.frames_between(recording.marks["speech_start"], recording.marks["finished"])[
                0
            ]
        ]
        - 10,
        None,
    )
    p, s = predicted[span], seen[span]
    m = min(len(p), len(s))
    p, s = (p[:m] - p[:m].mean()) / p[:m].std(), (s[:m] - s[:m].mean()) / s[:m].std()
    lags = range(-6, 7)
    corr = [
        float(np.mean(p[max(0, -d) : m - max(0, d)] * s[max(0, d) : m - max(0, -d)])) for d in lags
    ]
    best = list(lags)[int(np.argmax(corr))]
    assert abs(best) <= 1, (best, np.round(corr, 2))
    assert max(corr) > 0.7, np.round(corr, 2)
    # onsets: each burst's mouth opening in the video vs the one its audio predicts
    on_p = np.flatnonzero((p[1:] > 0.0) & (p[:-1] <= 0.0))
    on_s = np.flatnonzero((s[1:] > 0.0) & (s[:-1] <= 0.0))
    assert len(on_p) >= BURSTS
    for k in on_p[:BURSTS]:
        assert np.min(np.abs(on_s - k)) <= 1, (k, on_s)


def test_latency_and_counters_reported(recording: Recording) -> None:
    info = recording.info
    assert info["speech_frames"] >= 75 + 20
    assert info["frames_dropped"] == 0
    assert info["utterances"] == 2 and info["interrupted"] == 1
    lat = info["latency_ms"]
    assert lat["n"] > 100 and lat["p50"] is not None and lat["p99"] is not None
    assert 20.0 < lat["p50"] < 400.0, lat
    first = info["first_frame_ms"]
    assert first["n"] == 2 and 120.0 <= first["p50"] < 600.0, first
    # where it went: frame 0's audio (it reads 120 ms, complete ~100 ms after the first 20 ms
    # chunk at real time; 101.5 ms here), the engine's turnaround, the wait for its tick
    parts = info["first_frame_parts_ms"]
    assert parts["n"] == 2 and parts["audio"] >= 80.0, parts
    assert 0.0 <= parts["made"] < 200.0 and 0.0 <= parts["wait"] <= 200.0, parts
    assert 24.0 <= info["fps"] <= 26.0


def test_a_silent_session_costs_no_engine_work(
    served: tuple[ServerThread, Path], avatar_id: str
) -> None:
    srv, _ = served
    worker = srv.app.state.devices.primary.worker

    async def idle() -> tuple[int, int, int]:
        client = LoopbackClient(srv.base_url)
        try:
            await client.open(avatar_id)
            await client.connect_audio()
            await client.wait_frames(5)
            before = worker.frames
            await client.wait_frames(30)
            return before, worker.frames, len(client.received.video)
        finally:
            await client.close()

    before, after, frames = asyncio.run(idle())
    assert frames >= 30 and after == before


# -- the musetalk engine on a GPU (skipped without CUDA) ----------------------------------
@pytest.mark.gpu
@pytest.mark.allow_leaks(
    "CUDA's device files and torch.compile's worker pipes live as long as the process"
)
def test_musetalk_first_frame_latency_on_gpu(tmp_path: Path) -> None:
    """Full-size random weights, MuseTalk on CUDA behind the GPU scheduler: first audio byte
    in -> first lip-synced frame out to the track, p50 under 250 ms over several utterances.
    LIPSTREAM_TEST_BACKEND picks the scheduler's backend (default compiled; eager torch cannot keep up);
    LIPSTREAM_TEST_AVATARS_DIR, where set, is a store holding a prepared avatar (copied; used
    instead of registering the demo avatar, e.g. where OpenCV has no Haar cascades)."""
    import os
    import shutil

    from engines.backends import create_engine, weights_problem
    from engines.musetalk.weights import make_random
    from server.session.gpu_worker import GpuWorker

    backend = os.environ.get("LIPSTREAM_TEST_BACKEND", "compiled")
    made = os.environ.get("LIPSTREAM_TEST_AVATARS_DIR")
    if made:
        shutil.copytree(made, tmp_path / "avatars")
    # LIPSTREAM_TEST_MODELS_DIR: full-size random weights made there once, reused after
    models = Path(os.environ.get("LIPSTREAM_TEST_MODELS_DIR") or tmp_path / "models")
    if weights_problem(models):
        make_random(models, size="full", seed=0)
    engine, reason = create_engine("musetalk", models, "cuda", "torch")
    settings = Settings(
        engine="musetalk",
        backend=backend,
        avatars_dir=tmp_path / "avatars",
        demo_avatar=not made,
    )

    async def drive(srv: ServerThread, aid: str) -> dict[str, Any]:
        client = LoopbackClient(srv.base_url)
        try:
            await client.open(aid)
            await client.connect_audio()
            await client.wait_frames(25)
            for _ in range(6):  # the first one warms the kernels up
                t = time.monotonic()
                await client.send_pcm(bursts()[: int(1.5 * SR)])
                await client.send_json({"type": "end"})
                await client.wait_event("playback_finished", after=t, within=30)
                await asyncio.sleep(0.3)
            return dict(
                (await client.http.get(f"/v1/sessions/{client.session['session_id']}")).json()
            )
        finally:
            await client.close()

    app = create_app(settings, engine=engine, reason=reason)
    with ServerThread(app, start_timeout=400.0) as srv:  # compiled: warm-up compiles
        assert isinstance(app.state.devices.primary.worker, GpuWorker)
        deadline = time.monotonic() + 300
        while True:
            avatars = httpx.get(f"{srv.base_url}/v1/avatars").json()["avatars"]
            if (avatars and avatars[0]["status"] == "ready") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert avatars[0]["status"] == "ready", avatars
        info = asyncio.run(drive(srv, avatars[0]["id"]))
    print(f"musetalk gpu session (backend {backend}):", info)
    assert info["first_frame_ms"]["n"] == 6
    assert info["first_frame_ms"]["p50"] < 250.0, info["first_frame_ms"]
    assert info["frames_dropped"] == 0
