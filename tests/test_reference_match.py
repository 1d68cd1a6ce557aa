"""Our render vs an independent re-implementation of MuseTalk v1.5's inference (tiny random
weights, fp32 CPU), and streaming render vs offline render.

The reference (`tests/reference_musetalk.py`) is given the same weights, avatar frames, face
boxes, blend masks and crop boxes; it computes its own audio features, latents, UNet/VAE
passes and PIL blend. Frames must match within 2/255 per pixel.

Model work dominates the time (about 0.5 s per frame on a shared 2-core CPU with the tiny
weights), so the frame tests use a 0.8 s clip (20 frames) and the feature test a longer one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import reference_musetalk as ref
import torch

from avatars.avatar import Avatar
from engines.base import Engine, frames_in
from engines.render.audio_io import load_audio, write_wav
from engines.render.offline import RenderOptions, render_all

CLIP_SECONDS = 0.8
TOLERANCE = 2  # /255 per pixel


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def clip_wav(tmp_path_factory: pytest.TempPathFactory, speech_pcm: np.ndarray) -> Path:
    """The first 0.8 s of the speech (20 frames) as a 16 kHz PCM16 wav."""
    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    write_wav(path, speech_pcm[: int(CLIP_SECONDS * 16000)])
    return path


@pytest.fixture(scope="module")
def engine(tiny_models_dir: Path) -> Engine:
    from engines.backends import create_engine

    torch.manual_seed(0)
    eng, _ = create_engine("musetalk", tiny_models_dir, "cpu", "torch")
    return eng


@pytest.fixture(scope="module")
def ref_models(tiny_models_dir: Path) -> ref.RefModels:
    return ref.load_models(tiny_models_dir)


@pytest.fixture(scope="module")
def offline_frames(engine: Engine, astronaut_avatar: Avatar, clip_wav: Path) -> np.ndarray:
    return render_all(
        engine, astronaut_avatar, load_audio(clip_wav), RenderOptions(batch_size=8, progress=False)
    )


@pytest.fixture(scope="module")
def streamed(engine: Engine, astronaut_avatar: Avatar, clip_wav: Path) -> dict[int, np.ndarray]:
    """Streaming render of the clip with the audio arriving in 20 ms, 40 ms and 1 s chunks."""
    audio = load_audio(clip_wav)
    return {
        chunk: render_all(
            engine,
            astronaut_avatar,
            audio,
            RenderOptions(batch_size=8, streaming=True, chunk_samples=chunk, progress=False),
        )
        for chunk in (320, 640, 16000)
    }


def test_every_frame_has_a_face(astronaut_avatar: Avatar) -> None:
    # the reference (like MuseTalk) drops face-less frames' latents; our avatar has none
    assert astronaut_avatar.has_face.all()
    assert astronaut_avatar.latents is not None


def test_audio_features_match_reference(
    engine: Engine, ref_models: ref.RefModels, tmp_path: Path, speech_pcm: np.ndarray
) -> None:
    """7 s of audio: more than one encoder window of the tiny whisper (5 s), so the
    segmentation, trimming and padding of MuseTalk's get_whisper_chunk are all exercised."""
    audio = np.concatenate([speech_pcm, speech_pcm[::-1], speech_pcm[:16000]])
    path = tmp_path / "long.wav"
    write_wav(path, audio)
    ours = torch.as_tensor(np.asarray(engine.offline_features(load_audio(path)))).float()
    theirs = ref.get_whisper_chunk(
        ref_models, *ref.get_audio_feature(ref_models, ref.librosa_like_load(path))
    )
    assert ours.shape == theirs.shape == (frames_in(audio.size), 50, 384)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_latents_match_reference(astronaut_avatar: Avatar, ref_models: ref.RefModels) -> None:
    import cv2

    assert astronaut_avatar.latents is not None
    for k in range(astronaut_avatar.n_frames):
        x1, y1, x2, y2 = (int(v) for v in astronaut_avatar.face_boxes[k])
        bgr = np.ascontiguousarray(astronaut_avatar.frames[k][:, :, ::-1])
        crop = cv2.resize(bgr[y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
        theirs = ref.get_latents_for_unet(ref_models, crop)[0]
        torch.testing.assert_close(
            torch.as_tensor(astronaut_avatar.latents[k]), theirs, rtol=1e-4, atol=1e-4
        )


def test_render_matches_musetalk_reference(
    offline_frames: np.ndarray, ref_models: ref.RefModels, astronaut_avatar: Avatar, clip_wav: Path
) -> None:
    theirs = ref.reference_render(
        ref_models,
        clip_wav,
        np.asarray(astronaut_avatar.frames),
        astronaut_avatar.face_boxes,
        astronaut_avatar.masks,
        astronaut_avatar.crop_boxes,
        batch_size=8,
    )
    assert offline_frames.shape == theirs.shape == (20, *astronaut_avatar.size, 3)
    diff = np.abs(offline_frames.astype(np.int16) - theirs.astype(np.int16))
    print(
        f"\nrender vs MuseTalk reference: max |diff| {diff.max()}/255, "
        f"{int((diff > 0).sum())} of {diff.size} values differ, PSNR {psnr(offline_frames, theirs):.2f} dB"
    )
    assert diff.max() <= TOLERANCE
    # the frames really are lip-synced (not the avatar frames passed through)
    idle = np.asarray(astronaut_avatar.frames)[[astronaut_avatar.loop_frame(i) for i in range(20)]]
    assert (offline_frames != idle).any(axis=(1, 2, 3)).all()


def test_streaming_frames_do_not_depend_on_chunking(streamed: dict[int, np.ndarray]) -> None:
    base = streamed[640]
    assert base.shape[0] == 20
    for chunk, frames in streamed.items():
        np.testing.assert_array_equal(frames, base, err_msg=f"chunks of {chunk} samples")


def test_streaming_vs_offline_features(engine: Engine, clip_wav: Path) -> None:
    """How far streaming features (past audio + 120 ms lookahead only) are from whole-clip
    ones; with random weights the pictures barely react to features, so this is the more
    telling number."""
    from engines.base import FrameJob, ready_horizon

    audio = load_audio(clip_wav)
    n = frames_in(audio.size)
    jobs = [FrameJob(i, min(ready_horizon(i), audio.size), i) for i in range(n)]
    off = torch.as_tensor(np.asarray(engine.offline_features(audio))).float()
    st = torch.as_tensor(np.asarray(engine.stream_features(audio, jobs))).float()
    rel = [float((st[i] - off[i]).norm() / off[i].norm()) for i in range(n)]
    snr = (
        20 * np.log10(float(off.norm() / (st - off).norm()))
        if not torch.equal(st, off)
        else float("inf")
    )
    print(
        f"\nstreaming vs offline features: SNR {snr:.1f} dB, relative error per frame "
        f"mean {np.mean(rel):.4f} max {np.max(rel):.4f}"
    )
    assert st.shape == off.shape and torch.isfinite(st).all()
    assert snr > 0


def test_streaming_vs_offline_psnr(
    streamed: dict[int, np.ndarray], offline_frames: np.ndarray, astronaut_avatar: Avatar
) -> None:
    stream = streamed[640]
    value = psnr(stream, offline_frames)
    per_frame = [psnr(s, o) for s, o in zip(stream, offline_frames, strict=True)]
    # over the face crop only (the rest of the frame is the untouched avatar in both)
    x1, y1, x2, y2 = (int(v) for v in astronaut_avatar.crop_boxes[0])
    y1, x1 = max(y1, 0), max(x1, 0)
    crop_value = psnr(stream[:, y1:y2, x1:x2], offline_frames[:, y1:y2, x1:x2])
    finite = [p for p in per_frame if np.isfinite(p)]
    print(
        f"\nstreaming vs offline: PSNR {value:.2f} dB over whole frames, {crop_value:.2f} dB over "
        f"the face crop; per frame min {min(finite, default=float('inf')):.2f} dB, "
        f"{len(per_frame) - len(finite)}/{len(per_frame)} frames identical"
    )
    assert np.isfinite(crop_value) or np.array_equal(stream, offline_frames)
    assert value > 20.0
