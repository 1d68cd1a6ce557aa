"""The blend mask: how much of the generated face replaces each pixel of the crop box.

MuseTalk v1.5 (`musetalk/utils/blending.py::get_image_prepare_material`, parsing mode "jaw"):

1. segment the crop (the 1.5x square around the face box, padded black past the frame) with
   BiSeNet face parsing: in "jaw" mode, the skin dilated downwards plus the lips, minus the
   nose, trimmed at the cheeks;
2. keep the segmentation only inside the face box;
3. keep only rows at or below `int(crop_height * upper_boundary_ratio)` (0.5: the lower half);
4. Gaussian-blur it with an odd kernel of `int(0.1 * crop_width // 2 * 2) + 1` px (sigma from
   the kernel size, as `cv2.GaussianBlur(mask, (k, k), 0)`).

The parsing weights (`models/face-parse-bisent/79999_iter.pth`) are optional. Without them, step
1 is GEOMETRIC: the ellipse inscribed in the face box (or the whole face box, `shape="box"`)
stands for the segmented face; steps 2-4 are MuseTalk's. So the mask covers the lower half of
the face, fading out over ~5% of the crop side. `FaceParser` is the hook for real parsing: a
callable from the RGB crop to a 0/255 mask of the same size; `load_face_parser` is where a
BiSeNet implementation plugs in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np

from avatars.boxes import CROP_EXPAND, crop_region
from avatars.faces import Box, BoxLike

log = logging.getLogger(__name__)

FACE_PARSE_WEIGHTS = Path("face-parse-bisent") / "79999_iter.pth"


class FaceParsingUnavailable(RuntimeError):
    """Face parsing was asked for but cannot run here (no weights, or no implementation)."""


class FaceParser(Protocol):
    """Segments the face in an RGB crop (h, w, 3) uint8 -> (h, w) uint8, 255 = replace."""

    def __call__(self, crop_rgb: np.ndarray, mode: str, /) -> np.ndarray: ...


@dataclass(frozen=True)
class MaskOptions:
    """How to build the blend mask. `source="geometric"` needs no weights."""

    source: Literal["geometric", "parsing"] = "geometric"
    mode: Literal["jaw", "raw", "neck"] = "jaw"  # MuseTalk's parsing mode (v1.5: "jaw")
    upper_boundary_ratio: float = 0.5
    shape: Literal["ellipse", "box"] = "ellipse"  # geometric stand-in for the parsed face
    expand: float = CROP_EXPAND

    def __post_init__(self) -> None:
        if self.source not in ("geometric", "parsing"):
            raise ValueError(
                f"MaskOptions.source must be geometric or parsing, not {self.source!r}"
            )
        if self.mode not in ("jaw", "raw", "neck"):
            raise ValueError(f"MaskOptions.mode must be jaw, raw or neck, not {self.mode!r}")
        if self.shape not in ("ellipse", "box"):
            raise ValueError(f"MaskOptions.shape must be ellipse or box, not {self.shape!r}")
        if not 0.0 <= self.upper_boundary_ratio < 1.0:
            raise ValueError("MaskOptions.upper_boundary_ratio must be in [0, 1)")
        if not self.expand >= 1.0:
            raise ValueError("MaskOptions.expand must be >= 1")


def load_face_parser(models_dir: str | Path) -> FaceParser:
    """The face parser for `models_dir` (MuseTalk's layout). Raises FaceParsingUnavailable with
    the reason when it cannot be used: use `MaskOptions(source="geometric")` instead."""
    weights = Path(models_dir) / FACE_PARSE_WEIGHTS
    if not weights.is_file():
        raise FaceParsingUnavailable(
            f"face parsing needs {weights}, which does not exist; "
            "use the geometric jaw mask (MaskOptions(source='geometric'))"
        )
    raise FaceParsingUnavailable(
        f"face parsing weights exist at {weights}, but lipstream has no BiSeNet face parser "
        "yet; use the geometric jaw mask (MaskOptions(source='geometric'))"
    )


def blur_kernel_size(crop_width: int) -> int:
    """MuseTalk's odd blur kernel: int(0.1 * width // 2 * 2) + 1."""
    return int(0.1 * crop_width // 2 * 2) + 1


def geometric_face(face_box: Box, crop: Box, shape: Literal["ellipse", "box"]) -> np.ndarray:
    """The stand-in for the parsed face over the crop: 255 inside the ellipse inscribed in the
    face box (or the whole box), 0 elsewhere."""
    cx1, cy1, cx2, cy2 = crop
    out = np.zeros((cy2 - cy1, cx2 - cx1), dtype=np.uint8)
    x1, y1, x2, y2 = (v - o for v, o in zip(face_box, (cx1, cy1, cx1, cy1), strict=True))
    if shape == "box":
        out[max(0, y1) : max(0, y2), max(0, x1) : max(0, x2)] = 255
        return out
    # pixel centres (j + 0.5, i + 0.5) inside the ellipse inscribed in [x1, x2) x [y1, y2)
    rx, ry = (x2 - x1) / 2.0, (y2 - y1) / 2.0
    ex, ey = x1 + rx, y1 + ry
    ii = (np.arange(out.shape[0], dtype=np.float64) + 0.5 - ey) / ry
    jj = (np.arange(out.shape[1], dtype=np.float64) + 0.5 - ex) / rx
    out[(ii[:, None] ** 2 + jj[None, :] ** 2) <= 1.0] = 255
    return out


def blend_mask(
    face_box: BoxLike,
    crop: BoxLike,
    *,
    frame: np.ndarray | None = None,
    parser: FaceParser | None = None,
    options: MaskOptions | None = None,
) -> np.ndarray:
    """The blurred blend mask over `crop` (crop_h, crop_w) uint8 0..255, for one face.

    `crop` is `boxes.crop_box(face_box)`. With `options.source == "parsing"`, `parser` and
    `frame` are required (the crop of `frame` is segmented); otherwise the geometric face is
    used and `frame` is not read.
    """
    options = options or MaskOptions()
    cx1, cy1, cx2, cy2 = (int(v) for v in crop)
    width, height = cx2 - cx1, cy2 - cy1
    if width <= 0 or height <= 0:
        raise ValueError(f"empty crop box {crop}")
    x1, y1, x2, y2 = (int(v) for v in face_box)
    if options.source == "parsing":
        if parser is None or frame is None:
            raise FaceParsingUnavailable(
                "a parsing mask needs a face parser and the frame; "
                "load one with load_face_parser(models_dir) or use the geometric mask"
            )
        parsed = np.asarray(parser(crop_region(frame, (cx1, cy1, cx2, cy2)), options.mode))
        if parsed.shape != (height, width):
            parsed = cv2.resize(parsed, (width, height), interpolation=cv2.INTER_NEAREST)
        face = parsed.astype(np.uint8)
    else:
        face = geometric_face((x1, y1, x2, y2), (cx1, cy1, cx2, cy2), options.shape)
    # keep the segmentation only inside the face box (MuseTalk's crop-then-paste of mask_small)
    inside = np.zeros_like(face)
    fy1, fy2 = max(0, y1 - cy1), min(height, y2 - cy1)
    fx1, fx2 = max(0, x1 - cx1), min(width, x2 - cx1)
    inside[fy1:fy2, fx1:fx2] = face[fy1:fy2, fx1:fx2]
    # keep the talking area: rows from upper_boundary_ratio of the crop down
    top = int(height * options.upper_boundary_ratio)
    inside[:top] = 0
    k = blur_kernel_size(width)
    return cv2.GaussianBlur(inside, (k, k), 0)
