"""The preview engine: loudness features over MuseTalk's window, mouth movement, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from avatars.avatar import Avatar
from engines.base import SAMPLES_PER_FRAME, FrameJob, frames_in, ready_horizon
from engines.preview import WINDOW, PreviewEngine, window_rms
from engines.stream import SpeechStream


def burst_audio(n_samples: int, start: int, length: int = 64) -> np.ndarray:
    x = np.zeros(n_samples, np.float32)
    x[start : start + length] = 0.5
    return x


def test_window_is_musetalks_frame_window() -> None:
    """Frame i hears samples [640 i - 1280, 640 i + 1920): a burst at sample s is heard
    exactly by the frames whose window contains it."""
    engine = PreviewEngine()
    s = 640 * 10 + 100
    feats = engine.offline_features(burst_audio(640 * 20, s, length=1))
    heard = {i for i in range(len(feats)) if feats[i] > 0}
    expected = {i for i in range(20) if 640 * i - 1280 <= s < 640 * i + 1920}
    assert heard == expected == {8, 9, 10, 11, 12}
    assert feats[10] == pytest.approx(0.5 / np.sqrt(WINDOW))


def test_offline_features_count_and_edges() -> None:
    engine = PreviewEngine()
    audio = np.full(640 * 7 + 300, 0.1, np.float32)
    feats = engine.offline_features(audio)
    assert len(feats) == frames_in(audio.size) == 7
    # frame 0's window starts 1280 samples before the audio: those count as zeros
    assert feats[0] == pytest.approx(0.1 * np.sqrt(1920 / WINDOW), rel=1e-5)
    assert feats[3] == pytest.approx(0.1, rel=1e-5)


def test_stream_features_read_only_up_to_horizon(speech_pcm: np.ndarray) -> None:
    engine = PreviewEngine()
    offline = engine.offline_features(speech_pcm)
    jobs = [FrameJob(i, ready_horizon(i), i) for i in range(len(offline) - 3)]
    streamed = engine.stream_features(speech_pcm, jobs)
    np.testing.assert_allclose(streamed, offline[: len(jobs)], rtol=1e-5)
    # audio past the horizon is never read
    noisy = speech_pcm.copy()
    noisy[ready_horizon(5) :] = 1.0
    assert engine.stream_features(noisy, [jobs[5]])[0] == pytest.approx(streamed[5], rel=1e-6)
    assert window_rms(speech_pcm, 5, horizon=640 * 5) < window_rms(speech_pcm, 5)


@pytest.mark.parametrize("chunk", [320, 640, 16000])
def test_stream_features_do_not_depend_on_chunking(speech_pcm: np.ndarray, chunk: int) -> None:
    engine = PreviewEngine()
    stream = SpeechStream()
    feats: list[float] = []
    for start in range(0, speech_pcm.size, chunk):
        stream.push(speech_pcm[start : start + chunk])
        feats.extend(engine.stream_features(stream.audio, stream.take()))
    stream.end()
    feats.extend(engine.stream_features(stream.audio, stream.take()))
    reference = PreviewEngine().stream_features(
        speech_pcm,
        [
            FrameJob(i, min(ready_horizon(i), speech_pcm.size), i)
            for i in range(frames_in(speech_pcm.size))
        ],
    )
    np.testing.assert_array_equal(np.array(feats, np.float32), reference)


def test_silence_leaves_frames_unchanged(preview_avatar: Avatar) -> None:
    engine = PreviewEngine()
    engine.load_avatar(preview_avatar)
    positions = list(range(preview_avatar.loop_length))
    out = engine.render(preview_avatar.id, positions, np.zeros(len(positions), np.float32))
    for k, pos in enumerate(positions):
        np.testing.assert_array_equal(out[k], preview_avatar.frames[preview_avatar.loop_frame(pos)])


def test_loud_frame_moves_only_the_mouth_region(preview_avatar: Avatar) -> None:
    engine = PreviewEngine()
    engine.load_avatar(preview_avatar)
    quiet, loud = engine.render(preview_avatar.id, [0, 0], np.array([0.005, 0.2], np.float32))
    frame = preview_avatar.frames[0]
    x1, y1, x2, y2 = (int(v) for v in preview_avatar.face_boxes[0])
    h = y2 - y1
    diff = np.abs(loud.astype(int) - frame.astype(int)).sum(axis=2)
    ys, xs = np.nonzero(diff)
    assert len(ys) > 200, "a loud frame must open the mouth visibly"
    assert ys.min() >= y1 + (2 * h) // 3 and ys.max() < y2 + h // 6 + 1
    assert xs.min() >= x1 and xs.max() < x2
    # a little loudness moves the mouth less than a lot
    quiet_diff = np.abs(quiet.astype(int) - frame.astype(int)).sum()
    assert quiet_diff < diff.sum()
    assert engine.level(0.2) > engine.level(0.02) > engine.level(0.005) == 0.0


def test_frames_without_face_are_unchanged(astronaut_frames: np.ndarray) -> None:
    n = len(astronaut_frames)
    avatar = Avatar(
        id="noface",
        name="noface",
        fps=25.0,
        frames=astronaut_frames,
        face_boxes=np.full((n, 4), -1, np.int32),
        crop_boxes=np.full((n, 4), -1, np.int32),
        masks=[np.zeros((0, 0), np.uint8)] * n,
    )
    engine = PreviewEngine()
    engine.load_avatar(avatar)
    out = engine.render("noface", [0, 1, 2], np.full(3, 0.3, np.float32))
    np.testing.assert_array_equal(out, astronaut_frames[[0, 1, 2]])


def test_loop_positions_follow_the_ping_pong_loop(preview_avatar: Avatar) -> None:
    engine = PreviewEngine()
    engine.load_avatar(preview_avatar)
    n = preview_avatar.n_frames
    positions = list(range(2 * n + 2))
    out = engine.render(preview_avatar.id, positions, np.zeros(len(positions), np.float32))
    order = [preview_avatar.loop_frame(p) for p in positions]
    assert order[: 2 * n] == list(range(n)) + list(range(n - 1, -1, -1))
    np.testing.assert_array_equal(out, preview_avatar.frames[order])


def test_unknown_avatar_is_an_engine_error() -> None:
    from engines.base import EngineError

    with pytest.raises(EngineError, match="not loaded"):
        PreviewEngine().render("nobody", [0], np.zeros(1, np.float32))


def test_keeps_up_with_several_sessions_on_one_core(
    preview_avatar: Avatar, speech_pcm: np.ndarray
) -> None:
    """512x512 frames: at least 100 fps on one core, i.e. 4 sessions at 25 fps."""
    engine = PreviewEngine()
    engine.load_avatar(preview_avatar)
    feats = engine.offline_features(speech_pcm)
    assert (feats > 0.01).mean() > 0.3, "the speech must be loud enough to move the mouth"
    engine.render(preview_avatar.id, [0, 1, 2, 3, 4, 5], feats[:6])  # warm the caches
    t0 = time.perf_counter()
    out = engine.render(preview_avatar.id, list(range(len(feats))), feats)
    fps = len(feats) / (time.perf_counter() - t0)
    print(f"preview engine: {fps:.0f} fps at {out.shape[2]}x{out.shape[1]}")
    assert fps > 100
    assert (
        len(out) == len(feats) == frames_in(speech_pcm.size) == speech_pcm.size // SAMPLES_PER_FRAME
    )
