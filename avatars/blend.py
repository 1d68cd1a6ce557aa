"""Paste a generated face back into its frame: the CPU reference for the GPU paste-back.

MuseTalk v1.5's realtime path (`scripts/realtime_inference.py::process_frames` and
`musetalk/utils/blending.py::get_image_blending`) does, with PIL:

    face  = cv2.resize(face, (x2 - x1, y2 - y1))        # bilinear: cv2's default INTER_LINEAR
    large = body.crop(crop_box)                          # crop box may reach past the frame
    large.paste(face, (x1 - cx1, y1 - cy1, ...))         # face into the crop at the box offset
    body.paste(large, (cx1, cy1), mask)                  # crop into the frame through the mask

PIL's masked paste computes, per channel, `out = DIV255(dst * (255 - m) + src * m)` with
`DIV255(v) = ((v + 128) + ((v + 128) >> 8)) >> 8` (v / 255 rounded to nearest), clipped to the
frame. Inside the crop but outside the face box `src == dst`, and `DIV255(255 * dst) == dst`,
so only the face box changes; this module computes exactly that, vectorised, on the face
box's intersection with the crop (the same bytes PIL produces).
"""

from __future__ import annotations

import cv2
import numpy as np

from avatars.faces import BoxLike


def resize_face(face: np.ndarray, face_box: BoxLike) -> np.ndarray:
    """The generated 256 x 256 face resized to the face box, as MuseTalk: cv2 bilinear."""
    x1, y1, x2, y2 = (int(v) for v in face_box)
    return cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)


def div255(v: np.ndarray) -> np.ndarray:
    """v / 255 rounded to nearest for 0 <= v <= 255 * 255, as PIL's DIV255 (uint16 in/out)."""
    t = v + np.uint16(128)
    return (t + (t >> np.uint16(8))) >> np.uint16(8)


def paste_back(
    frame: np.ndarray,
    face: np.ndarray,
    face_box: BoxLike,
    crop_box: BoxLike,
    mask: np.ndarray,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The frame with `face` blended in: (H, W, 3) uint8.

    frame (H, W, 3) uint8; face (h, w, 3) uint8 (256 x 256 from the VAE; resized here to the
    face box); face_box and crop_box (x1, y1, x2, y2) as stored on the Avatar; mask
    (crop_h, crop_w) uint8 over the crop box. A face box of -1s (no face) or an empty mask
    returns the frame unchanged. Writes into `out` (may be `frame` itself) when given,
    else into a copy.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError("paste_back takes an (H, W, 3) uint8 frame")
    result = frame.copy() if out is None else out
    if out is not None and out is not frame:
        np.copyto(out, frame)
    x1, y1, x2, y2 = (int(v) for v in face_box)
    if x1 < 0 or mask.size == 0:
        return result
    cx1, cy1, cx2, cy2 = (int(v) for v in crop_box)
    if mask.shape != (cy2 - cy1, cx2 - cx1):
        raise ValueError(f"mask shape {mask.shape} does not match crop box {tuple(crop_box)}")
    height, width = frame.shape[:2]
    # the region that can change: face box ∩ crop box ∩ frame
    rx1, ry1 = max(x1, cx1, 0), max(y1, cy1, 0)
    rx2, ry2 = min(x2, cx2, width), min(y2, cy2, height)
    if rx2 <= rx1 or ry2 <= ry1:
        return result
    src = resize_face(face, (x1, y1, x2, y2))[ry1 - y1 : ry2 - y1, rx1 - x1 : rx2 - x1]
    m = mask[ry1 - cy1 : ry2 - cy1, rx1 - cx1 : rx2 - cx1].astype(np.uint16)[..., None]
    dst = frame[ry1:ry2, rx1:rx2].astype(np.uint16)
    blended = div255(dst * (np.uint16(255) - m) + src.astype(np.uint16) * m)
    result[ry1:ry2, rx1:rx2] = blended.astype(np.uint8)
    return result
