"""Defensive decoding of uploads: real PNG/JPEG/MP4/WebM made here, and hostile files."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest
from skimage.data import astronaut

from avatars import decode as decode_mod
from avatars.decode import AvatarInputError, DecodeLimits, decode_media, sniff

FACE = astronaut()  # (512, 512, 3) uint8 RGB


def write_video(path: Path, fmt: str, codec: str, n: int = 6, image: np.ndarray = FACE) -> Path:
    with av.open(str(path), "w", format=fmt) as out:
        stream: Any = out.add_stream(codec, rate=25)
        stream.width, stream.height = image.shape[1], image.shape[0]
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            frame = np.roll(image, 2 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def png_bytes(image: np.ndarray = FACE) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def jpeg_bytes(image: np.ndarray = FACE) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height, with a tiny (wrong) IDAT: a dimension bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    (root / "face.png").write_bytes(png_bytes())
    (root / "face.jpg").write_bytes(jpeg_bytes())
    return {
        "png": root / "face.png",
        "jpg": root / "face.jpg",
        "mp4": write_video(root / "face.mp4", "mp4", "libx264"),
        "webm": write_video(root / "face.webm", "webm", "libvpx-vp9"),
    }


# -- good files ---------------------------------------------------------------------------


def test_png_decodes_exactly(media: dict[str, Path]) -> None:
    got = decode_media(media["png"])
    assert got.kind == "png"
    assert got.frames.shape == (1, 512, 512, 3) and got.frames.dtype == np.uint8
    assert np.array_equal(got.frames[0], FACE)
    assert got.fps == 25.0


def test_jpeg_decodes_close(media: dict[str, Path]) -> None:
    got = decode_media(media["jpg"].read_bytes())  # bytes work as well as paths
    assert got.kind == "jpeg"
    assert got.frames.shape == (1, 512, 512, 3)
    assert np.abs(got.frames[0].astype(int) - FACE).mean() < 6.0


@pytest.mark.parametrize("key", ["mp4", "webm"])
def test_video_decodes_all_frames(media: dict[str, Path], key: str) -> None:
    seen: list[float] = []
    got = decode_media(media[key], progress=lambda f, _stage: seen.append(f))
    assert got.kind == ("mp4" if key == "mp4" else "matroska")
    assert got.frames.shape == (6, 512, 512, 3)
    assert got.fps == pytest.approx(25.0)
    # frame i is the astronaut rolled by 2i px: lossy, but close to the right roll
    for i in (0, 5):
        err = np.abs(got.frames[i].astype(int) - np.roll(FACE, 2 * i, axis=1)).mean()
        assert err < 8.0
    assert seen and seen[-1] == 1.0


def test_type_comes_from_content_not_name(media: dict[str, Path], tmp_path: Path) -> None:
    fake_png = tmp_path / "clip.png"
    fake_png.write_bytes(media["mp4"].read_bytes())
    assert decode_media(fake_png).kind == "mp4"
    fake_mp4 = tmp_path / "photo.mp4"
    fake_mp4.write_bytes(media["png"].read_bytes())
    assert decode_media(fake_mp4).kind == "png"
    no_ext = tmp_path / "upload"
    no_ext.write_bytes(media["webm"].read_bytes())
    assert decode_media(no_ext).n_frames == 6


def test_file_object_source(media: dict[str, Path]) -> None:
    with open(media["mp4"], "rb") as fh:
        assert decode_media(fh).n_frames == 6
    assert decode_media(io.BytesIO(media["webm"].read_bytes())).n_frames == 6


def test_sniff() -> None:
    assert sniff(b"\x89PNG\r\n\x1a\n" + b"\0" * 8) == "png"
    assert sniff(b"\xff\xd8\xff\xe0" + b"\0" * 8) == "jpeg"
    assert sniff(b"\x00\x00\x00\x20ftypisom") == "mp4"
    assert sniff(b"\x1a\x45\xdf\xa3" + b"\0" * 8) == "matroska"
    assert sniff(b"#EXTM3U\n#EXT-X-VERSION:3\n") is None
    assert sniff(b"GIF89a" + b"\0" * 8) is None


# -- hostile files ------------------------------------------------------------------------


def test_zero_length(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(AvatarInputError, match="empty"):
        decode_media(empty)


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is not a video at all\n" * 10,
        bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        b"GIF89a" + b"\0" * 100,
        b"ffconcat version 1.0\nfile '/etc/passwd'\n",
    ],
    ids=["text", "random", "gif", "ffconcat"],
)
def test_non_media_refused(data: bytes) -> None:
    with pytest.raises(AvatarInputError, match="unsupported file type"):
        decode_media(data)


def test_garbage_behind_good_magic_refused() -> None:
    for magic in (b"\x00\x00\x00\x18ftypmp42", b"\x1a\x45\xdf\xa3", b"\x89PNG\r\n\x1a\n"):
        with pytest.raises(AvatarInputError):
            decode_media(magic + b"\x07" * 2000)


@pytest.mark.parametrize("key", ["png", "jpg", "mp4", "webm"])
def test_truncated_refused(media: dict[str, Path], key: str) -> None:
    data = media[key].read_bytes()
    cut = len(data) // 2 if key in ("png", "jpg", "mp4") else 150  # webm: header only
    with pytest.raises(AvatarInputError):
        decode_media(data[:cut])


def test_playlist_pointing_at_local_file_refused(media: dict[str, Path], tmp_path: Path) -> None:
    playlist = tmp_path / "x.m3u8"
    playlist.write_text(
        "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n"
        f"file:{media['mp4']}\n{media['mp4']}\n#EXT-X-ENDLIST\n"
    )
    with pytest.raises(AvatarInputError, match="unsupported file type"):
        decode_media(playlist)
    # even a playlist dressed up with an ISO atom header does not reach the HLS demuxer
    disguised = tmp_path / "y.m3u8"
    disguised.write_bytes(b"\x00\x00\x00\x08ftyp" + playlist.read_bytes())
    with pytest.raises(AvatarInputError):
        decode_media(disguised)


@pytest.mark.parametrize("size", [(100_000, 100_000), (5000, 3000), (1000, 2000)])
def test_png_dimension_bomb_refused_before_decoding(size: tuple[int, int]) -> None:
    bomb = png_header_only(*size)  # 100000^2 would be 30 GB of RGB
    t0 = time.perf_counter()
    with pytest.raises(AvatarInputError, match="too large"):
        decode_media(bomb)
    assert time.perf_counter() - t0 < 1.0


def test_video_over_size_limit_refused(media: dict[str, Path]) -> None:
    with pytest.raises(AvatarInputError, match="too large"):
        decode_media(media["mp4"], DecodeLimits(max_width=256, max_height=256))


def test_video_over_duration_or_frame_limit_refused(media: dict[str, Path]) -> None:
    with pytest.raises(AvatarInputError, match="too long"):
        decode_media(media["webm"], DecodeLimits(max_seconds=0.1))
    with pytest.raises(AvatarInputError, match="too many frames"):
        decode_media(media["mp4"], DecodeLimits(max_frames=3))
    with pytest.raises(AvatarInputError, match="too much data"):
        decode_media(media["mp4"], DecodeLimits(max_decoded_bytes=3 * 512 * 512 * 3))


def test_file_size_limit(media: dict[str, Path]) -> None:
    size = media["mp4"].stat().st_size
    with pytest.raises(AvatarInputError, match="too large"):
        decode_media(media["mp4"], DecodeLimits(max_file_bytes=size - 1))


def test_lying_header_caught_while_decoding(
    media: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the header under-declares (probe passes), the limits still hold frame by frame."""
    real_probe = decode_mod._probe

    def lying_probe(container, limits):  # type: ignore[no-untyped-def]
        stream, fps, _ = real_probe(container, DecodeLimits())
        return stream, fps, 1

    monkeypatch.setattr(decode_mod, "_probe", lying_probe)
    with pytest.raises(AvatarInputError, match="too many frames"):
        decode_media(media["mp4"], DecodeLimits(max_frames=3))
    with pytest.raises(AvatarInputError, match="too large"):
        decode_media(media["webm"], DecodeLimits(max_width=256))
    with pytest.raises(AvatarInputError, match="too much data"):
        decode_media(media["mp4"], DecodeLimits(max_decoded_bytes=2 * 512 * 512 * 3))


def test_limits_validate() -> None:
    with pytest.raises(ValueError):
        DecodeLimits(max_frames=0)
    with pytest.raises(ValueError):
        DecodeLimits(max_seconds=-1.0)


def test_audio_only_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "speech.m4a"
    with av.open(str(path), "w", format="mp4") as out:
        stream: Any = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        samples = (np.sin(np.arange(16000) / 10) * 8000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(AvatarInputError, match="no video stream"):
        decode_media(path)
