"""Frames as I420: the GPU worker's flat buffers laid out as the video track wants them, and
the server-wide cache of unchanged avatar frames (idle ticks cost no colour conversion)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from avatars.avatar import Avatar
from engines.preview import PreviewEngine
from server.media.pictures import AvatarPictures, IdleFrames, i420_image, to_i420
from server.media.tracks import video_frame


def _flat_i420(rgb: np.ndarray) -> np.ndarray:
    """What the GPU pipeline hands back for an even-sized picture: cv2's I420, flattened."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).reshape(-1)


def test_even_sizes_are_a_view_in_the_tracks_layout() -> None:
    from skimage.data import astronaut

    rgb = cv2.resize(astronaut(), (64, 48), interpolation=cv2.INTER_AREA)
    flat = _flat_i420(rgb)
    img = i420_image(flat, 48, 64)
    assert img.shape == (72, 64) and np.shares_memory(img, flat)
    assert np.array_equal(img, to_i420(rgb))
    assert to_i420(img) is img  # passes through the track's conversion untouched
    frame = video_frame(img, 3)
    assert (frame.width, frame.height, frame.pts) == (64, 48, 3 * 3600)
    back = frame.to_ndarray(format="rgb24")
    assert np.abs(back.astype(int) - rgb.astype(int)).mean() < 8


def test_odd_sizes_pad_the_luma_and_keep_the_chroma() -> None:
    h, w = 7, 9
    ch, cw = 4, 5
    y = np.arange(h * w, dtype=np.uint8).reshape(h, w)
    u = np.full(ch * cw, 100, np.uint8)
    v = np.full(ch * cw, 200, np.uint8)
    img = i420_image(np.concatenate([y.reshape(-1), u, v]), h, w)
    assert img.shape == (12, 10)
    flat = img.reshape(-1)
    y2 = flat[: 8 * 10].reshape(8, 10)
    assert np.array_equal(y2[:h, :w], y)
    assert np.array_equal(y2[h, :w], y[-1]) and np.array_equal(y2[:h, w], y[:, -1])
    assert np.all(flat[80:100] == 100) and np.all(flat[100:] == 200)
    frame = video_frame(img, 0)
    assert (frame.width, frame.height) == (10, 8)


def test_a_buffer_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="I420 buffer of 4x4"):
        i420_image(np.zeros(10, np.uint8), 4, 4)


def test_idle_cache_converts_once_and_stays_bounded() -> None:
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    one = to_i420(frames[0]).nbytes
    cache = IdleFrames(max_bytes=3 * one)
    a = cache.get("av_a", 0, frames[0])
    assert np.array_equal(a, to_i420(frames[0])) and not a.flags.writeable
    assert cache.get("av_a", 0, frames[1]) is a  # keyed by (avatar, frame): no new work
    for i in range(1, 5):
        cache.get("av_a", i, frames[i])
    assert len(cache) == 3  # least recently used out
    assert cache.get("av_a", 0, frames[0]) is not a
    cache.get("av_b", 0, frames[0])
    cache.forget("av_a")
    assert len(cache) == 1


def test_video_frames_wrap_the_picture_and_keep_it_alive() -> None:
    import gc

    def frame_of_a_temporary() -> object:
        return video_frame(np.full((72, 64), 77, np.uint8), 5)

    frame = frame_of_a_temporary()
    gc.collect()
    _ = [np.full((72, 64), 1, np.uint8) for _ in range(200)]  # reuse freed memory, if any
    planes = frame.to_ndarray()  # type: ignore[attr-defined]
    assert planes.shape == (72, 64) and planes.min() == planes.max() == 77
    strided = np.full((72, 128), 9, np.uint8)[:, ::2]  # not contiguous: copied instead
    assert video_frame(strided, 0).to_ndarray().max() == 9  # type: ignore[attr-defined]


def test_a_sessions_pictures_lay_out_the_workers_frames_and_share_idle_ones() -> None:
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (3, 7, 9, 3), dtype=np.uint8)  # odd sizes: padded
    n = len(frames)
    avatar = Avatar(
        id="av_pictures",
        name="p",
        fps=25.0,
        frames=frames,
        face_boxes=np.full((n, 4), -1, np.int32),
        crop_boxes=np.full((n, 4), -1, np.int32),
        masks=[np.zeros((0, 0), np.uint8)] * n,
    )
    cache = IdleFrames()
    a = AvatarPictures(avatar, PreviewEngine(), cache)
    b = AvatarPictures(avatar, PreviewEngine(), cache)
    assert a.shape == (12, 10)
    padded = to_i420(frames[1])  # what the GPU hands back is its flat planes, unpadded
    gpu = np.concatenate([padded[:7, :9].reshape(-1), padded.reshape(-1)[8 * 10 :]])
    rgb, flat = a.lay_out([frames[1], gpu])
    assert np.array_equal(rgb, padded) and np.array_equal(flat, padded)
    with pytest.raises(ValueError, match="I420 buffer of 7x9"):
        a.lay_out([np.zeros(10, np.uint8)])
    idle = a.idle(4)  # loop position 4 of a 3-frame ping-pong loop: frame 1
    assert np.array_equal(idle, to_i420(frames[avatar.loop_frame(4)]))
    assert b.idle(4) is idle and len(cache) == 1  # one conversion for every session
