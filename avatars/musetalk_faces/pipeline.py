"""MuseTalk v1.5's face preparation, batched: S3FD -> DWPose -> box -> 1.5x crop -> BiSeNet ->
jaw mask, on the GPU where there is one.

`FacePipeline.load(models_dir, device)` returns the pipeline, or None and the reason (which
files are missing, and `lipstream models download`): the caller then prepares with the Haar
box and the geometric mask (`avatars.prepare`'s fallback) and says so. Each model's weights
load strictly; "full" (the published shapes) is tried first, then "tiny" (the random test
weights `lipstream models make-random --size tiny` writes).

MuseTalk itself runs detection and landmarks frame by frame (batch 1); here every stage runs
in batches of `PipelineOptions.batch` frames (crops for BiSeNet). DWPose runs only on frames
where S3FD found a face: MuseTalk computes the other frames' landmarks but never uses them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avatars.boxes import EXTRA_MARGIN, crop_box, crop_region
from avatars.musetalk_faces.boxes import face_boxes
from avatars.musetalk_faces.jaw_mask import (
    CHEEK_WIDTH,
    UPPER_BOUNDARY_RATIO,
    blend_mask_from_parsing,
)

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

S3FD_WEIGHTS = Path("face-detection") / "s3fd-619a316812.pth"
DWPOSE_WEIGHTS = Path("dwpose") / "dw-ll_ucoco_384.pth"
BISENET_WEIGHTS = Path("face-parse-bisent") / "79999_iter.pth"
RESNET_WEIGHTS = Path("face-parse-bisent") / "resnet18-5c106cde.pth"
WEIGHT_FILES = (S3FD_WEIGHTS, DWPOSE_WEIGHTS, BISENET_WEIGHTS, RESNET_WEIGHTS)
GET_WEIGHTS = "Run `lipstream models download` to fetch them."
SIZES = ("full", "tiny")
# progress shares of the stages (ends): detection, landmarks, parsing, masks
STAGE_ENDS = {"detect": 0.3, "landmarks": 0.6, "parse": 0.9, "masks": 1.0}


@dataclass(frozen=True)
class PipelineOptions:
    batch: int = 8  # frames (or crops) per model call
    extra_margin: int = EXTRA_MARGIN
    cheek_width: int = CHEEK_WIDTH
    upper_boundary_ratio: float = UPPER_BOUNDARY_RATIO

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError("PipelineOptions.batch must be >= 1")
        if self.extra_margin < 0:
            raise ValueError("PipelineOptions.extra_margin must be >= 0")
        if not 0 <= self.cheek_width < 256:
            raise ValueError("PipelineOptions.cheek_width must be in [0, 256)")
        if not 0.0 <= self.upper_boundary_ratio < 1.0:
            raise ValueError("PipelineOptions.upper_boundary_ratio must be in [0, 1)")


def missing_weights(models_dir: str | Path) -> list[Path]:
    """The face model files absent under `models_dir` (MuseTalk's layout)."""
    root = Path(models_dir)
    return [rel for rel in WEIGHT_FILES if not (root / rel).is_file()]


def weights_problem(models_dir: str | Path) -> str | None:
    """Why the face models cannot be used (None: all four files are there)."""
    try:  # the weights module's check, where it exists
        from avatars.musetalk_faces.weights import face_weights_problem
    except ImportError:
        missing = missing_weights(models_dir)
        if not missing:
            return None
        names = ", ".join(str(p) for p in missing)
        return f"face model weights missing in {models_dir}: {names}. {GET_WEIGHTS}"
    return face_weights_problem(Path(models_dir))


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_strict(build: Callable[[str], Any], path: Path, device: str) -> tuple[Any, str]:
    """The model `build(size)` with the checkpoint at `path` loaded strictly, for the first of
    SIZES whose shapes match. Raises ValueError when none does."""
    from avatars.musetalk_faces.checkpoints import read_state_dict

    # tensors only: DWPose's published file is a whole training checkpoint (read_state_dict
    # builds nothing else it names); the others are bare state dicts
    state = read_state_dict(path)
    errors = []
    for size in SIZES:
        model = build(size)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            errors.append(f"{size}: {str(exc).splitlines()[0]}")
            continue
        return model.to(device).eval().requires_grad_(False), size  # no autograd graphs
    raise ValueError(f"{path} matches none of the model sizes ({'; '.join(errors)})")


class FacePipeline:
    """MuseTalk's face preparation with loaded S3FD, DWPose and BiSeNet models."""

    name = "musetalk"

    def __init__(
        self,
        s3fd: Any,
        dwpose: Any,
        bisenet: Any,
        device: str,
        options: PipelineOptions | None = None,
        sizes: dict[str, str] | None = None,
    ) -> None:
        self.s3fd, self.dwpose, self.bisenet = s3fd, dwpose, bisenet
        self.device = device
        self.options = options or PipelineOptions()
        self.sizes = sizes or {}

    @classmethod
    def load(
        cls,
        models_dir: str | Path,
        device: str | None = None,
        options: PipelineOptions | None = None,
    ) -> tuple[FacePipeline | None, str]:
        """(the pipeline, "") or (None, the reason it cannot be used)."""
        problem = weights_problem(models_dir)
        if problem is not None:
            return None, problem
        try:
            from avatars.musetalk_faces.bisenet import build_bisenet
            from avatars.musetalk_faces.dwpose import build_dwpose
            from avatars.musetalk_faces.s3fd import build_s3fd
        except ImportError as exc:
            return None, f"the face models cannot be built here ({exc})"
        root = Path(models_dir)
        device = device or default_device()
        try:
            s3fd, s_size = _load_strict(build_s3fd, root / S3FD_WEIGHTS, device)
            dwpose, d_size = _load_strict(build_dwpose, root / DWPOSE_WEIGHTS, device)
            bisenet, b_size = _load_strict(build_bisenet, root / BISENET_WEIGHTS, device)
        except (OSError, ValueError, RuntimeError) as exc:
            return None, f"the face model weights under {root} cannot be loaded: {exc}"
        sizes = {"s3fd": s_size, "dwpose": d_size, "bisenet": b_size}
        log.info("face pipeline loaded", extra={"device": device, **sizes})
        return cls(s3fd, dwpose, bisenet, device, options, sizes), ""

    def run(
        self,
        frames: np.ndarray,
        bbox_shift: int = 0,
        progress: Progress | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray], dict[str, Any]]:
        """(face boxes (N, 4) int32, -1 without a face; blend masks over each face's crop box,
        (0, 0) without a face; info: the adjust range, box sources, per-stage seconds)."""
        from avatars.musetalk_faces.bisenet import parse_faces
        from avatars.musetalk_faces.dwpose import face_landmarks
        from avatars.musetalk_faces.s3fd import detect_faces

        opts, n = self.options, len(frames)
        times: dict[str, float] = {}
        t = time.perf_counter()
        _report(progress, 0.0, "detecting faces")
        detections = detect_faces(self.s3fd, frames, device=self.device, batch=opts.batch)
        times["detect"], t = _lap(t)
        _report(progress, STAGE_ENDS["detect"], "finding face landmarks")

        found = np.flatnonzero([len(d) > 0 for d in detections])
        landmarks = np.zeros((n, 68, 2), dtype=np.float32)
        if len(found):
            picked = frames if len(found) == n else frames[found]  # no copy when all have one
            got = face_landmarks(self.dwpose, picked, device=self.device, batch=opts.batch)
            landmarks[found] = got
        times["landmarks"], t = _lap(t)
        _report(progress, STAGE_ENDS["landmarks"], "parsing faces")

        boxes = face_boxes(landmarks, detections, bbox_shift, frames.shape[1:], opts.extra_margin)
        with_face = np.flatnonzero(boxes.face_boxes[:, 0] >= 0)
        crops = [crop_box(boxes.face_boxes[i]) for i in with_face]
        maps: list[np.ndarray] = []
        for start in range(0, len(with_face), opts.batch):
            chunk = with_face[start : start + opts.batch]
            regions = [crop_region(frames[i], crops[start + j]) for j, i in enumerate(chunk)]
            parsed = parse_faces(self.bisenet, regions, device=self.device, batch=opts.batch)
            maps.extend(np.asarray(parsed))
            done = (start + len(chunk)) / len(with_face)
            _report(progress, _between("landmarks", "parse", done), "parsing faces")
        times["parse"], t = _lap(t)

        masks = [np.zeros((0, 0), dtype=np.uint8) for _ in range(n)]
        for j, i in enumerate(with_face):
            masks[i] = blend_mask_from_parsing(
                maps[j],
                boxes.face_boxes[i],
                crops[j],
                cheek_width=opts.cheek_width,
                upper_boundary_ratio=opts.upper_boundary_ratio,
            )
        times["masks"], t = _lap(t)
        _report(progress, 1.0, "blend masks made")
        info = {
            "face_pipeline": self.name,
            "device": self.device,
            "batch": opts.batch,
            "model_sizes": dict(self.sizes),
            "bbox_shift_range": list(boxes.adjust_range) if boxes.adjust_range else None,
            "boxes_from_landmarks": boxes.count("landmarks"),
            "boxes_from_detector": boxes.count("detector"),
            "frames_without_face": boxes.count("none"),
            "stage_seconds": times,
        }
        return boxes.face_boxes, masks, info


def _lap(t0: float) -> tuple[float, float]:
    now = time.perf_counter()
    return round(now - t0, 4), now


def _between(previous: str, stage: str, fraction: float) -> float:
    start, end = STAGE_ENDS[previous], STAGE_ENDS[stage]
    return start + (end - start) * min(max(fraction, 0.0), 1.0)


def _report(progress: Progress | None, fraction: float, stage: str) -> None:
    if progress is not None:
        progress(fraction, stage)
