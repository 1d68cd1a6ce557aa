"""S3FD, the face detector MuseTalk v1.5 runs first (face_alignment's `sfd` detector).

A VGG-16 trunk (conv1_1 .. conv5_3, fc6/fc7 as convolutions) plus two extra stages (conv6, conv7);
L2-normalised conv3_3 / conv4_3 / conv5_3 features; a classification (face / background) and a
box-regression head on six levels of strides 4 .. 128, anchors of 4x the stride. The first
level's classifier has three background channels, max-pooled into one ("max-out").

Parameter names and shapes are those of `s3fd-619a316812.pth` (face_alignment's and MuseTalk's
`net_s3fd.s3fd`), so the published checkpoint loads with `load_state_dict(strict=True)`.

Detection follows MuseTalk's `FaceAlignment.get_detections_for_batch` -> `SFDDetector.
detect_from_batch` -> `batch_detect`:

- the network sees the frame in the channel order it is given minus (104, 117, 123). MuseTalk
  reads BGR frames and flips them to RGB before that subtraction, so it feeds RGB; face_alignment
  feeds BGR. `detect_faces` takes RGB frames and feeds them as MuseTalk does (`bgr=True`: as
  face_alignment does);
- softmax over (background, face); boxes decoded SSD-style with variances (0.1, 0.2);
- NMS at IoU 0.3 with the "+1" pixel areas of their `bbox.nms`, then boxes scoring over 0.5
  are kept, best first.

MuseTalk gathers candidates over 0.05 before NMS; NMS only ever removes a box in favour of a
higher-scoring one, so taking the candidates over 0.5 first keeps the same boxes (up to the
order of exactly equal scores) and saves work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

MEAN = (104.0, 117.0, 123.0)
VARIANCES = (0.1, 0.2)
NMS_IOU = 0.3
KEEP_SCORE = 0.5
CANDIDATE_SCORE = 0.05  # MuseTalk's pre-NMS gate (see the module docstring)
LEVELS = 6  # strides 4, 8, 16, 32, 64, 128
WIDTHS = {"full": 64, "tiny": 8}  # conv1's width; every other width is a multiple of it


class L2Norm(nn.Module):
    """Per-position L2 normalisation over channels, times a learned per-channel scale."""

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.eps = 1e-10
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return x / norm * self.weight.view(1, -1, 1, 1)


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=pad)


# (name, in, out) of the VGG trunk in width units of conv1 (64 in the published model).
_TRUNK = (
    ("conv1_1", 0, 1), ("conv1_2", 1, 1),
    ("conv2_1", 1, 2), ("conv2_2", 2, 2),
    ("conv3_1", 2, 4), ("conv3_2", 4, 4), ("conv3_3", 4, 4),
    ("conv4_1", 4, 8), ("conv4_2", 8, 8), ("conv4_3", 8, 8),
    ("conv5_1", 8, 8), ("conv5_2", 8, 8), ("conv5_3", 8, 8),
)  # fmt: skip
_POOL_AFTER = frozenset({"conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"})


class S3FD(nn.Module):
    """The S3FD network; `width` 64 is the published model, smaller widths are test stand-ins."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        w = width
        for name, cin, cout in _TRUNK:
            setattr(self, name, _conv(cin * w if cin else 3, cout * w))
        self.fc6 = _conv(8 * w, 16 * w, pad=3)
        self.fc7 = _conv(16 * w, 16 * w, k=1, pad=0)
        self.conv6_1 = _conv(16 * w, 4 * w, k=1, pad=0)
        self.conv6_2 = _conv(4 * w, 8 * w, stride=2)
        self.conv7_1 = _conv(8 * w, 2 * w, k=1, pad=0)
        self.conv7_2 = _conv(2 * w, 4 * w, stride=2)
        self.conv3_3_norm = L2Norm(4 * w, scale=10)
        self.conv4_3_norm = L2Norm(8 * w, scale=8)
        self.conv5_3_norm = L2Norm(8 * w, scale=5)
        sources = (
            ("conv3_3_norm", 4 * w), ("conv4_3_norm", 8 * w), ("conv5_3_norm", 8 * w),
            ("fc7", 16 * w), ("conv6_2", 8 * w), ("conv7_2", 4 * w),
        )  # fmt: skip
        for level, (src, ch) in enumerate(sources):
            setattr(self, f"{src}_mbox_conf", _conv(ch, 4 if level == 0 else 2))
            setattr(self, f"{src}_mbox_loc", _conv(ch, 4))
        self.heads = tuple(src for src, _ in sources)

    def _trunk(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The six feature maps the heads read (before L2Norm)."""
        feats: list[torch.Tensor] = []
        h = x
        for name, _, _ in _TRUNK:
            h = F.relu(getattr(self, name)(h))
            if name in ("conv3_3", "conv4_3", "conv5_3"):
                feats.append(h)
            if name in _POOL_AFTER:
                h = F.max_pool2d(h, 2, 2)
        h = F.relu(self.fc7(F.relu(self.fc6(h))))
        feats.append(h)
        h = F.relu(self.conv6_2(F.relu(self.conv6_1(h))))
        feats.append(h)
        h = F.relu(self.conv7_2(F.relu(self.conv7_1(h))))
        feats.append(h)
        return feats

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[cls1, reg1, ..., cls6, reg6]: class logits (B, 2, h, w) and box offsets (B, 4, h, w)
        per level, strides 4 .. 128."""
        f3, f4, f5, f7, f6_2, f7_2 = self._trunk(x)
        feats = (
            self.conv3_3_norm(f3), self.conv4_3_norm(f4), self.conv5_3_norm(f5), f7, f6_2, f7_2
        )  # fmt: skip
        out: list[torch.Tensor] = []
        for level, (src, feat) in enumerate(zip(self.heads, feats, strict=True)):
            cls = getattr(self, f"{src}_mbox_conf")(feat)
            if level == 0:  # max-out background: three background channels -> one
                c = torch.chunk(cls, 4, 1)
                cls = torch.cat([torch.max(torch.max(c[0], c[1]), c[2]), c[3]], dim=1)
            out += [cls, getattr(self, f"{src}_mbox_loc")(feat)]
        return out


def build_s3fd(size: str = "full") -> S3FD:
    """An S3FD with random weights: `full` has the published shapes, `tiny` (width 8) is for
    fast CPU tests. Load real weights with `load_state_dict(..., strict=True)`."""
    if size not in WIDTHS:
        raise ValueError(f"S3FD size must be 'full' or 'tiny', got {size!r}")
    return S3FD(WIDTHS[size])


def load_s3fd(path: str | Path, size: str = "full", device: str | torch.device = "cpu") -> S3FD:
    """`build_s3fd(size)` with `s3fd-619a316812.pth` loaded strictly (tensors only), eval mode."""
    model = build_s3fd(size)
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


def _decode_level(
    cls: torch.Tensor, reg: torch.Tensor, stride: int, gate: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frame index, boxes (k, 4), scores (k,)) of one level's positions scoring over `gate`,
    decoded as MuseTalk's `batch_decode` does (the same float32 operations in the same order)."""
    score = F.softmax(cls, dim=1)[:, 1]
    b, hh, ww = torch.nonzero(score > gate, as_tuple=True)
    loc = reg[b, :, hh, ww].float()
    anchor = torch.full_like(ww, stride * 4, dtype=torch.float32)
    priors = torch.stack(
        [stride / 2 + ww.float() * stride, stride / 2 + hh.float() * stride, anchor, anchor], dim=1
    )
    boxes = torch.cat(
        (
            priors[:, :2] + loc[:, :2] * VARIANCES[0] * priors[:, 2:],
            priors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCES[1]),
        ),
        1,
    )
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    return b, boxes, score[b, hh, ww]


def nms(dets: np.ndarray, thresh: float = NMS_IOU) -> list[int]:
    """Greedy NMS over (k, 5) rows x1, y1, x2, y2, score: indices kept, best first. Areas and
    overlaps count pixels inclusively ("+1"), as face_alignment's `bbox.nms`."""
    if len(dets) == 0:
        return []
    x1, y1, x2, y2, scores = (dets[:, i] for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        order = rest[ovr <= thresh]
    return keep


def _batches(frames: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    for start in range(0, len(frames), batch):
        yield frames[start : start + batch]


@torch.no_grad()
def detect_faces(
    model: S3FD,
    frames: np.ndarray,
    device: str | torch.device = "cpu",
    batch: int = 8,
    bgr: bool = False,
) -> list[np.ndarray]:
    """Faces in each frame: per frame a (k, 5) float32 array x1, y1, x2, y2, score (k may be 0),
    best first, in frame pixels (not clipped).

    `frames`: (N, H, W, 3) uint8 RGB, all of one size. `bgr=True` feeds BGR as face_alignment
    does; the default feeds RGB as MuseTalk does (see the module docstring). Frames move to
    `device` as uint8 and run in the model's dtype: keep S3FD in float32 as MuseTalk does
    (the L2Norm layers' sums of squares can overflow float16).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (N, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    dtype = next(model.parameters()).dtype
    results: list[np.ndarray] = []
    for chunk in _batches(frames, batch):
        x = torch.from_numpy(np.ascontiguousarray(chunk)).to(device).permute(0, 3, 1, 2).float()
        if bgr:
            x = x.flip(1)
        olist = model((x - mean).to(dtype))
        per_frame: list[list[np.ndarray]] = [[] for _ in range(len(chunk))]
        for level in range(LEVELS):
            b, boxes, scores = _decode_level(
                olist[2 * level].float(), olist[2 * level + 1], 2 ** (level + 2), KEEP_SCORE
            )
            dets = torch.cat([boxes, scores[:, None]], 1).cpu().numpy()
            frame_of = b.cpu().numpy()
            for i in np.unique(frame_of):
                per_frame[int(i)].append(dets[frame_of == i])
        for parts in per_frame:
            dets = np.concatenate(parts) if parts else np.zeros((0, 5), np.float32)
            keep = nms(dets, NMS_IOU)
            results.append(dets[keep].astype(np.float32).reshape(-1, 5))
    return results
