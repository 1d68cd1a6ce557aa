"""The face box MuseTalk v1.5 derives from S3FD detections and DWPose's 68 face landmarks.

As `musetalk/utils/preprocessing.py::get_landmark_and_bbox` and `scripts/realtime_inference.py`
compute it, per frame:

1. No S3FD detection: the frame has no face (MuseTalk's `coord_placeholder`; here -1 boxes).
2. The landmarks (whole-body keypoints 23..90) are truncated to int32. Landmark 29 (the nose
   bridge) gets `bbox_shift` added to its y, in place: the shifted point also counts in the
   landmarks' maximum y below.
3. The landmark box: x from the landmarks' min and max x, the bottom at their max y, the top at
   `max(0, y29 - (max_y - y29))` (the nose point mirrored above itself). A positive
   `bbox_shift` moves the top down by twice the shift, a negative one up.
4. If that box is empty (`y2 - y1 <= 0` or `x2 - x1 <= 0`) or starts left of the frame
   (`x1 < 0`), the S3FD box is used instead: its best detection, clipped at 0 and truncated
   to integers.
5. v1.5's `extra_margin` (10 px) extends the bottom edge, capped at the frame height.

lipstream then clips the box's right edge to the frame width (MuseTalk leaves it: numpy slicing
crops the same pixels, only the 1.5x blend crop's centre would differ); a box left empty by
that clipping counts as a frame without a face.

The adjust range MuseTalk prints ("Manually adjust range: [-a ~ b]") is, over the frames with
a detection, `a = int(mean(y30 - y29))` and `b = int(mean(y29 - y28))` from the unshifted
landmarks: `bbox_shift` values in [-a, b] keep the nose point between landmarks 28 and 30.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from avatars.boxes import EXTRA_MARGIN
from avatars.faces import Box

NO_FACE: Box = (-1, -1, -1, -1)
NOSE_BRIDGE = 29  # the landmark `bbox_shift` moves; 28 above it, 30 below it

BoxSource = str  # "landmarks" | "detector" | "none"


@dataclass(frozen=True)
class FrameBoxes:
    """Boxes of N frames: `face_boxes` (N, 4) int32 (-1 where no face), `sources` per frame
    ("landmarks", "detector" for the S3FD fallback, "none"), and MuseTalk's adjust range for
    `bbox_shift` ([-a, b], None when no frame has a face)."""

    face_boxes: np.ndarray
    sources: tuple[BoxSource, ...]
    adjust_range: tuple[int, int] | None

    def count(self, source: BoxSource) -> int:
        return sum(1 for s in self.sources if s == source)


def detector_box(detections: np.ndarray | None) -> Box | None:
    """The best S3FD detection ((k, 5) x1, y1, x2, y2, score, best first) as MuseTalk takes it:
    clipped at 0, truncated to integers; None when there is none."""
    if detections is None or len(detections) == 0:
        return None
    best = np.clip(np.asarray(detections, dtype=np.float64)[0, :4], 0.0, None)
    x1, y1, x2, y2 = (int(v) for v in best)
    return x1, y1, x2, y2


def landmark_box(landmarks: np.ndarray, bbox_shift: int = 0) -> Box | None:
    """The box from 68 face landmarks (68, 2) with `bbox_shift` on landmark 29's y; None when
    MuseTalk would not use it (empty, or left of the frame)."""
    points = np.asarray(landmarks).astype(np.int32)  # truncation toward zero, as MuseTalk
    if points.shape != (68, 2):
        raise ValueError(f"landmark_box takes (68, 2) landmarks, not {points.shape}")
    ys = points[:, 1].astype(np.int64)
    ys[NOSE_BRIDGE] += int(bbox_shift)
    nose_y = int(ys[NOSE_BRIDGE])
    bottom = int(ys.max())
    top = max(0, nose_y - (bottom - nose_y))
    left, right = int(points[:, 0].min()), int(points[:, 0].max())
    if bottom - top <= 0 or right - left <= 0 or left < 0:
        return None
    return left, top, right, bottom


def frame_box(
    landmarks: np.ndarray,
    detections: np.ndarray | None,
    bbox_shift: int,
    frame_shape: tuple[int, ...],
    extra_margin: int = EXTRA_MARGIN,
) -> tuple[Box, BoxSource]:
    """One frame's face box and where it came from (steps 1-5 of the module docstring, then
    the right edge clipped to the frame)."""
    height, width = int(frame_shape[0]), int(frame_shape[1])
    fallback = detector_box(detections)
    if fallback is None:
        return NO_FACE, "none"
    box = landmark_box(landmarks, bbox_shift)
    source: BoxSource = "landmarks"
    if box is None:
        box, source = fallback, "detector"
    x1, y1, x2, y2 = box
    y2 = min(y2 + int(extra_margin), height)
    x2 = min(x2, width)
    if x2 <= x1 or y2 <= y1:
        return NO_FACE, "none"
    return (x1, y1, x2, y2), source


def adjust_range(landmarks: np.ndarray, has_face: np.ndarray) -> tuple[int, int] | None:
    """MuseTalk's printed `bbox_shift` range [-a, b] over the frames with a face."""
    picked = np.asarray(landmarks)[np.asarray(has_face, dtype=bool)].astype(np.int32)
    if not len(picked):
        return None
    ys = picked[:, :, 1].astype(np.int64)
    below = ys[:, NOSE_BRIDGE + 1] - ys[:, NOSE_BRIDGE]
    above = ys[:, NOSE_BRIDGE] - ys[:, NOSE_BRIDGE - 1]
    n = len(picked)
    return -int(int(below.sum()) / n), int(int(above.sum()) / n)


def face_boxes(
    landmarks: np.ndarray,
    detections: Sequence[np.ndarray | None],
    bbox_shift: int,
    frame_shape: tuple[int, ...],
    extra_margin: int = EXTRA_MARGIN,
) -> FrameBoxes:
    """Boxes of all frames from (N, 68, 2) landmarks and per-frame S3FD detections."""
    landmarks = np.asarray(landmarks)
    n = len(detections)
    if landmarks.shape != (n, 68, 2):
        raise ValueError(f"face_boxes takes ({n}, 68, 2) landmarks, not {landmarks.shape}")
    boxes = np.full((n, 4), -1, dtype=np.int32)
    sources: list[BoxSource] = []
    has_detection = np.zeros(n, dtype=bool)
    for i, dets in enumerate(detections):
        has_detection[i] = detector_box(dets) is not None
        box, source = frame_box(landmarks[i], dets, bbox_shift, frame_shape, extra_margin)
        boxes[i] = box
        sources.append(source)
    return FrameBoxes(boxes, tuple(sources), adjust_range(landmarks, has_detection))
