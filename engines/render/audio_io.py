"""Audio files in: any container/codec PyAV decodes, out as float32 mono 16 kHz.

`load_audio` refuses anything that is not an audio file of a known container (an allow-list of
demuxers, so a playlist or concat script is never followed), files over `max_bytes`, and audio
longer than `max_seconds`. Every refusal is an `AudioError` (a `ValueError`) with a message that
names the file and the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from engines.base import SAMPLE_RATE

log = logging.getLogger(__name__)

# Demuxers we accept (FFmpeg names; a demuxer may carry several comma-separated names).
ALLOWED_FORMATS = frozenset(
    {
        "wav",
        "mp3",
        "ogg",
        "flac",
        "mov",
        "mp4",
        "m4a",
        "3gp",
        "3g2",
        "mj2",
        "matroska",
        "webm",
        "aac",
        "aiff",
        "caf",
    }
)


class AudioError(ValueError):
    """The file is not usable audio (not audio, unknown format, too large or too long)."""


@dataclass(frozen=True)
class AudioLimits:
    """Refuse inputs beyond these (a render of the maximum is 45,000 frames)."""

    max_bytes: int = 512 * 1024 * 1024
    max_seconds: float = 1800.0

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {self.max_bytes}")
        if self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")


DEFAULT_LIMITS = AudioLimits()


def _check_format(container: av.container.InputContainer, path: Path) -> None:
    names = set(container.format.name.split(","))
    if not names & ALLOWED_FORMATS:
        raise AudioError(f"{path}: container format {container.format.name!r} is not accepted")


def load_audio(path: str | Path, limits: AudioLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode the first audio stream of `path` to float32 mono at 16 kHz (values in [-1, 1])."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise AudioError(f"{path}: empty file")
    if size > limits.max_bytes:
        raise AudioError(f"{path}: {size} bytes is over the limit of {limits.max_bytes}")
    try:
        container = av.open(str(path), mode="r", options={"protocol_whitelist": "file"})
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise AudioError(f"{path}: not a decodable audio file ({exc})") from exc
    try:
        _check_format(container, path)
        if not container.streams.audio:
            raise AudioError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        if container.duration is not None and container.duration / 1e6 > limits.max_seconds + 1:
            raise AudioError(
                f"{path}: {container.duration / 1e6:.1f} s is over the limit of "
                f"{limits.max_seconds:.0f} s"
            )
        return _decode(container, stream, path, limits)
    except av.FFmpegError as exc:
        raise AudioError(f"{path}: decoding failed ({exc})") from exc
    finally:
        container.close()


def _decode(
    container: av.container.InputContainer,
    stream: av.AudioStream,
    path: Path,
    limits: AudioLimits,
) -> np.ndarray:
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    max_samples = int(limits.max_seconds * SAMPLE_RATE)
    parts: list[np.ndarray] = []
    total = 0

    def take(frames: list[av.AudioFrame]) -> None:
        nonlocal total
        for out in frames:
            arr = out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
            total += arr.size
            if total > max_samples:
                raise AudioError(f"{path}: longer than the limit of {limits.max_seconds:.0f} s")
            parts.append(arr)

    for frame in container.decode(stream):
        take(resampler.resample(frame))
    take(resampler.resample(None))
    if total == 0:
        raise AudioError(f"{path}: the audio stream holds no samples")
    audio = np.concatenate(parts)
    log.debug("decoded audio", extra={"path": str(path), "samples": audio.size})
    return np.ascontiguousarray(audio, dtype=np.float32)


def write_wav(path: str | Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """Write float32 mono samples as a PCM16 wav (clipped to [-1, 1])."""
    import wave

    pcm = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 32767 / 32768)
    data = np.round(pcm * 32768.0).astype("<i2").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data)
