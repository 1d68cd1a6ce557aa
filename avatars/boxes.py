"""Face box adjustments and crops, as MuseTalk v1.5 makes them.

From a detector box to the box the model sees:

1. `bbox_shift`. In MuseTalk (`musetalk/utils/preprocessing.py::get_landmark_and_bbox`) the
   box is rebuilt from landmarks: its top edge is the nose landmark (#29) mirrored above
   itself by the nose-to-lowest-landmark distance, and `bbox_shift` moves that nose point
   down by `bbox_shift` px, so the top edge moves by 2 x `bbox_shift`. MuseTalk v1.5's own
   scripts (`scripts/inference.py`, `scripts/realtime_inference.py`) force `bbox_shift = 0`
   and only v1 reads it. Our detector has no landmarks, so here `bbox_shift` simply moves the
   box's top edge down by `bbox_shift` px (up if negative), clipped to the frame and kept at
   least one pixel above the bottom edge. 0 (the default) leaves the box as v1.5 does.
2. v1.5's `extra_margin`: the bottom edge moves down 10 px, clipped to the frame height
   (`y2 = min(y2 + extra_margin, frame_height)`), so the crop includes the chin.
3. The model's input: `frame[y1:y2, x1:x2]` resized to 256 x 256 with Lanczos
   (`cv2.INTER_LANCZOS4`).
4. The blend crop: a square 1.5 x the box's longer side around its centre, in integer pixels
   exactly as MuseTalk's `get_crop_box` (`musetalk/utils/blending.py`); it is not clipped and
   may reach past the frame (`crop_region` pads with black there, as PIL's `crop` does).
"""

from __future__ import annotations

import cv2
import numpy as np

from avatars.faces import Box, BoxLike

EXTRA_MARGIN = 10  # MuseTalk v1.5's default `--extra_margin`
CROP_EXPAND = 1.5  # MuseTalk's `get_crop_box(..., expand=1.5)`
FACE_SIZE = 256  # the model's face crop side


def apply_bbox_shift(box: Box, bbox_shift: int, frame_height: int) -> Box:
    """Move the top edge by `bbox_shift` px (down if positive), clipped to [0, y2 - 1]."""
    x1, y1, x2, y2 = box
    new_y1 = min(max(0, y1 + int(bbox_shift)), min(y2, frame_height) - 1)
    return x1, max(0, new_y1), x2, y2


def apply_extra_margin(box: Box, frame_height: int, extra_margin: int = EXTRA_MARGIN) -> Box:
    """v1.5: extend the bottom edge by `extra_margin` px, clipped to the frame height."""
    x1, y1, x2, y2 = box
    return x1, y1, x2, min(y2 + int(extra_margin), frame_height)


def face_box_v15(
    detected: BoxLike,
    frame_shape: tuple[int, ...],
    bbox_shift: int = 0,
    extra_margin: int = EXTRA_MARGIN,
) -> Box:
    """The box the model sees, from a detector box: `bbox_shift`, then `extra_margin`."""
    height, width = int(frame_shape[0]), int(frame_shape[1])
    x1, y1, x2, y2 = (int(v) for v in detected)
    x1, x2 = max(0, x1), min(width, x2)
    y1, y2 = max(0, y1), min(height, y2)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"face box {detected} is empty inside a {width}x{height} frame")
    box = apply_bbox_shift((x1, y1, x2, y2), bbox_shift, height)
    return apply_extra_margin(box, height, extra_margin)


def crop_box(
    face_box: BoxLike, frame_shape: tuple[int, ...] | None = None, expand: float = CROP_EXPAND
) -> Box:
    """MuseTalk's `get_crop_box`: a square of half-side int(max(w, h) // 2 * expand) around the
    box's integer centre. Not clipped; `frame_shape`, when given, checks the face box lies in
    the frame."""
    x, y, x1, y1 = (int(v) for v in face_box)
    if frame_shape is not None:
        height, width = int(frame_shape[0]), int(frame_shape[1])
        if not (0 <= x < x1 <= width and 0 <= y < y1 <= height):
            raise ValueError(f"face box {face_box} is not inside a {width}x{height} frame")
    x_c, y_c = (x + x1) // 2, (y + y1) // 2
    w, h = x1 - x, y1 - y
    s = int(max(w, h) // 2 * expand)
    return x_c - s, y_c - s, x_c + s, y_c + s


def face_crop(frame: np.ndarray, face_box: BoxLike, size: int = FACE_SIZE) -> np.ndarray:
    """The model's input face: frame[y1:y2, x1:x2] resized to (size, size, 3) with Lanczos."""
    x1, y1, x2, y2 = (int(v) for v in face_box)
    region = frame[y1:y2, x1:x2]
    if region.shape[0] == 0 or region.shape[1] == 0:
        raise ValueError(f"face box {face_box} is empty in a frame of shape {frame.shape}")
    return cv2.resize(region, (size, size), interpolation=cv2.INTER_LANCZOS4)


def crop_region(frame: np.ndarray, box: BoxLike) -> np.ndarray:
    """frame[y1:y2, x1:x2] where the box may reach past the frame; outside is black (0),
    as PIL's `Image.crop` pads."""
    x1, y1, x2, y2 = (int(v) for v in box)
    out = np.zeros((y2 - y1, x2 - x1, *frame.shape[2:]), dtype=frame.dtype)
    h, w = frame.shape[:2]
    sx1, sy1, sx2, sy2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = frame[sy1:sy2, sx1:sx2]
    return out
