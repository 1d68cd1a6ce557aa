"""Rendered frames out: an mp4 (H.264 yuv420p at 25 fps + the audio as AAC) and PNG dumps.

Even dimensions: yuv420p needs an even width and height. A frame with an odd width or height
is padded by repeating its last column / row (right / bottom edge), so no pixel is lost; the
PNG dump always holds the frames exactly as given.

The writer writes exactly the frames it is given, frame i at pts i (time base 1/25), and
interleaves the audio as it goes: after frame i, the audio up to the end of frame i is
encoded; `close()` flushes the rest of the audio, which may run past the last frame.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import cast

import av
import cv2
import numpy as np

from engines.base import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

log = logging.getLogger(__name__)

# Tried in order; the first one PyAV can open is used.
VIDEO_ENCODERS = ("libx264", "libopenh264", "h264", "mpeg4")
AUDIO_CHUNK = 1024  # samples per audio frame handed to the encoder


@dataclass(frozen=True)
class VideoOptions:
    """How the mp4 is encoded."""

    fps: int = FPS
    crf: int = 18  # libx264 quality (lower is better), as MuseTalk's own ffmpeg call
    preset: str = "veryfast"
    audio_bitrate: int = 96_000

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in 0..51, got {self.crf}")
        if self.audio_bitrate <= 0:
            raise ValueError(f"audio_bitrate must be > 0, got {self.audio_bitrate}")


def even_size(height: int, width: int) -> tuple[int, int]:
    """The encoded (height, width): each rounded up to even."""
    return height + height % 2, width + width % 2


def pad_even(frame: np.ndarray) -> np.ndarray:
    """Pad an odd-sized (H, W, 3) frame by repeating its last row / column."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return cv2.copyMakeBorder(frame, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)


def open_video_stream(
    container: av.container.OutputContainer, width: int, height: int, options: VideoOptions
) -> av.VideoStream:
    """Add an H.264 stream (or the first fallback encoder that opens) to `container`."""
    errors: list[str] = []
    for name in VIDEO_ENCODERS:
        if name not in av.codecs_available:
            errors.append(f"{name}: not in this FFmpeg build")
            continue
        try:
            stream = cast(av.VideoStream, container.add_stream(name, rate=options.fps))
        except (av.FFmpegError, ValueError) as exc:
            errors.append(f"{name}: {exc}")
            continue
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, options.fps)
        if name == "libx264":
            stream.options = {"crf": str(options.crf), "preset": options.preset}
        else:
            stream.bit_rate = 4_000_000
            log.warning(
                "libx264 is not available in this PyAV build; encoding video with %s instead (%s)",
                name,
                "; ".join(errors),
            )
        return stream
    raise RuntimeError("no usable video encoder: " + "; ".join(errors))


class Mp4Writer:
    """Writes RGB frames and one float32 mono 16 kHz audio track into an mp4."""

    def __init__(
        self,
        path: str | Path,
        height: int,
        width: int,
        audio: np.ndarray | None = None,
        options: VideoOptions | None = None,
    ) -> None:
        self.path = Path(path)
        self.options = options or VideoOptions()
        self.frame_size = (height, width)
        self._enc_h, self._enc_w = even_size(height, width)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w", format="mp4")
        self._video = open_video_stream(self._container, self._enc_w, self._enc_h, self.options)
        self._audio = None if audio is None else np.asarray(audio, dtype=np.float32).reshape(-1)
        self._audio_pos = 0
        self._astream: av.AudioStream | None = None
        if self._audio is not None and self._audio.size:
            self._astream = cast(
                av.AudioStream, self._container.add_stream("aac", rate=SAMPLE_RATE)
            )
            self._astream.layout = "mono"
            self._astream.bit_rate = self.options.audio_bitrate
        # Open every encoder and write the header before the first packet, so that each
        # stream's time base is final before packets are rescaled into it.
        self._container.start_encoding()
        self.frames_written = 0
        self._closed = False

    @property
    def encoder(self) -> str:
        return str(self._video.codec_context.name)

    def write(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 RGB frame of the size given at construction."""
        if frame.shape != (*self.frame_size, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"frame must be {(*self.frame_size, 3)} uint8, got {frame.shape} {frame.dtype}"
            )
        yuv = np.asarray(
            cv2.cvtColor(np.ascontiguousarray(pad_even(frame)), cv2.COLOR_RGB2YUV_I420), np.uint8
        )
        vf = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        vf.pts = self.frames_written
        vf.time_base = Fraction(1, self.options.fps)
        self._container.mux(self._video.encode(vf))
        self.frames_written += 1
        self._write_audio_until(self.frames_written * SAMPLES_PER_FRAME * FPS // self.options.fps)

    def write_batch(self, frames: np.ndarray) -> None:
        for frame in frames:
            self.write(frame)

    def _write_audio_until(self, stop: int) -> None:
        if self._astream is None or self._audio is None:
            return
        stop = min(stop, self._audio.size)
        while self._audio_pos < stop:
            end = min(self._audio_pos + AUDIO_CHUNK, self._audio.size)
            chunk = self._audio[self._audio_pos : end]
            af = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="flt", layout="mono")
            af.sample_rate = SAMPLE_RATE
            af.pts = self._audio_pos
            af.time_base = Fraction(1, SAMPLE_RATE)
            self._container.mux(self._astream.encode(af))
            self._audio_pos = end

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._container.mux(self._video.encode(None))
            if self._astream is not None and self._audio is not None:
                self._write_audio_until(self._audio.size)
                self._container.mux(self._astream.encode(None))
        finally:
            self._container.close()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PngDumper:
    """Writes frame i as DIR/00000000.png, 00000001.png, ... (RGB, exactly as given)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def write(self, frame: np.ndarray) -> None:
        path = self.dir / f"{self.count:08d}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
        self.count += 1

    def write_batch(self, frames: np.ndarray) -> None:
        for frame in frames:
            self.write(frame)


def read_pngs(directory: str | Path) -> np.ndarray:
    """The frames a `PngDumper` wrote, in order: (n, H, W, 3) uint8 RGB."""
    paths = sorted(Path(directory).glob("*.png"))
    frames = []
    for p in paths:
        bgr = cv2.imread(str(p))
        if bgr is None:
            raise OSError(f"could not read {p}")
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return np.stack(frames)
