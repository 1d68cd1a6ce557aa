"""The blend mask MuseTalk v1.5 derives from a BiSeNet parsing map ("jaw" mode).

As `musetalk/utils/face_parsing/__init__.py::FaceParsing` (mode "jaw", cheek widths 90 as
v1.5's `realtime_inference.py` passes them) and `musetalk/utils/blending.py::
get_image_prepare_material` compute it, for one face:

1. BiSeNet parses the 1.5x crop (`get_crop_box`, black past the frame) resized to 512 x 512;
   its argmax is a (512, 512) map of 19 classes.
2. Skin (class 1) is dilated once with a 33 x 33 cone: nothing in its top 10 rows, then rows
   widening by one pixel a side per row to 21 px, then 12 rows of that width. Each pixel thus
   grows downwards (towards the jaw and neck) far more than upwards.
3. At the cheeks (columns left of 256 - 90 + 1 and from 256 + 90 on) that dilation is eroded
   twice with a flat 35 x 3 ellipse; in the centre band the dilation is kept as it is.
4. The mask is that region minus the nose (class 10), plus the mouth and lips (11, 12, 13):
   255 there, 0 elsewhere.
5. It is resized back to the crop's size (PIL's default for `Image.resize`: bicubic), only the
   part inside the face box is kept, rows above `upper_boundary_ratio` (0.5) of the crop are
   zeroed, and it is Gaussian-blurred with an odd kernel of `int(0.1 * crop_w // 2 * 2) + 1`.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
from PIL import Image

from avatars.faces import BoxLike
from avatars.masks import blur_kernel_size

PARSE_SIZE = 512
CHEEK_WIDTH = 90  # v1.5's --left_cheek_width / --right_cheek_width
UPPER_BOUNDARY_RATIO = 0.5
SKIN, NOSE = 1, 10
MOUTH_AND_LIPS = (11, 12, 13)
CONE_EMPTY_ROWS = 10  # the cone kernel's rows above its tip
CONE_HALF_WIDTH = 10  # the widest rows reach 10 px either side of the centre column
CONE_SIZE = 33


@lru_cache(maxsize=1)
def cone_kernel() -> np.ndarray:
    """(33, 33) uint8: 1 where row r >= 10 and |column - 16| <= min(r - 10, 10)."""
    rows = np.arange(CONE_SIZE)[:, None]
    offset = np.abs(np.arange(CONE_SIZE)[None, :] - CONE_SIZE // 2)
    reach = np.minimum(rows - CONE_EMPTY_ROWS, CONE_HALF_WIDTH)
    return ((rows >= CONE_EMPTY_ROWS) & (offset <= reach)).astype(np.uint8)


@lru_cache(maxsize=1)
def cheek_kernel() -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))


@lru_cache(maxsize=4)
def cheek_columns(left: int = CHEEK_WIDTH, right: int = CHEEK_WIDTH) -> np.ndarray:
    """(512,) bool: the cheek columns of the 512 map (the left edge's column included)."""
    x = np.arange(PARSE_SIZE)
    centre = PARSE_SIZE // 2
    return (x <= centre - left) | (x >= centre + right)


def jaw_region(parsing: np.ndarray, cheek_width: int = CHEEK_WIDTH) -> np.ndarray:
    """Steps 2-4: a (512, 512) class map -> (512, 512) uint8, 255 where the face is replaced."""
    parsing = np.asarray(parsing)
    if parsing.shape != (PARSE_SIZE, PARSE_SIZE):
        raise ValueError(f"jaw_region takes a (512, 512) parsing map, not {parsing.shape}")
    skin = np.where(parsing == SKIN, 255, 0).astype(np.uint8)
    grown = cv2.dilate(skin, cone_kernel(), iterations=1)
    trimmed = cv2.erode(grown, cheek_kernel(), iterations=2)
    region = np.where(cheek_columns(cheek_width, cheek_width)[None, :], trimmed, grown)
    keep = ((region == 255) & (parsing != NOSE)) | np.isin(parsing, MOUTH_AND_LIPS)
    return np.where(keep, 255, 0).astype(np.uint8)


def blend_mask_from_region(
    region: np.ndarray,
    face_box: BoxLike,
    crop: BoxLike,
    upper_boundary_ratio: float = UPPER_BOUNDARY_RATIO,
) -> np.ndarray:
    """Step 5: the (512, 512) jaw region -> the blurred (crop_h, crop_w) uint8 blend mask."""
    cx1, cy1, cx2, cy2 = (int(v) for v in crop)
    width, height = cx2 - cx1, cy2 - cy1
    if width <= 0 or height <= 0:
        raise ValueError(f"empty crop box {crop}")
    resized = Image.fromarray(np.asarray(region, dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    full = np.asarray(resized)
    x1, y1, x2, y2 = (int(v) for v in face_box)
    fy1, fy2 = max(0, y1 - cy1), min(height, y2 - cy1)
    fx1, fx2 = max(0, x1 - cx1), min(width, x2 - cx1)
    kept = np.zeros((height, width), dtype=np.uint8)
    kept[fy1:fy2, fx1:fx2] = full[fy1:fy2, fx1:fx2]
    kept[: int(height * upper_boundary_ratio)] = 0
    k = blur_kernel_size(width)
    return cv2.GaussianBlur(kept, (k, k), 0)


def blend_mask_from_parsing(
    parsing: np.ndarray,
    face_box: BoxLike,
    crop: BoxLike,
    *,
    cheek_width: int = CHEEK_WIDTH,
    upper_boundary_ratio: float = UPPER_BOUNDARY_RATIO,
) -> np.ndarray:
    """One face's blend mask over its crop box from BiSeNet's (512, 512) class map."""
    return blend_mask_from_region(
        jaw_region(parsing, cheek_width), face_box, crop, upper_boundary_ratio
    )
