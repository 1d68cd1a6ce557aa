"""The Pipecat video service in a real Pipecat pipeline, against a real lipstream server
(preview engine, uvicorn on loopback) over real WebRTC.

One run drives every check: `[LipstreamVideoService, Sink]` under Pipecat's runner with an
output rate of 24 kHz; TTS audio at 22.05 kHz is queued at real-time pace (so the service has to
resample it to the session's 16 kHz): after a second of idle video, 3 s of tone bursts, then
`TTSStoppedFrame`; once the idle loop is back, a continuous tone interrupted with an
`InterruptionFrame`; then `EndFrame`. The sink keeps, per frame, its arrival time and the
mouth region (video) or RMS (audio).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

pytest.importorskip("pipecat", reason="the pipecat extra is not installed")

from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from avatars.store import AvatarStore
from bench.loopback import ServerThread
from engines.preview import PreviewEngine
from lipstream.integrations.pipecat import LipstreamVideoService
from server.app import create_app
from server.settings import Settings

TTS_SR = 22_050  # what the "TTS" speaks at
OUT_SR = 24_000  # the pipeline's output rate
CHUNK_S = 0.02
BURST_S, GAP_S, BURSTS = 0.2, 0.3, 6
FRAME_S = 0.04


def tone(seconds: float, amp: float = 0.3, freq: float = 300.0) -> np.ndarray:
    t = np.arange(int(seconds * TTS_SR)) / TTS_SR
    return (amp * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)


def bursts() -> np.ndarray:
    one = np.concatenate([np.zeros(int(GAP_S * TTS_SR), np.int16), tone(BURST_S)])
    return np.tile(one, BURSTS)


@dataclass
class Sink(FrameProcessor):
    """Records what reaches the end of the pipeline."""

    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    image_times: list[float] = field(default_factory=list)
    mouth: list[np.ndarray] = field(default_factory=list)
    sizes: set[tuple[int, int]] = field(default_factory=set)
    audio_times: list[float] = field(default_factory=list)
    audio_rms: list[float] = field(default_factory=list)
    audio_rates: set[int] = field(default_factory=set)
    audio_samples: list[int] = field(default_factory=list)
    interrupted_at: float = 0.0

    def __post_init__(self) -> None:
        super().__init__()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        now = time.monotonic()
        if isinstance(frame, OutputImageRawFrame):
            w, h = frame.size
            rgb = np.frombuffer(frame.image, np.uint8).reshape(h, w, 3)
            y0, y1, x0, x1 = self.box
            self.image_times.append(now)
            self.mouth.append(rgb[y0:y1, x0:x1].astype(np.int16))
            self.sizes.add((w, h))
        elif isinstance(frame, OutputAudioRawFrame):
            pcm = np.frombuffer(frame.audio, np.int16).astype(np.float64)
            self.audio_times.append(now)
            self.audio_rms.append(float(np.sqrt(np.mean(pcm**2))) if pcm.size else 0.0)
            self.audio_rates.add(frame.sample_rate)
            self.audio_samples.append(pcm.size)
        elif isinstance(frame, InterruptionFrame):
            self.interrupted_at = now
        await self.push_frame(frame, direction)


@dataclass
class Run:
    sink: Sink
    marks: dict[str, float] = field(default_factory=dict)
    session_id: str | None = None
    sessions_during: int = 0
    sessions_after: int = -1
    status_after: int = 0

    def between(self, t0: float, t1: float) -> np.ndarray:
        t = np.asarray(self.sink.image_times)
        return np.flatnonzero((t >= t0) & (t < t1))

    def mouth_change(self) -> np.ndarray:
        idx = self.between(self.marks["idle_ref_start"], self.marks["speech_start"])
        ref = np.median(np.stack([self.sink.mouth[i] for i in idx]), axis=0)
        return np.array([np.abs(m - ref).mean() for m in self.sink.mouth])


async def _speak(worker: PipelineWorker, pcm: np.ndarray) -> None:
    """Queue `pcm` as TTS audio frames at real-time pace."""
    n = int(CHUNK_S * TTS_SR)
    t0 = time.monotonic()
    for k, i in enumerate(range(0, pcm.size, n)):
        delay = t0 + k * CHUNK_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await worker.queue_frame(
            TTSAudioRawFrame(audio=pcm[i : i + n].tobytes(), sample_rate=TTS_SR, num_channels=1)
        )


async def _wait_images(run: Run, n: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while len(run.sink.image_times) < n:
        assert time.monotonic() < deadline, f"{len(run.sink.image_times)} of {n} frames"
        await asyncio.sleep(0.02)


async def _drive(srv: ServerThread, avatar_id: str, run: Run) -> None:
    service = LipstreamVideoService(base_url=srv.base_url, avatar_id=avatar_id)
    worker = PipelineWorker(
        Pipeline([service, run.sink]),
        params=PipelineParams(audio_out_sample_rate=OUT_SR),
        enable_rtvi=False,
        idle_timeout_secs=None,
    )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    try:
        await _wait_images(run, 40)
        run.sessions_during = len(srv.app.state.sessions.sessions)
        run.session_id = service.session_id
        run.marks["idle_ref_start"] = run.sink.image_times[15]
        run.marks["speech_start"] = time.monotonic()
        await worker.queue_frame(TTSStartedFrame())
        await _speak(worker, bursts())
        await worker.queue_frame(TTSStoppedFrame())
        run.marks["end_sent"] = time.monotonic()
        await asyncio.sleep(1.2)
        run.marks["tone_start"] = time.monotonic()
        await worker.queue_frame(TTSStartedFrame())
        await _speak(worker, tone(0.8))
        await asyncio.sleep(0.2)  # the mouth is open now
        run.marks["interrupt"] = time.monotonic()
        await worker.queue_frame(InterruptionFrame())
        await asyncio.sleep(1.0)
        await worker.queue_frame(EndFrame())
        await asyncio.wait_for(running, 10)
    finally:
        if not running.done():
            await runner.cancel()
            await asyncio.wait_for(running, 10)
    await asyncio.sleep(0.3)  # the server ends the session on its own loop
    run.sessions_after = len(srv.app.state.sessions.sessions)
    async with httpx.AsyncClient(base_url=srv.base_url) as http:
        run.status_after = (await http.get(f"/v1/sessions/{run.session_id}")).status_code


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("pipecat")
    settings = Settings(engine="preview", avatars_dir=root / "avatars", max_sessions=2)
    with ServerThread(create_app(settings, engine=PreviewEngine(), reason="pipecat test")) as srv:
        yield srv, root / "avatars"


def _register(srv: ServerThread) -> str:
    from skimage.data import astronaut

    ok, png = cv2.imencode(".png", cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR))
    assert ok
    r = httpx.post(
        srv.base_url + "/v1/avatars", files={"file": ("astronaut.png", png.tobytes(), "image/png")}
    )
    assert r.status_code == 202, r.text
    aid = str(r.json()["id"])
    deadline = time.monotonic() + 60
    while (info := httpx.get(f"{srv.base_url}/v1/avatars/{aid}").json())["status"] not in (
        "ready",
        "failed",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert info["status"] == "ready", info
    return aid


def _mouth_box(face_box: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (int(v) for v in face_box)
    h, w = y2 - y1, x2 - x1
    y0, yb = y1 + (2 * h) // 3, min(shape[0], y2 + h // 6)  # as engines.preview moves it
    return y0, yb, max(0, x1 + w // 8), min(shape[1], x2 - w // 8)


@pytest.fixture(scope="module")
def avatar_id(served: tuple[ServerThread, Path]) -> str:
    return _register(served[0])


@pytest.fixture(scope="module")
def run(served: tuple[ServerThread, Path], avatar_id: str) -> Run:
    srv, root = served
    avatar = AvatarStore(root).load(avatar_id)
    result = Run(sink=Sink(box=_mouth_box(avatar.face_boxes[0], avatar.size)))
    asyncio.run(_drive(srv, avatar_id, result))
    return result


# -- checks ----------------------------------------------------------------------------
def test_video_reaches_the_sink_at_25_fps(run: Run) -> None:
    t = np.asarray(run.sink.image_times)
    fps = (len(t) - 1) / (t[-1] - t[0])
    assert t[-1] - t[0] > 6.0
    assert 23.0 <= fps <= 27.0, fps
    assert np.diff(t).max() < 0.5, "the video stalled"
    assert run.sink.sizes == {(512, 512)}  # RGB frames of the avatar's size


def test_speech_moves_the_mouth_and_it_stays_still_after(run: Run) -> None:
    mouth, marks = run.mouth_change(), run.marks
    idle = run.between(marks["idle_ref_start"], marks["speech_start"])
    idle_level = float(np.percentile(mouth[idle], 95))
    speech = run.between(marks["speech_start"], marks["end_sent"] + 0.3)
    moving = speech[mouth[speech] > idle_level + 8.0]
    assert len(moving) >= 30, (len(moving), idle_level, np.round(mouth[speech], 1))
    after = run.between(marks["end_sent"] + 0.5, marks["tone_start"])
    assert len(after) >= 15
    assert mouth[after].max() < idle_level + 4.0, np.round(mouth[after], 1)


def test_audio_in_step_with_the_mouth(run: Run) -> None:
    """The audio pushed beside the frames: the pipeline's rate, the utterance's length, and its
    loudness in step with the mouth (cross-correlated over the utterance: the preview engine's
    frame hears 80 ms back and 120 ms ahead, so the mouth's motion is centred on the sound)."""
    sink, marks = run.sink, run.marks
    assert sink.audio_rates == {OUT_SR}
    at, rms = np.asarray(sink.audio_times), np.asarray(sink.audio_rms)
    samples = np.asarray(sink.audio_samples)
    utterance = (at >= marks["speech_start"]) & (at < marks["tone_start"])
    pushed_s = samples[utterance].sum() / OUT_SR
    assert abs(pushed_s - BURSTS * (BURST_S + GAP_S)) < 0.25, pushed_s
    # nothing pushed while the avatar is silent
    assert not np.any((at >= marks["end_sent"] + 0.6) & (at < marks["tone_start"]))
    assert not np.any(at < marks["speech_start"])
    t = np.asarray(sink.image_times)
    frames = run.between(marks["speech_start"], marks["end_sent"] + 0.3)
    loud = np.array([rms[(at >= t[i] - FRAME_S) & (at < t[i] + FRAME_S)].sum() for i in frames])
    mouth = run.mouth_change()[frames]
    a, b = (loud - loud.mean()) / loud.std(), (mouth - mouth.mean()) / mouth.std()
    n, lags = len(a), range(-5, 6)
    corr = [
        float(np.mean(a[max(0, -d) : n - max(0, d)] * b[max(0, d) : n - max(0, -d)])) for d in lags
    ]
    best = list(lags)[int(np.argmax(corr))]
    assert abs(best) <= 2, (best, np.round(corr, 2))
    assert max(corr) > 0.45, np.round(corr, 2)


def test_interruption_returns_to_idle_within_two_frames(run: Run) -> None:
    sink, marks = run.sink, run.marks
    mouth = run.mouth_change()
    idle = run.between(marks["idle_ref_start"], marks["speech_start"])
    threshold = np.percentile(mouth[idle], 95) + 4.0
    t_int = sink.interrupted_at
    assert t_int >= marks["interrupt"]
    before = run.between(t_int - 0.2, t_int)
    assert (mouth[before] > threshold).all(), "the mouth should be open when interrupted"
    after = run.between(t_int, t_int + 1.0)
    first_idle = next(k for k, i in enumerate(after) if mouth[i] <= threshold)
    assert first_idle <= 2, (first_idle, np.round(mouth[after[:6]], 1))
    assert (mouth[after[first_idle:]] <= threshold).all(), "speech came back after the interruption"
    at, rms = np.asarray(sink.audio_times), np.asarray(sink.audio_rms)
    late = np.asarray(sink.audio_samples)[(at > t_int) & (rms > 300.0)].sum() / OUT_SR
    assert late <= 2 * FRAME_S, late  # at most two frames' worth of speech after it


def test_end_frame_closes_the_session(run: Run) -> None:
    assert run.session_id is not None and run.sessions_during == 1
    assert run.sessions_after == 0
    assert run.status_after == 404


async def test_cancel_leaves_nothing_behind(
    served: tuple[ServerThread, Path], avatar_id: str
) -> None:
    """Under the leak check (tasks, peer connections, open files): a pipeline cancelled
    mid-utterance, and one whose avatar does not exist."""
    srv, _ = served
    for aid in (avatar_id, "no-such-avatar"):
        sink = Sink(box=(0, 8, 0, 8))
        service = LipstreamVideoService(base_url=srv.base_url, avatar_id=aid)
        worker = PipelineWorker(
            Pipeline([service, sink]), enable_rtvi=False, idle_timeout_secs=None
        )
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        running = asyncio.create_task(runner.run())
        if aid == avatar_id:
            await _wait_images(Run(sink=sink), 5)
            assert len(srv.app.state.sessions.sessions) == 1
            await _speak(worker, tone(0.3))
        else:
            await asyncio.sleep(1.0)
            assert not sink.image_times and service.session_id is None
        await runner.cancel()
        await asyncio.wait_for(running, 10)
        assert service.session_id is None
        for _ in range(100):  # the server ends it on its own loop
            if not srv.app.state.sessions.sessions:
                break
            await asyncio.sleep(0.05)
        assert not srv.app.state.sessions.sessions


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="base_url"):
        LipstreamVideoService(base_url="localhost:8000", avatar_id="a")
    with pytest.raises(ValueError, match="avatar_id"):
        LipstreamVideoService(base_url="http://localhost:8000", avatar_id="")
