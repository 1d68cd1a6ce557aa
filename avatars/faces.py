"""Face detection: one box per frame, or None.

MuseTalk finds faces with S3FD and then rebuilds the box from DWPose whole-body landmarks
(`musetalk/utils/preprocessing.py::get_landmark_and_bbox`). Neither ships with weights we may
assume, so our default is OpenCV's Haar cascade (`haarcascade_frontalface_default.xml`, bundled
with opencv-python-headless 4.x, no download). Its boxes are NOT MuseTalk's: they are the
frontal-face rectangle (brows to chin), not the landmark box (mirror of the nose tip above it
down to the lowest landmark). Everything downstream (`boxes`, `masks`, `blend`, the engines)
works from whatever box the detector gives, so a landmark detector can be added later by
registering it here:

    register_detector("dwpose", lambda: MyLandmarkDetector(...))
    detector = make_detector("dwpose")

A detector instance serialises its own calls (OpenCV's cascade is not re-entrant); use one
instance per thread for parallel work.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive
BoxLike = Sequence[int] | np.ndarray  # a Box, a list, or a row of Avatar.face_boxes


@runtime_checkable
class FaceDetector(Protocol):
    """Finds the face to lip-sync in one RGB frame (H, W, 3) uint8."""

    name: str

    def detect(self, frame_rgb: np.ndarray) -> Box | None:
        """The face box (x1, y1, x2, y2) inside the frame, or None if there is no face."""
        ...


@dataclass(frozen=True)
class HaarOptions:
    """Haar cascade settings. Detection runs on a copy scaled to `detect_max_side`."""

    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_face_fraction: float = 0.08  # of the frame's short side
    detect_max_side: int = 640
    equalize: bool = True

    def __post_init__(self) -> None:
        if not self.scale_factor > 1.0:
            raise ValueError("HaarOptions.scale_factor must be > 1")
        if self.min_neighbors < 0:
            raise ValueError("HaarOptions.min_neighbors must be >= 0")
        if not 0.0 < self.min_face_fraction < 1.0:
            raise ValueError("HaarOptions.min_face_fraction must be in (0, 1)")
        if self.detect_max_side < 64:
            raise ValueError("HaarOptions.detect_max_side must be >= 64")


OPENCV_HINT = "OpenCV 5 dropped Haar cascades: install opencv-python-headless>=4.10,<5"


def haar_cascade_path() -> Path:
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if not folder or not hasattr(cv2, "CascadeClassifier"):
        raise RuntimeError(
            f"the default face detector needs OpenCV's Haar cascades ({OPENCV_HINT})"
        )
    return Path(folder) / "haarcascade_frontalface_default.xml"


class HaarFaceDetector:
    """OpenCV's frontal-face Haar cascade; picks the largest face in the frame."""

    name = "haar"

    def __init__(self, options: HaarOptions | None = None) -> None:
        self.options = options or HaarOptions()
        path = haar_cascade_path()
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise RuntimeError(f"cannot load the Haar cascade at {path} ({OPENCV_HINT})")
        self._lock = threading.Lock()

    def detect(self, frame_rgb: np.ndarray) -> Box | None:
        if frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3 or frame_rgb.dtype != np.uint8:
            raise ValueError("detect() takes an (H, W, 3) uint8 RGB frame")
        h, w = frame_rgb.shape[:2]
        opts = self.options
        scale = min(1.0, opts.detect_max_side / max(h, w))
        gray = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            gray = cv2.resize(
                gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA
            )
        if opts.equalize:
            gray = cv2.equalizeHist(gray)
        min_side = max(20, int(min(gray.shape) * opts.min_face_fraction))
        with self._lock:
            found = self._cascade.detectMultiScale(
                gray,
                scaleFactor=opts.scale_factor,
                minNeighbors=opts.min_neighbors,
                minSize=(min_side, min_side),
            )
        if len(found) == 0:
            return None
        x, y, bw, bh = max((tuple(int(v) for v in f) for f in found), key=lambda f: f[2] * f[3])
        box = (
            round(x / scale),
            round(y / scale),
            round((x + bw) / scale),
            round((y + bh) / scale),
        )
        return clip_box(box, h, w)


def clip_box(box: Box, height: int, width: int) -> Box | None:
    """The box clipped to a height x width frame, or None if nothing of it is left."""
    x1, y1, x2, y2 = (int(v) for v in box)
    x1, x2 = max(0, x1), min(width, x2)
    y1, y2 = max(0, y1), min(height, y2)
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def smooth_boxes(boxes: list[Box | None], window: int) -> list[Box | None]:
    """Temporal smoothing: each box becomes the mean of the boxes within `window` frames of it
    (centred, over frames that have a face). Frames without a face stay without one.
    `window` <= 1 returns the boxes unchanged."""
    if window <= 1:
        return list(boxes)
    half = window // 2
    out: list[Box | None] = []
    for i, box in enumerate(boxes):
        if box is None:
            out.append(None)
            continue
        near = [b for b in boxes[max(0, i - half) : i + half + 1] if b is not None]
        x1, y1, x2, y2 = np.mean(np.asarray(near, dtype=np.float64), axis=0).tolist()
        out.append((round(x1), round(y1), round(x2), round(y2)))
    return out


_REGISTRY: dict[str, Callable[[], FaceDetector]] = {"haar": HaarFaceDetector}


def register_detector(name: str, factory: Callable[[], FaceDetector]) -> None:
    """Make a detector available by name (e.g. a landmark detector with its own weights)."""
    if not name or not name.isidentifier():
        raise ValueError(f"bad detector name {name!r}")
    _REGISTRY[name] = factory


def detector_names() -> list[str]:
    return sorted(_REGISTRY)


def make_detector(name: str = "haar") -> FaceDetector:
    """A new detector instance by registered name (default: the Haar cascade)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown face detector {name!r}; known: {detector_names()}") from None
    return factory()
