"""Shared test fixtures: tiny random MuseTalk weights, synthetic speech, an astronaut avatar.

Imports of project modules happen inside the fixtures, so a module that is missing or broken
fails only the tests that use the fixture needing it.

- `tiny_models_dir`: random weights of the tiny size, MuseTalk's layout (session, seed 0).
- `speech_pcm`: 3 s of float32 mono 16 kHz speech: espeak-ng where installed, else a generated
  vowel-like signal with a syllable envelope; quantised to PCM16 so `speech_wav` holds exactly
  these samples.
- `speech_wav`: that speech as a 16 kHz PCM16 wav file.
- `astronaut_frames`: a short "video" (3 frames, 512 x 512) of `skimage.data.astronaut()`, the
  later frames shifted by a few pixels so the idle loop's order is visible.
- `astronaut_avatar`: those frames prepared with the tiny VAE's latents (session).
- `preview_avatar`: the same without latents (what the preview engine needs).
- `avatars_dir`: an empty folder for an `AvatarStore`.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from leakcheck import leakcheck, pytest_configure  # noqa: F401  (autouse leak check)

SPEECH_SECONDS = 3.0
SAMPLE_RATE = 16_000
ASTRONAUT_ID = "av_00000000000a5701"  # ids in the store's pattern, so the avatars can be saved
PREVIEW_ID = "av_00000000000a5702"
SPEECH_TEXT = "Hello there. This is a short test of the lip sync renderer, one two three."


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests where torch sees no CUDA GPU."""
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except ImportError:
        has_cuda = False
    if has_cuda:
        # CUDA's context (its device files, eventfds and pipes: the process's for good) made
        # now, before the first test's leak-check baseline
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- audio ------------------------------------------------------------------------------
def generated_speech(seconds: float = SPEECH_SECONDS, seed: int = 0) -> np.ndarray:
    """A vowel-like signal: a glottal pulse train through formant resonances, gated by
    syllables (about 4 a second) with short pauses, float32 16 kHz."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = np.cumsum(f0 / SAMPLE_RATE)
    pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
    voiced = np.zeros(n)
    for f, bw in ((700, 110), (1200, 120), (2600, 160)):
        r = np.exp(-np.pi * bw / SAMPLE_RATE)
        a = [1, -2 * r * np.cos(2 * np.pi * f / SAMPLE_RATE), r * r]
        voiced += lfilter([1 - r], a, pulses)
    envelope = np.zeros(n)
    pos = int(0.15 * SAMPLE_RATE)
    while pos < n:
        length = int(rng.uniform(0.12, 0.25) * SAMPLE_RATE)
        stop = min(n, pos + length)
        envelope[pos:stop] = np.sin(np.linspace(0, np.pi, stop - pos)) ** 2
        pos = stop + int(rng.uniform(0.03, 0.2) * SAMPLE_RATE)
    x = voiced * envelope + 0.002 * rng.standard_normal(n)
    return (0.7 * x / np.max(np.abs(x))).astype(np.float32)


def espeak_speech(tmp: Path, seconds: float = SPEECH_SECONDS) -> np.ndarray | None:
    """espeak-ng's speech of SPEECH_TEXT at 16 kHz, cut or zero-padded to `seconds`."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    out = tmp / "espeak.wav"
    try:
        subprocess.run(
            [exe, "-w", str(out), SPEECH_TEXT], check=True, capture_output=True, timeout=60
        )
    except (subprocess.SubprocessError, OSError):
        return None
    from engines.render.audio_io import load_audio

    x = load_audio(out)
    n = int(seconds * SAMPLE_RATE)
    x = np.pad(x, (0, max(0, n - x.size)))[:n]
    return (0.7 * x / max(float(np.max(np.abs(x))), 1e-6)).astype(np.float32)


def quantise_pcm16(x: np.ndarray) -> np.ndarray:
    return (np.round(np.clip(x, -1.0, 32767 / 32768) * 32768.0) / 32768.0).astype(np.float32)


@pytest.fixture(scope="session")
def speech_pcm(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    x = espeak_speech(tmp_path_factory.mktemp("espeak"))
    if x is None:
        x = generated_speech()
    return quantise_pcm16(x)


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory, speech_pcm: np.ndarray) -> Path:
    from engines.render.audio_io import write_wav

    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    write_wav(path, speech_pcm)
    return path


# -- models -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engines.musetalk.weights import make_random

    root = tmp_path_factory.mktemp("models")
    make_random(root, size="tiny", seed=0)
    return root


# -- avatars ----------------------------------------------------------------------------
def shifted(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`img` moved by (dx, dy) pixels, edges repeated."""
    h, w = img.shape[:2]
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return np.ascontiguousarray(img[ys][:, xs])


@pytest.fixture(scope="session")
def astronaut_frames() -> np.ndarray:
    from skimage.data import astronaut

    img = np.ascontiguousarray(astronaut()[..., :3], dtype=np.uint8)
    return np.stack([img, shifted(img, 3, 1), shifted(img, 6, 2)])


def tiny_encoder(models_dir: Path) -> Callable[[np.ndarray], np.ndarray]:
    """(n, 256, 256, 3) uint8 RGB crops -> (n, 8, 32, 32) latents with the tiny VAE (fp32 CPU)."""

    from engines.musetalk.vae import encode_crops
    from engines.musetalk.weights import load_vae

    vae = load_vae(models_dir, "cpu", torch.float32)

    def encode(crops: np.ndarray) -> np.ndarray:
        return np.asarray(encode_crops(vae, crops))

    return encode


# The boxes OpenCV 4's Haar cascade finds in `astronaut_frames` (as on CI).
ASTRONAUT_HAAR_BOXES = ((177, 67, 270, 160), (179, 67, 274, 162), (179, 65, 280, 166))


class RecordedBoxes:
    """Stands in for the Haar detector where OpenCV has no cascades (OpenCV 5, as on the GPU
    machine): the box it found in each of these frames, looked up by the frame's bytes."""

    name = "haar-recorded"

    def __init__(self, frames: np.ndarray, boxes: tuple[tuple[int, int, int, int], ...]) -> None:
        self.boxes = {f.tobytes(): b for f, b in zip(frames, boxes, strict=True)}

    def detect(self, frame_rgb: np.ndarray) -> tuple[int, int, int, int] | None:
        return self.boxes[np.ascontiguousarray(frame_rgb).tobytes()]


def astronaut_detector(frames: np.ndarray) -> Any:
    """None (prepare_avatar's default Haar detector) where OpenCV has its cascades."""
    from avatars.faces import haar_cascade_path

    try:
        haar_cascade_path()
        return None
    except RuntimeError:
        return RecordedBoxes(frames, ASTRONAUT_HAAR_BOXES)


@pytest.fixture(scope="session")
def astronaut_avatar(tiny_models_dir: Path, astronaut_frames: np.ndarray):  # type: ignore[no-untyped-def]
    from avatars.prepare import prepare_avatar

    return prepare_avatar(
        astronaut_frames,
        25.0,
        name="astronaut",
        avatar_id=ASTRONAUT_ID,
        encode_latents=tiny_encoder(tiny_models_dir),
        detector=astronaut_detector(astronaut_frames),
    )


@pytest.fixture(scope="session")
def preview_avatar(astronaut_frames: np.ndarray):  # type: ignore[no-untyped-def]
    from avatars.prepare import prepare_avatar

    return prepare_avatar(
        astronaut_frames,
        25.0,
        name="astronaut-preview",
        avatar_id=PREVIEW_ID,
        detector=astronaut_detector(astronaut_frames),
    )


@pytest.fixture
def avatars_dir(tmp_path: Path) -> Path:
    root = tmp_path / "avatars"
    root.mkdir()
    return root
