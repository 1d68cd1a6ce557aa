"""Offline render: an avatar and a clip of speech in, lip-synced frames (and an mp4) out.

Two ways to get each frame's features:
- offline (default): `engine.offline_features` over the whole clip, exactly as MuseTalk's own
  inference computes them;
- streaming (`RenderOptions.streaming`): the clip is fed through `engines.stream.SpeechStream`
  in chunks of `chunk_samples`, as the server receives it, and each frame's features come from
  `engine.stream_features` (they read only the audio up to the frame's horizon).

Either way frame i sits at idle-loop position i and the clip yields exactly floor(duration x 25)
frames. In streaming mode frames are rendered in batches of `batch_size` consecutive frames
(the last one shorter), whatever the chunk size, so the output depends on the audio alone.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from avatars.avatar import Avatar
from engines.base import SAMPLE_RATE, Engine, FrameJob, frames_in
from engines.render.video_io import Mp4Writer, PngDumper, VideoOptions
from engines.stream import SpeechStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenderOptions:
    """How a clip is rendered."""

    batch_size: int = 8
    streaming: bool = False
    chunk_samples: int = 640  # streaming only: the audio arrives in pieces of this many samples
    progress: bool = True  # a progress bar on stderr

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.chunk_samples < 1:
            raise ValueError(f"chunk_samples must be >= 1, got {self.chunk_samples}")


@dataclass(frozen=True)
class RenderResult:
    frames: int
    seconds: float  # wall time spent rendering and writing
    engine: str
    encoder: str | None  # the mp4's video encoder (None when no mp4 was written)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")


def _offline_batches(
    engine: Engine, avatar: Avatar, audio: np.ndarray, batch: int
) -> Iterator[np.ndarray]:
    features = engine.offline_features(audio)
    n = len(features)
    if n != frames_in(audio.size):
        raise RuntimeError(f"{engine.name}: {n} feature rows for {frames_in(audio.size)} frames")
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        yield engine.render(avatar.id, list(range(start, stop)), features[start:stop])


def _stream_batches(
    engine: Engine, avatar: Avatar, audio: np.ndarray, batch: int, chunk: int
) -> Iterator[np.ndarray]:
    stream = SpeechStream(max_utterance_s=audio.size / SAMPLE_RATE + 1.0)
    pending: list[FrameJob] = []

    def run(jobs: Sequence[FrameJob]) -> np.ndarray:
        feats = engine.stream_features(stream.audio, jobs)
        return engine.render(avatar.id, [j.loop_position for j in jobs], feats)

    for start in range(0, audio.size, chunk):
        stream.push(audio[start : start + chunk])
        pending.extend(stream.take())
        while len(pending) >= batch:
            yield run(pending[:batch])
            pending = pending[batch:]
    stream.end()
    pending.extend(stream.take())
    while pending:
        yield run(pending[:batch])
        pending = pending[batch:]


def render_frames(
    engine: Engine, avatar: Avatar, audio: np.ndarray, options: RenderOptions | None = None
) -> Iterator[np.ndarray]:
    """Batches of (b, H, W, 3) uint8 RGB frames, in order, floor(duration x 25) in all."""
    options = options or RenderOptions()
    audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
    engine.load_avatar(avatar)
    if options.streaming:
        return _stream_batches(engine, avatar, audio, options.batch_size, options.chunk_samples)
    return _offline_batches(engine, avatar, audio, options.batch_size)


def render_all(
    engine: Engine, avatar: Avatar, audio: np.ndarray, options: RenderOptions | None = None
) -> np.ndarray:
    """Every frame at once: (n, H, W, 3) uint8 RGB (for tests and short clips)."""
    h, w = avatar.size
    batches = list(render_frames(engine, avatar, audio, options))
    return np.concatenate(batches) if batches else np.zeros((0, h, w, 3), np.uint8)


def render_to_files(
    engine: Engine,
    avatar: Avatar,
    audio: np.ndarray,
    out: str | Path | None,
    frames_dir: str | Path | None = None,
    options: RenderOptions | None = None,
    video_options: VideoOptions | None = None,
) -> RenderResult:
    """Render the clip into an mp4 (H.264 + the audio as AAC) and/or a folder of PNGs."""
    options = options or RenderOptions()
    audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
    n = frames_in(audio.size)
    if n == 0:
        raise ValueError(
            f"the audio is {audio.size / SAMPLE_RATE * 1000:.0f} ms: shorter than one frame"
        )
    h, w = avatar.size
    t0 = time.perf_counter()
    writer = Mp4Writer(out, h, w, audio, video_options) if out is not None else None
    dumper = PngDumper(frames_dir) if frames_dir is not None else None
    written = 0
    try:
        with tqdm(
            total=n, unit="frame", file=sys.stderr, disable=not options.progress, desc="render"
        ) as bar:
            for frames in render_frames(engine, avatar, audio, options):
                if writer is not None:
                    writer.write_batch(frames)
                if dumper is not None:
                    dumper.write_batch(frames)
                written += len(frames)
                bar.update(len(frames))
    finally:
        if writer is not None:
            writer.close()
    if written != n:
        raise RuntimeError(f"rendered {written} frames, expected {n}")
    seconds = time.perf_counter() - t0
    result = RenderResult(written, seconds, engine.name, writer.encoder if writer else None)
    log.info("rendered %d frames in %.2f s (%.1f fps)", written, seconds, result.fps)
    return result
