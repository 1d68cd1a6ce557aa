"""Blend mask and paste-back: MuseTalk v1.5 semantics, pinned one by one."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage.data import astronaut

from avatars.blend import div255, paste_back, resize_face
from avatars.boxes import crop_box
from avatars.masks import (
    FaceParsingUnavailable,
    MaskOptions,
    blend_mask,
    blur_kernel_size,
    load_face_parser,
)

FRAME = astronaut()
FACE_BOX = (177, 67, 270, 170)  # the astronaut's face as our detector boxes it (+ margin)


def rng_face(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (256, 256, 3), dtype=np.uint8)


# -- mask -----------------------------------------------------------------------------------


def test_mask_shape_and_upper_part_zero() -> None:
    cb = crop_box(FACE_BOX, FRAME.shape)
    mask = blend_mask(FACE_BOX, cb)
    side = cb[2] - cb[0]
    assert mask.shape == (side, side) and mask.dtype == np.uint8
    k = blur_kernel_size(side)
    top = int(side * 0.5)
    # above the boundary only the blur's reach (k // 2 rows) may be non-zero
    assert not mask[: top - k // 2].any()
    assert mask[top + k :].max() == 255  # the lower face is fully replaced
    # the unblurred mask lives inside the face box: beyond it + blur reach, nothing
    fx1, _fy1, fx2, fy2 = (
        v - o for v, o in zip(FACE_BOX, (cb[0], cb[1], cb[0], cb[1]), strict=True)
    )
    assert not mask[:, : max(0, fx1 - k // 2)].any()
    assert not mask[:, fx2 + k // 2 + 1 :].any()
    assert not mask[fy2 + k // 2 + 1 :].any()


def test_mask_kernel_is_musetalk_odd_kernel() -> None:
    for width in (50, 99, 100, 152, 375, 1000):
        k = blur_kernel_size(width)
        assert k % 2 == 1
        assert k == int(0.1 * width // 2 * 2) + 1
    assert blur_kernel_size(152) == 15


def test_mask_edge_is_blurred() -> None:
    cb = crop_box(FACE_BOX, FRAME.shape)
    opts = MaskOptions(shape="box")
    mask = blend_mask(FACE_BOX, cb, options=opts)
    side = cb[2] - cb[0]
    top = int(side * 0.5)
    column = mask[:, (FACE_BOX[0] + FACE_BOX[2]) // 2 - cb[0]]
    ramp = column[top - 8 : top + 8]
    assert np.all(np.diff(ramp.astype(int)) >= 0)  # rises monotonically across the boundary
    assert 0 < column[top] < 255  # the boundary row itself is part-way
    assert len(np.unique(ramp)) > 5  # a ramp, not a step
    # equals MuseTalk's blur of the hard mask
    hard = np.zeros((side, side), np.uint8)
    x1, y1, x2, y2 = (v - o for v, o in zip(FACE_BOX, (cb[0], cb[1], cb[0], cb[1]), strict=True))
    hard[y1:y2, x1:x2] = 255
    hard[:top] = 0
    k = blur_kernel_size(side)
    assert np.array_equal(mask, cv2.GaussianBlur(hard, (k, k), 0))


def test_ellipse_mask_inside_box_mask() -> None:
    cb = crop_box(FACE_BOX, FRAME.shape)
    ellipse = blend_mask(FACE_BOX, cb).astype(int)
    box = blend_mask(FACE_BOX, cb, options=MaskOptions(shape="box")).astype(int)
    assert np.all(ellipse <= box)
    assert ellipse.sum() < 0.9 * box.sum()  # the jaw's corners are left out


def test_parsing_hook_errors_clearly(tmp_path: Path) -> None:
    with pytest.raises(FaceParsingUnavailable, match=r"79999_iter\.pth"):
        load_face_parser(tmp_path)
    with pytest.raises(FaceParsingUnavailable):
        blend_mask(FACE_BOX, crop_box(FACE_BOX), options=MaskOptions(source="parsing"))


def test_parsing_hook_uses_parser_inside_face_box() -> None:
    cb = crop_box(FACE_BOX)
    calls: list[tuple[tuple[int, ...], str]] = []

    def everything(crop: np.ndarray, mode: str) -> np.ndarray:
        calls.append((crop.shape, mode))
        return np.full(crop.shape[:2], 255, np.uint8)

    parsed = blend_mask(
        FACE_BOX, cb, frame=FRAME, parser=everything, options=MaskOptions(source="parsing")
    )
    assert calls == [((cb[3] - cb[1], cb[2] - cb[0], 3), "jaw")]
    # a parser that says "all face" gives the box mask: segmentation is cut to the face box
    assert np.array_equal(parsed, blend_mask(FACE_BOX, cb, options=MaskOptions(shape="box")))


def test_mask_options_validate() -> None:
    with pytest.raises(ValueError):
        MaskOptions(upper_boundary_ratio=1.5)
    with pytest.raises(ValueError):
        MaskOptions(mode="lips")  # type: ignore[arg-type]


# -- paste-back -----------------------------------------------------------------------------


def musetalk_get_image_blending(image, face, face_box, mask_array, crop_box):  # type: ignore[no-untyped-def]
    """MuseTalk's PIL code path (blending.py::get_image_blending), restated for the test."""
    body = Image.fromarray(image[:, :, ::-1])
    face = Image.fromarray(face[:, :, ::-1])
    x, y, x1, y1 = face_box
    x_s, y_s, _, _ = crop_box
    face_large = body.crop(tuple(crop_box))
    mask_image = Image.fromarray(mask_array).convert("L")
    face_large.paste(face, (x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    body.paste(face_large, tuple(crop_box[:2]), mask_image)
    return np.array(body)[:, :, ::-1]


def per_pixel_reference(frame, face, face_box, crop, mask):  # type: ignore[no-untyped-def]
    """An independent restatement: each pixel of the face box inside the crop and frame is
    round((dst * (255 - m) + src * m) / 255), everything else is the frame."""
    out = frame.astype(np.int64).copy()
    x1, y1, x2, y2 = face_box
    src = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR).astype(np.int64)
    h, w = frame.shape[:2]
    for yy in range(max(y1, crop[1], 0), min(y2, crop[3], h)):
        for xx in range(max(x1, crop[0], 0), min(x2, crop[2], w)):
            m = int(mask[yy - crop[1], xx - crop[0]])
            for c in range(3):
                num = int(frame[yy, xx, c]) * (255 - m) + int(src[yy - y1, xx - x1, c]) * m
                out[yy, xx, c] = (2 * num + 255) // 510  # round half up of num / 255
    return out.astype(np.uint8)


def test_div255_is_rounded_division() -> None:
    v = np.arange(0, 255 * 255 + 1, dtype=np.uint16)
    expected = np.floor(v.astype(np.float64) / 255 + 0.5).astype(np.uint16)
    assert np.array_equal(div255(v), expected)


@pytest.mark.parametrize(
    "face_box",
    [FACE_BOX, (0, 0, 150, 170), (400, 380, 512, 512), (200, 300, 203, 306)],
    ids=["centre", "top-left corner", "bottom-right corner", "tiny"],
)
def test_paste_back_equals_musetalk_and_per_pixel_formula(
    face_box: tuple[int, int, int, int],
) -> None:
    cb = crop_box(face_box, FRAME.shape)
    rng = np.random.default_rng(1)
    masks = [
        blend_mask(face_box, cb),
        rng.integers(0, 256, (cb[3] - cb[1], cb[2] - cb[0]), np.uint8),
    ]
    face = rng_face()
    for mask in masks:
        got = paste_back(FRAME, face, face_box, cb, mask)
        resized = resize_face(face, face_box)
        assert np.array_equal(
            got, musetalk_get_image_blending(FRAME, resized, face_box, mask, list(cb))
        )
        assert np.array_equal(got, per_pixel_reference(FRAME, face, face_box, cb, mask))


def test_paste_back_leaves_outside_crop_unchanged() -> None:
    cb = crop_box(FACE_BOX, FRAME.shape)
    mask = np.full((cb[3] - cb[1], cb[2] - cb[0]), 255, np.uint8)
    got = paste_back(FRAME, rng_face(), FACE_BOX, cb, mask)
    outside = np.ones(FRAME.shape[:2], bool)
    outside[cb[1] : cb[3], cb[0] : cb[2]] = False
    assert np.array_equal(got[outside], FRAME[outside])
    x1, y1, x2, y2 = FACE_BOX
    assert not np.array_equal(got[y1:y2, x1:x2], FRAME[y1:y2, x1:x2])
    assert np.array_equal(got[y1:y2, x1:x2], resize_face(rng_face(), FACE_BOX))  # mask 255


def test_paste_back_no_face_and_in_place() -> None:
    frame = FRAME.copy()
    same = paste_back(
        frame, rng_face(), (-1, -1, -1, -1), (-1, -1, -1, -1), np.zeros((0, 0), np.uint8)
    )
    assert np.array_equal(same, FRAME) and same is not frame
    cb = crop_box(FACE_BOX, FRAME.shape)
    mask = blend_mask(FACE_BOX, cb)
    expected = paste_back(FRAME, rng_face(), FACE_BOX, cb, mask)
    out = paste_back(frame, rng_face(), FACE_BOX, cb, mask, out=frame)
    assert out is frame and np.array_equal(frame, expected)
    with pytest.raises(ValueError, match="mask shape"):
        paste_back(FRAME, rng_face(), FACE_BOX, cb, mask[1:])
