"""DWPose whole-body landmarks, the way MuseTalk v1.5 runs them, in plain torch.

MuseTalk (`musetalk/utils/preprocessing.py`) calls mmpose's `inference_topdown(model, frame)`
without a person box, with the config `rtmpose-l_8xb32-270e_coco-ubody-wholebody-384x288.py` and
the checkpoint `dw-ll_ucoco_384.pth`, and keeps whole-body keypoints 23..90 (the 68 face points).
This module does the same steps:

1. the whole frame as the box `[0, 0, w, h]`, its centre and its size x 1.25, widened or
   heightened to the input's 3:4 aspect (`GetBBoxCenterScale`, `TopdownAffine`);
2. the affine crop to 288x384 (w x h) with bilinear sampling and a black border
   (`get_warp_matrix`, `cv2.warpAffine`);
3. normalisation with the ImageNet mean and std in RGB order (the config's `bgr_to_rgb=True`
   turns mmpose's BGR frames into RGB; our frames are RGB already);
4. the network on the crop and on its mirror image (the config's `flip_test=True`): the mirror's
   SimCC vectors are reversed in x, keypoints swapped left <-> right, and the two averaged;
5. SimCC decoding (argmax per axis / split ratio 2; a keypoint whose score is <= 0 decodes to -1)
   and the crop's inverse mapping back to frame pixels.

MuseTalk then casts the points to int32; `face_landmarks` returns float32 and leaves that to
the caller.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from avatars.musetalk_faces.checkpoints import read_state_dict
from avatars.musetalk_faces.dwpose_blocks import CSPNeXt, RTMCCHead

logger = logging.getLogger(__name__)

INPUT_SIZE = (288, 384)  # (w, h) of the crop the network sees
SPLIT_RATIO = 2.0
NUM_KEYPOINTS = 133
FACE_SLICE = slice(23, 91)  # whole-body keypoints of the 68-point face
BOX_PADDING = 1.25
MEAN = (123.675, 116.28, 103.53)  # RGB
STD = (58.395, 57.12, 57.375)
WIDTHS = {"full": 1.0, "tiny": 0.125}


def wholebody_flip_indices() -> list[int]:
    """For each COCO-WholeBody keypoint, the index of its mirror image (left <-> right)."""
    flip = list(range(NUM_KEYPOINTS))

    def pair(a: int, b: int) -> None:
        flip[a], flip[b] = b, a

    for left in range(1, 17, 2):  # body: eyes, ears, shoulders, ... ankles come in (l, r)
        pair(left, left + 1)
    for k in range(3):  # feet: left big toe, small toe, heel <-> right ones
        pair(17 + k, 20 + k)
    face = 23
    mirrored = [(0, 16), (1, 15), (2, 14), (3, 13), (4, 12), (5, 11), (6, 10), (7, 9)]  # jaw
    mirrored += [(17 + k, 26 - k) for k in range(5)]  # brows
    mirrored += [(31, 35), (32, 34)]  # nose base
    mirrored += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    mirrored += [(48 + k, 54 - k) for k in range(3)] + [(55, 59), (56, 58)]  # outer lips
    mirrored += [(60, 64), (61, 63), (65, 67)]  # inner lips
    for a, b in mirrored:
        pair(face + a, face + b)
    for k in range(21):  # hands: left hand 91..111 <-> right hand 112..132
        pair(91 + k, 112 + k)
    return flip


FLIP_INDICES = wholebody_flip_indices()


class RTMPoseWholeBody(nn.Module):
    """CSPNeXt backbone + RTMCC head: a 288x384 crop -> SimCC logits for 133 keypoints."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, widen: float = 1.0) -> None:
        super().__init__()
        self.backbone = CSPNeXt(widen=widen)
        stride = 32
        feature_size = (INPUT_SIZE[0] // stride, INPUT_SIZE[1] // stride)
        self.head = RTMCCHead(
            self.backbone.out_channels, NUM_KEYPOINTS, INPUT_SIZE, feature_size, SPLIT_RATIO
        )
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`crops`: (B, 3, 384, 288) float RGB in 0..255 -> (B, 133, 576), (B, 133, 768)."""
        return self.head(self.backbone((crops - self.mean) / self.std))

    def simcc_flip_test(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The crops and their mirror images through the network, averaged as mmpose does."""
        x, y = self(crops)
        x_flip, y_flip = self(crops.flip(-1))
        x_flip = x_flip[:, FLIP_INDICES].flip(-1)
        y_flip = y_flip[:, FLIP_INDICES]
        return (x + x_flip) * 0.5, (y + y_flip) * 0.5


def build_dwpose(size: str = "full") -> RTMPoseWholeBody:
    """The model with random weights: "full" has the checkpoint's shapes, "tiny" small widths."""
    if size not in WIDTHS:
        raise ValueError(f"unknown DWPose size {size!r}; expected one of {sorted(WIDTHS)}")
    return RTMPoseWholeBody(widen=WIDTHS[size]).eval()


def load_dwpose_state(model: RTMPoseWholeBody, state: Mapping[str, object]) -> None:
    """Load a state dict strictly, bare or wrapped in mmpose's `{"state_dict": ...}`."""
    inner = state.get("state_dict", state)
    if not isinstance(inner, Mapping):
        raise ValueError("DWPose checkpoint: 'state_dict' is not a mapping of tensors")
    expected = set(model.state_dict())
    missing = sorted(expected - set(inner))
    unexpected = sorted(set(inner) - expected)
    if missing or unexpected:
        raise ValueError(
            "DWPose checkpoint does not match RTMPose-l whole-body: "
            f"missing {missing[:5]} ({len(missing)} in all), "
            f"unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    own = model.state_dict()
    wrong = [
        f"{key} {tuple(getattr(inner[key], 'shape', ()))} != {tuple(own[key].shape)}"
        for key in own
        if tuple(getattr(inner[key], "shape", ())) != tuple(own[key].shape)
    ]
    if wrong:
        raise ValueError(f"DWPose checkpoint shapes differ ({len(wrong)} tensors): {wrong[:3]}")
    model.load_state_dict(dict(inner), strict=True)


def load_dwpose(path: Path, size: str = "full", device: str = "cpu") -> RTMPoseWholeBody:
    """Build the model and load `dw-ll_ucoco_384.pth` strictly.

    The published file is a whole mmengine training checkpoint; only its tensors are read
    (`checkpoints.read_state_dict`: nothing else in the pickle is constructed)."""
    model = build_dwpose(size)
    load_dwpose_state(model, read_state_dict(Path(path)))
    logger.info("dwpose loaded", extra={"path": str(path), "size": size})
    return model.to(device).eval()


def frame_box(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale (w, h) of the whole frame as mmpose's person box, padded and 3:4."""
    box = np.array([0, 0, width, height], dtype=np.float32)
    center = (box[2:] + box[:2]) * 0.5
    scale = (box[2:] - box[:2]) * BOX_PADDING
    aspect = INPUT_SIZE[0] / INPUT_SIZE[1]
    w, h = float(scale[0]), float(scale[1])
    fixed = [w, w / aspect] if w > h * aspect else [h * aspect, h]
    return center, np.array(fixed, dtype=np.float32)


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    direction = a - b
    return b + np.array([-direction[1], direction[0]], dtype=np.float32)


def warp_matrix(
    center: np.ndarray,
    scale: np.ndarray,
    output_size: tuple[int, int],
    rot: float = 0.0,
    inverse: bool = False,
) -> np.ndarray:
    """The 2x3 affine map of the box (centre, scale) onto `output_size`, or back (`inverse`).

    Three point pairs, as mmpose's `get_warp_matrix` picks them: the box centre -> the output
    centre, the point half a box width above it -> half an output width above, and a third point
    at a right angle; solved by `cv2.getAffineTransform`.
    """
    rad = math.radians(rot)
    up = np.array([0.0, float(scale[0]) * -0.5])
    src_dir = np.array(
        [
            up[0] * math.cos(rad) - up[1] * math.sin(rad),
            up[0] * math.sin(rad) + up[1] * math.cos(rad),
        ]
    )
    dst_w, dst_h = output_size
    src = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + src_dir
    src[2] = _third_point(src[0], src[1])
    dst = np.zeros((3, 2), dtype=np.float32)
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = dst[0] + np.array([0.0, dst_w * -0.5])
    dst[2] = _third_point(dst[0], dst[1])
    if inverse:
        return cv2.getAffineTransform(dst, src)
    return cv2.getAffineTransform(src, dst)


def crop_frame(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 288x384 crop of one (H, W, 3) frame, with the box centre and scale it used."""
    height, width = frame.shape[:2]
    center, scale = frame_box(width, height)
    matrix = warp_matrix(center, scale, INPUT_SIZE)
    crop = cv2.warpAffine(frame, matrix, INPUT_SIZE, flags=cv2.INTER_LINEAR)
    return crop, center, scale


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, K, Wx), (B, K, Wy) -> keypoints (B, K, 2) in crop pixels and scores (B, K)."""
    locs = np.stack((simcc_x.argmax(-1), simcc_y.argmax(-1)), axis=-1).astype(np.float32)
    scores = np.minimum(simcc_x.max(-1), simcc_y.max(-1))
    locs[scores <= 0.0] = -1.0
    return locs / SPLIT_RATIO, scores


def crop_to_frame(points: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Crop pixels back to frame pixels (mmpose's `add_pred_to_datasample` formula)."""
    size = np.array(INPUT_SIZE, dtype=np.float32)
    return points / size * scale + center - 0.5 * scale


def wholebody_keypoints(
    model: RTMPoseWholeBody, frames: np.ndarray, device: str = "cpu", batch: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """All 133 keypoints (N, 133, 2) in frame pixels and their scores (N, 133)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"frames must be (N, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}"
        )
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    points = np.zeros((len(frames), NUM_KEYPOINTS, 2), dtype=np.float32)
    scores = np.zeros((len(frames), NUM_KEYPOINTS), dtype=np.float32)
    model = model.to(device).eval()
    for start in range(0, len(frames), batch):
        chunk = frames[start : start + batch]
        crops, centers, scales = zip(*(crop_frame(f) for f in chunk), strict=True)
        tensor = torch.from_numpy(np.stack(crops)).to(device).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            simcc_x, simcc_y = model.simcc_flip_test(tensor)
        locs, vals = decode_simcc(simcc_x.float().cpu().numpy(), simcc_y.float().cpu().numpy())
        for i, (center, scale) in enumerate(zip(centers, scales, strict=True)):
            points[start + i] = crop_to_frame(locs[i], center, scale)
            scores[start + i] = vals[i]
    return points, scores


def face_landmarks(
    model: RTMPoseWholeBody, frames: np.ndarray, device: str = "cpu", batch: int = 8
) -> np.ndarray:
    """The 68 face points (whole-body keypoints 23..90) per frame: (N, 68, 2) float32 pixels."""
    points, _ = wholebody_keypoints(model, frames, device=device, batch=batch)
    return np.ascontiguousarray(points[:, FACE_SLICE])
