"""Face detection, v1.5 boxes and crops, and `prepare_avatar` end to end (CPU)."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest
from skimage.data import astronaut

from avatars.boxes import (
    apply_bbox_shift,
    apply_extra_margin,
    crop_box,
    crop_region,
    face_box_v15,
    face_crop,
)
from avatars.decode import AvatarInputError
from avatars.faces import (
    FaceDetector,
    HaarFaceDetector,
    make_detector,
    register_detector,
    smooth_boxes,
)
from avatars.prepare import PrepareOptions, prepare_avatar

FACE = astronaut()
NO_FACE = np.full_like(FACE, 127)  # a flat grey frame


def fake_encoder(crops: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for the VAE: (n, 256, 256, 3) -> (n, 8, 32, 32)."""
    assert crops.dtype == np.uint8 and crops.shape[1:] == (256, 256, 3)
    pooled = crops.reshape(len(crops), 32, 8, 32, 8, 3).mean(axis=(2, 4))  # (n, 32, 32, 3)
    chans = np.concatenate([pooled, pooled[..., :2] * 0.5, pooled[..., :3] * 0.25], axis=-1)
    return (chans.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)


# -- detection ------------------------------------------------------------------------------


def test_haar_finds_the_astronauts_face() -> None:
    box = HaarFaceDetector().detect(FACE)
    assert box is not None
    x1, y1, x2, y2 = box
    # her face: eyes at y ~ 105, mouth ~ 150, centred at x ~ 220 in the 512 x 512 image
    assert 195 <= (x1 + x2) / 2 <= 250 and 95 <= (y1 + y2) / 2 <= 135
    assert 60 <= x2 - x1 <= 160 and 60 <= y2 - y1 <= 160


def test_haar_finds_the_face_scaled_up_and_none_in_grey() -> None:
    big = cv2.resize(FACE, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    small_box = HaarFaceDetector().detect(FACE)
    big_box = HaarFaceDetector().detect(big)
    assert small_box is not None and big_box is not None
    assert np.abs(np.array(big_box) / 2 - np.array(small_box)).max() < 12
    assert HaarFaceDetector().detect(NO_FACE) is None


def test_detector_registry() -> None:
    class Fixed:
        name = "fixed"

        def detect(self, frame_rgb: np.ndarray) -> tuple[int, int, int, int] | None:
            return (10, 10, 50, 60)

    register_detector("fixed_test", Fixed)
    det = make_detector("fixed_test")
    assert isinstance(det, FaceDetector) and det.detect(FACE) == (10, 10, 50, 60)
    assert isinstance(make_detector(), HaarFaceDetector)
    with pytest.raises(ValueError, match="unknown face detector"):
        make_detector("nope")


def test_smooth_boxes() -> None:
    boxes = [(0, 0, 10, 10), (2, 2, 12, 12), None, (4, 4, 14, 14)]
    smoothed = smooth_boxes(boxes, 3)
    assert smoothed[0] == (1, 1, 11, 11)
    assert smoothed[1] == (1, 1, 11, 11)
    assert smoothed[2] is None
    assert smoothed[3] == (4, 4, 14, 14)
    assert smooth_boxes(boxes, 0) == boxes


# -- boxes ----------------------------------------------------------------------------------


def test_bbox_shift_moves_top_edge_clipped() -> None:
    assert apply_bbox_shift((10, 20, 50, 80), 5, 100) == (10, 25, 50, 80)
    assert apply_bbox_shift((10, 20, 50, 80), -7, 100) == (10, 13, 50, 80)
    assert apply_bbox_shift((10, 20, 50, 80), -50, 100) == (10, 0, 50, 80)
    assert apply_bbox_shift((10, 20, 50, 80), 500, 100) == (10, 79, 50, 80)


def test_extra_margin_extends_bottom_clipped() -> None:
    assert apply_extra_margin((10, 20, 50, 80), 100) == (10, 20, 50, 90)
    assert apply_extra_margin((10, 20, 50, 95), 100) == (10, 20, 50, 100)
    assert face_box_v15((10, 20, 50, 80), (100, 120, 3), bbox_shift=3) == (10, 23, 50, 90)
    assert face_box_v15((-5, -5, 50, 98), (100, 120, 3)) == (0, 0, 50, 100)
    with pytest.raises(ValueError):
        face_box_v15((130, 10, 150, 20), (100, 120, 3))


def test_crop_box_is_musetalks_get_crop_box() -> None:
    # MuseTalk: x_c, y_c = (x+x1)//2, (y+y1)//2; s = int(max(w, h)//2*expand)
    assert crop_box((177, 67, 270, 170)) == (147, 42, 299, 194)  # s = int(51 * 1.5) = 76
    assert crop_box((0, 0, 151, 100)) == (-37, -62, 187, 162)  # s = int(75 * 1.5) = 112
    assert crop_box((10, 10, 20, 21), expand=2.0) == (5, 5, 25, 25)
    with pytest.raises(ValueError, match="not inside"):
        crop_box((0, 0, 600, 10), FACE.shape)


def test_face_crop_and_crop_region() -> None:
    box = (177, 67, 270, 170)
    crop = face_crop(FACE, box)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    ref = cv2.resize(FACE[67:170, 177:270], (256, 256), interpolation=cv2.INTER_LANCZOS4)
    assert np.array_equal(crop, ref)
    padded = crop_region(FACE, (-10, -5, 20, 30))
    assert padded.shape == (35, 30, 3)
    assert not padded[:5].any() and not padded[:, :10].any()
    assert np.array_equal(padded[5:, 10:], FACE[:30, :20])


# -- prepare --------------------------------------------------------------------------------


def test_prepare_keeps_no_face_frames() -> None:
    frames = np.stack([FACE, NO_FACE, np.roll(FACE, 4, axis=1)])
    seen: list[tuple[float, str]] = []
    av = prepare_avatar(
        frames,
        25.0,
        name="astro",
        avatar_id="av_0123456789abcdef",
        encode_latents=fake_encoder,
        progress=lambda f, s: seen.append((f, s)),
    )
    assert av.n_frames == 3 and np.array_equal(av.frames, frames)
    assert av.has_face.tolist() == [True, False, True]
    assert (av.face_boxes[1] == -1).all() and (av.crop_boxes[1] == -1).all()
    assert av.masks[1].shape == (0, 0)
    for i in (0, 2):
        fb = tuple(int(v) for v in av.face_boxes[i])
        cb = tuple(int(v) for v in av.crop_boxes[i])
        assert cb == crop_box(fb)
        assert av.masks[i].shape == (cb[3] - cb[1], cb[2] - cb[0])
        assert av.latents is not None
        assert np.allclose(av.latents[i], fake_encoder(face_crop(frames[i], fb)[None])[0])
    assert av.latents is not None and av.latents.shape == (3, 8, 32, 32)
    assert not av.latents[1].any()
    # the second face is the first moved 4 px right
    assert abs(int(av.face_boxes[2][0]) - int(av.face_boxes[0][0]) - 4) <= 3
    # progress: within 0..1, never going back, ending at 1, through every stage
    fractions = [f for f, _ in seen]
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = {s for _, s in seen}
    assert {"detecting faces", "making blend masks", "encoding latents"} <= stages
    assert av.meta["n_faces"] == 2 and av.meta["prep_seconds_per_frame"] > 0


def test_prepare_applies_bbox_shift_and_margin() -> None:
    frames = FACE[None]
    base = prepare_avatar(frames, 25.0, name="a", avatar_id="av_0123456789abcdef")
    shifted = prepare_avatar(frames, 25.0, name="a", avatar_id="av_0123456789abcdef", bbox_shift=6)
    detected = HaarFaceDetector().detect(FACE)
    assert detected is not None
    assert tuple(base.face_boxes[0]) == (detected[0], detected[1], detected[2], detected[3] + 10)
    assert shifted.face_boxes[0][1] == base.face_boxes[0][1] + 6
    assert shifted.bbox_shift == 6
    assert base.latents is None  # no encoder: the engine computes latents on load


def test_prepare_all_frames_without_face_is_a_clear_error() -> None:
    with pytest.raises(AvatarInputError, match="no face found"):
        prepare_avatar(
            np.stack([NO_FACE, NO_FACE]), 25.0, name="x", avatar_id="av_0123456789abcdef"
        )


def test_prepare_rejects_bad_encoder_and_frames() -> None:
    with pytest.raises(ValueError, match="encode_latents returned"):
        prepare_avatar(
            FACE[None],
            25.0,
            name="x",
            avatar_id="av_0123456789abcdef",
            encode_latents=lambda crops: np.zeros((len(crops), 4, 32, 32), np.float32),
        )
    with pytest.raises(ValueError):
        prepare_avatar(FACE, 25.0, name="x", avatar_id="av_0123456789abcdef")
    with pytest.raises(ValueError):
        PrepareOptions(smooth_window=-1)


def test_prepare_is_thread_safe() -> None:
    frames = np.stack([FACE, np.roll(FACE, 8, axis=0)])
    expected = prepare_avatar(frames, 25.0, name="a", avatar_id="av_0123456789abcdef")
    shared = HaarFaceDetector()
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            av = prepare_avatar(
                frames, 25.0, name="a", avatar_id="av_0123456789abcdef", detector=shared
            )
            results.append(av.face_boxes)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4 and all(np.array_equal(r, expected.face_boxes) for r in results)
