"""Defensive decoding of an uploaded avatar file into RGB frames.

Uploads are untrusted (see CONVENTIONS.md, "Untrusted input"):

- The type is sniffed from the first bytes, never from the file's name: PNG and JPEG images,
  MP4/MOV (ISO base media, `ftyp`/QuickTime atoms) and Matroska/WebM (EBML) videos. Anything
  else (playlists, concat scripts, text, other codecs' containers) is refused unread.
- Images are opened with Pillow restricted to PNG/JPEG; their header size is checked against
  the limits before any pixel is decoded.
- Videos are opened with PyAV from a Python file object (FFmpeg then reads through our own
  I/O callbacks, so no URL or protocol is ever resolved), with an explicit demuxer from an
  allow-list and `protocol_whitelist=none` so that a demuxer may not open a nested resource
  either (MOV data references are also switched off: `enable_drefs=0`).
- Width, height, duration, frame count and the decoded size are probed and refused beyond
  `DecodeLimits` before decoding, and enforced again frame by frame while decoding (a header
  can lie).
- Every failure, whatever FFmpeg or Pillow raised, becomes `AvatarInputError(message)`, whose
  message is safe to show to the client.

The functions here hold no state and are safe to call from several threads at once.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import av
import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

MediaKind = Literal["png", "jpeg", "mp4", "matroska"]

# The demuxers we allow, by sniffed kind (FFmpeg's names for them).
VIDEO_DEMUXERS: dict[str, str] = {
    "mp4": "mov,mp4,m4a,3gp,3g2,mj2",
    "matroska": "matroska,webm",
}
# Options that keep FFmpeg inside the one file object it was given.
_DEMUXER_OPTIONS: dict[str, dict[str, str]] = {
    "mp4": {"protocol_whitelist": "none", "enable_drefs": "0"},
    "matroska": {"protocol_whitelist": "none"},
}
IMAGE_FPS = 25.0  # a still image is one frame; it plays at the engines' rate

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
# Top-level atoms an ISO-BMFF / QuickTime file may start with (bytes 4..8).
_ISO_ATOMS = {b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"}


class AvatarInputError(ValueError):
    """The uploaded file cannot become an avatar; the message is safe to show to the client."""


@dataclass(frozen=True)
class DecodeLimits:
    """What an upload may be. Checked on the header first and again while decoding."""

    max_width: int = 1920
    max_height: int = 1920
    max_seconds: float = 30.0
    max_frames: int = 750
    max_file_bytes: int = 200 * 1024 * 1024
    # frames x height x width x 3 bytes of decoded RGB (720p for 30 s at 25 fps fits)
    max_decoded_bytes: int = 2 * 1024**3
    # wall-clock budget for decoding (checked between frames)
    max_decode_seconds: float = 120.0

    def __post_init__(self) -> None:
        for name in (
            "max_width",
            "max_height",
            "max_frames",
            "max_file_bytes",
            "max_decoded_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DecodeLimits.{name} must be a positive int, got {value!r}")
        for name in ("max_seconds", "max_decode_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DecodeLimits.{name} must be > 0")


@dataclass(frozen=True)
class DecodedMedia:
    """Decoded frames: (N, H, W, 3) uint8 RGB, their rate, and what the file was."""

    frames: np.ndarray
    fps: float
    kind: MediaKind

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])


Source = str | os.PathLike[str] | bytes | BinaryIO
Progress = Callable[[float, str], None]


def sniff(head: bytes) -> MediaKind | None:
    """The media kind from a file's first bytes (at least 12), or None if not one we take."""
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head.startswith(_EBML_MAGIC):
        return "matroska"
    if len(head) >= 8 and head[4:8] in _ISO_ATOMS:
        return "mp4"
    return None


def decode_media(
    source: Source,
    limits: DecodeLimits | None = None,
    progress: Progress | None = None,
) -> DecodedMedia:
    """Decode an uploaded file (a path, bytes or a readable binary file object) into frames.

    Raises `AvatarInputError` for anything that is not a decodable PNG, JPEG, MP4/MOV or
    WebM/MKV within `limits`.
    """
    limits = limits or DecodeLimits()
    if isinstance(source, bytes | bytearray | memoryview):
        return _decode_file(io.BytesIO(bytes(source)), limits, progress)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            fh = path.open("rb")
        except OSError as exc:
            raise AvatarInputError("cannot read the uploaded file") from exc
        with fh:
            return _decode_file(fh, limits, progress)
    return _decode_file(source, limits, progress)


def _file_size(fh: BinaryIO) -> int:
    try:
        return os.fstat(fh.fileno()).st_size
    except (OSError, AttributeError, io.UnsupportedOperation):
        pos = fh.tell()
        end = fh.seek(0, io.SEEK_END)
        fh.seek(pos)
        return int(end)


def _decode_file(fh: BinaryIO, limits: DecodeLimits, progress: Progress | None) -> DecodedMedia:
    size = _file_size(fh)
    if size == 0:
        raise AvatarInputError("the uploaded file is empty")
    if size > limits.max_file_bytes:
        raise AvatarInputError(
            f"the uploaded file is too large ({size} bytes; the limit is "
            f"{limits.max_file_bytes} bytes)"
        )
    fh.seek(0)
    kind = sniff(fh.read(16))
    fh.seek(0)
    if kind is None:
        raise AvatarInputError("unsupported file type: expected PNG, JPEG, MP4, MOV, WebM or MKV")
    if kind in ("png", "jpeg"):
        return _decode_image(fh, kind, limits)
    return _decode_video(fh, kind, limits, progress)


def _check_size(width: int, height: int, limits: DecodeLimits) -> None:
    if width <= 0 or height <= 0:
        raise AvatarInputError("the file declares an empty picture")
    if width > limits.max_width or height > limits.max_height:
        raise AvatarInputError(
            f"the picture is too large ({width}x{height}; the limit is "
            f"{limits.max_width}x{limits.max_height})"
        )


def _decode_image(fh: BinaryIO, kind: MediaKind, limits: DecodeLimits) -> DecodedMedia:
    formats = ["PNG"] if kind == "png" else ["JPEG"]
    try:
        with Image.open(fh, formats=formats) as img:
            _check_size(img.width, img.height, limits)  # header only; nothing decoded yet
            img.load()
            oriented = ImageOps.exif_transpose(img)
            rgb = oriented.convert("RGB")
    except AvatarInputError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard fired on the header
        raise AvatarInputError("the picture is too large") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise AvatarInputError(f"the {kind.upper()} image is corrupt or truncated") from exc
    frame = np.asarray(rgb, dtype=np.uint8)
    _check_size(frame.shape[1], frame.shape[0], limits)  # EXIF rotation may swap sides
    return DecodedMedia(frames=np.ascontiguousarray(frame[None]), fps=IMAGE_FPS, kind=kind)


def _decode_video(
    fh: BinaryIO, kind: MediaKind, limits: DecodeLimits, progress: Progress | None
) -> DecodedMedia:
    try:
        container = av.open(
            fh, mode="r", format=VIDEO_DEMUXERS[kind], options=_DEMUXER_OPTIONS[kind]
        )
    except av.FFmpegError as exc:
        raise AvatarInputError("the video is corrupt or not a supported container") from exc
    try:
        return _read_video(container, kind, limits, progress)
    except AvatarInputError:
        raise
    except (av.FFmpegError, ValueError, OSError, MemoryError) as exc:
        raise AvatarInputError("the video is corrupt or truncated") from exc
    finally:
        container.close()


def _probe(
    container: av.container.InputContainer, limits: DecodeLimits
) -> tuple[av.video.stream.VideoStream, float, int]:
    """Check the header against the limits; return the stream, its fps and a frame estimate."""
    if not container.streams.video:
        raise AvatarInputError("the file has no video stream")
    stream = container.streams.video[0]
    _check_size(stream.width, stream.height, limits)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if not 0.0 < fps <= 240.0:
        raise AvatarInputError("the video declares no usable frame rate")
    seconds = 0.0
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    if seconds > limits.max_seconds:
        raise AvatarInputError(
            f"the video is too long ({seconds:.1f} s; the limit is {limits.max_seconds:g} s)"
        )
    frames = int(stream.frames or 0)
    estimate = max(frames, round(seconds * fps))
    if estimate > limits.max_frames:
        raise AvatarInputError(
            f"the video has too many frames ({estimate}; the limit is {limits.max_frames})"
        )
    _check_decoded_bytes(estimate, stream.height, stream.width, limits)
    return stream, fps, estimate


def _check_decoded_bytes(n: int, height: int, width: int, limits: DecodeLimits) -> None:
    decoded = n * height * width * 3
    if decoded > limits.max_decoded_bytes:
        raise AvatarInputError(
            f"the video decodes to too much data ({decoded} bytes; the limit is "
            f"{limits.max_decoded_bytes} bytes): use a shorter or smaller clip"
        )


def _read_video(
    container: av.container.InputContainer,
    kind: MediaKind,
    limits: DecodeLimits,
    progress: Progress | None,
) -> DecodedMedia:
    stream, fps, estimate = _probe(container, limits)
    stream.thread_type = "AUTO"
    started = time.monotonic()
    frames: list[np.ndarray | None] = []
    shape: tuple[int, int] | None = None
    for frame in container.decode(stream):
        if shape is None:
            shape = (frame.height, frame.width)
            _check_size(frame.width, frame.height, limits)
        elif (frame.height, frame.width) != shape:
            raise AvatarInputError("the video changes its picture size mid-stream")
        if len(frames) >= limits.max_frames:
            raise AvatarInputError(
                f"the video has too many frames (the limit is {limits.max_frames})"
            )
        if frame.time is not None and frame.time > limits.max_seconds + 1.0 / fps:
            raise AvatarInputError(f"the video is too long (the limit is {limits.max_seconds:g} s)")
        _check_decoded_bytes(len(frames) + 1, shape[0], shape[1], limits)
        if time.monotonic() - started > limits.max_decode_seconds:
            raise AvatarInputError("the video takes too long to decode")
        frames.append(_rotated(frame.to_ndarray(format="rgb24"), frame))
        if progress is not None and len(frames) % 10 == 0:
            progress(min(len(frames) / max(estimate, 1), 0.99), "decoding")
    if not frames:
        raise AvatarInputError("the video has no decodable frames")
    first = frames[0]
    assert first is not None
    out = np.empty((len(frames), *first.shape), dtype=np.uint8)
    for i in range(len(frames)):  # copy, releasing each source frame as we go (peak ~1x)
        out[i] = frames[i]
        frames[i] = None
    if progress is not None:
        progress(1.0, "decoded")
    log.info(
        "decoded video",
        extra={"kind": kind, "frames": out.shape[0], "height": out.shape[1], "width": out.shape[2]},
    )
    return DecodedMedia(frames=out, fps=fps, kind=kind)


def _rotated(rgb: np.ndarray, frame: av.VideoFrame) -> np.ndarray:
    """Apply the stream's display rotation (phones record upright video sideways)."""
    rotation = int(getattr(frame, "rotation", 0) or 0) % 360
    if rotation == 0:
        return rgb
    # FFmpeg's rotation is counter-clockwise degrees to apply for display.
    return np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))
