"""Avatar preparation: decoded frames -> an `Avatar` (boxes, crops' latents, blend masks).

Two face pipelines, recorded in the avatar's meta as `face_pipeline`:

- "musetalk": MuseTalk v1.5's own preparation (`avatars.musetalk_faces.pipeline`: S3FD,
  DWPose landmark boxes, BiSeNet jaw masks), used when its four weight files are present;
- "fallback": OpenCV's Haar box and the geometric mask (`avatars.faces`, `avatars.masks`),
  with `face_pipeline_reason` saying why (the missing weights). The lips are less accurate:
  MuseTalk's UNet was trained on its own crops. `PrepareOptions.smooth_window` and `.mask`
  apply to this pipeline only (MuseTalk neither smooths boxes nor draws geometric masks).

Stages and their share of `progress` (0..1): faces and blend masks 0..0.7, latents 0.7..1.0
(faces run to 1.0 when no `encode_latents` is given). `prepare_avatar_file` adds decoding in
front (0..0.2, the rest scaled into 0.2..1.0).

Frames where the detector finds no face are kept and shown unchanged (MuseTalk's
`coord_placeholder`): their face and crop boxes are -1, their mask is (0, 0), their latents
zero. An input with no face in any frame is refused with `AvatarInputError`.

Pure functions: no globals are touched, so several preparations may run in parallel threads
(each gets its own detector unless one is passed in).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from avatars.avatar import FORMAT_VERSION, Avatar
from avatars.boxes import EXTRA_MARGIN, crop_box, face_box_v15, face_crop
from avatars.decode import AvatarInputError, DecodeLimits, Source, decode_media
from avatars.faces import Box, FaceDetector, make_detector, smooth_boxes
from avatars.masks import FaceParser, MaskOptions, blend_mask

if TYPE_CHECKING:
    from avatars.musetalk_faces.pipeline import FacePipeline

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
EncodeLatents = Callable[[np.ndarray], np.ndarray]  # (n, 256, 256, 3) uint8 -> (n, 8, 32, 32)

LATENT_SHAPE = (8, 32, 32)
LATENT_BATCH = 16  # crops per encode_latents call (bounds memory, paces progress)
FALLBACK_REASON = "no face pipeline was given (the Haar box and geometric mask were used)"


@dataclass(frozen=True)
class PrepareOptions:
    """Preparation settings beyond the face box shift."""

    extra_margin: int = EXTRA_MARGIN
    smooth_window: int = 0  # temporal box smoothing over this many frames (0/1: none)
    mask: MaskOptions = field(default_factory=MaskOptions)

    def __post_init__(self) -> None:
        if self.extra_margin < 0:
            raise ValueError("PrepareOptions.extra_margin must be >= 0")
        if self.smooth_window < 0:
            raise ValueError("PrepareOptions.smooth_window must be >= 0")


def sub_progress(progress: Progress | None, start: float, end: float) -> Progress | None:
    """`progress` rescaled so that 0..1 maps to start..end."""
    if progress is None:
        return None
    outer = progress

    def inner(fraction: float, stage: str) -> None:
        outer(start + (end - start) * min(max(fraction, 0.0), 1.0), stage)

    return inner


def _report(progress: Progress | None, fraction: float, stage: str) -> None:
    if progress is not None:
        progress(min(max(fraction, 0.0), 1.0), stage)


def detect_faces(
    frames: np.ndarray,
    detector: FaceDetector,
    progress: Progress | None = None,
) -> list[Box | None]:
    """The detector's box for every frame (None where it finds no face)."""
    found: list[Box | None] = []
    n = len(frames)
    for i in range(n):
        found.append(detector.detect(np.ascontiguousarray(frames[i])))
        if progress is not None and (i % 5 == 4 or i == n - 1):
            progress((i + 1) / n, "detecting faces")
    return found


def prepare_avatar(
    frames: np.ndarray,
    fps: float,
    *,
    name: str,
    avatar_id: str,
    bbox_shift: int = 0,
    detector: FaceDetector | None = None,
    encode_latents: EncodeLatents | None = None,
    progress: Progress | None = None,
    options: PrepareOptions | None = None,
    face_parser: FaceParser | None = None,
    face_pipeline: FacePipeline | None = None,
    fallback_reason: str | None = None,
) -> Avatar:
    """Prepare an avatar from decoded RGB frames (N, H, W, 3) uint8.

    With `face_pipeline` (`FacePipeline.load`), boxes and masks are MuseTalk v1.5's (S3FD,
    DWPose, BiSeNet); without it they come from `detector` (default: Haar) and the geometric
    mask, and the avatar's meta records `face_pipeline: "fallback"` with `fallback_reason`.

    `encode_latents` maps face crops (n, 256, 256, 3) uint8 RGB to MuseTalk's UNet latents
    (n, 8, 32, 32) (e.g. `engines.musetalk.vae.encode_crops` bound to a loaded VAE); without it
    the avatar has no latents and the engine computes them when it loads the avatar.
    """
    options = options or PrepareOptions()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError("prepare_avatar takes (N, H, W, 3) uint8 frames with N >= 1")
    if not fps > 0:
        raise ValueError("fps must be > 0")
    n = len(frames)
    use_latents = encode_latents is not None
    masks_end = 0.7 if use_latents else 1.0
    t0 = time.perf_counter()
    faces_progress = sub_progress(progress, 0.0, masks_end)
    if face_pipeline is not None:
        faces = _musetalk_faces(frames, bbox_shift, face_pipeline, faces_progress)
    else:
        reason = fallback_reason or FALLBACK_REASON
        faces = _fallback_faces(
            frames, bbox_shift, detector, options, face_parser, reason, faces_progress
        )
    face_boxes, crop_boxes, masks, face_meta = faces
    t_masks = time.perf_counter()

    latents: np.ndarray | None = None
    if encode_latents is not None:
        latents = compute_latents(
            frames, face_boxes, encode_latents, sub_progress(progress, masks_end, 1.0)
        )
    t_end = time.perf_counter()

    n_faces = int((face_boxes[:, 0] >= 0).sum())
    total = t_end - t0
    stage_seconds = dict(face_meta.pop("stage_seconds"))
    stage_seconds["latents"] = round(t_end - t_masks, 4)
    meta = {
        "format_version": FORMAT_VERSION,
        **face_meta,
        "extra_margin": options.extra_margin,
        "smooth_window": options.smooth_window,
        "n_faces": n_faces,
        "prep_seconds": round(total, 4),
        "prep_seconds_per_frame": round(total / n, 6),
        "stage_seconds": stage_seconds,
    }
    log.info(
        "prepared avatar",
        extra={
            "avatar_id": avatar_id,
            "frames": n,
            "faces": n_faces,
            "face_pipeline": meta["face_pipeline"],
        },
    )
    _report(progress, 1.0, "prepared")
    return Avatar(
        id=avatar_id,
        name=name,
        fps=float(fps),
        frames=frames,
        face_boxes=face_boxes,
        crop_boxes=crop_boxes,
        masks=masks,
        latents=latents,
        bbox_shift=int(bbox_shift),
        meta=meta,
    )


Faces = tuple[np.ndarray, np.ndarray, list[np.ndarray], dict[str, Any]]


def _no_face_error(n: int) -> AvatarInputError:
    return AvatarInputError(
        f"no face found in any of the {n} frame(s): use a clip where one frontal face "
        "is clearly visible"
    )


def _musetalk_faces(
    frames: np.ndarray, bbox_shift: int, pipeline: FacePipeline, progress: Progress | None
) -> Faces:
    """Boxes and masks as MuseTalk v1.5 makes them (S3FD, DWPose, BiSeNet)."""
    face_boxes, masks, info = pipeline.run(frames, bbox_shift, progress)
    if not (face_boxes[:, 0] >= 0).any():
        raise _no_face_error(len(frames))
    crop_boxes = np.full_like(face_boxes, -1)
    for i in np.flatnonzero(face_boxes[:, 0] >= 0):
        crop_boxes[i] = crop_box(face_boxes[i])
    meta = {
        "face_pipeline": "musetalk",
        "face_pipeline_reason": None,
        "bbox_shift_range": info["bbox_shift_range"],
        "detector": "s3fd+dwpose",
        "mask_source": "parsing",
        "mask_mode": "jaw",
        "face_details": {k: v for k, v in info.items() if k != "stage_seconds"},
        "stage_seconds": info["stage_seconds"],
    }
    return face_boxes, crop_boxes, masks, meta


def _fallback_faces(
    frames: np.ndarray,
    bbox_shift: int,
    detector: FaceDetector | None,
    options: PrepareOptions,
    face_parser: FaceParser | None,
    reason: str,
    progress: Progress | None,
) -> Faces:
    """The fallback: the Haar detector's box (or the given detector's) and the geometric mask."""
    t0 = time.perf_counter()
    detector = detector or make_detector()
    detected = detect_faces(frames, detector, sub_progress(progress, 0.0, 0.85))
    detected = smooth_boxes(detected, options.smooth_window)
    if all(b is None for b in detected):
        raise _no_face_error(len(frames))
    t_detect = time.perf_counter()
    face_boxes, crop_boxes, masks = boxes_and_masks(
        frames, detected, bbox_shift, options, face_parser, sub_progress(progress, 0.85, 1.0)
    )
    meta = {
        "face_pipeline": "fallback",
        "face_pipeline_reason": reason,
        "bbox_shift_range": None,
        "detector": getattr(detector, "name", type(detector).__name__),
        "mask_source": options.mask.source,
        "mask_mode": options.mask.mode,
        "stage_seconds": {
            "detect": round(t_detect - t0, 4),
            "masks": round(time.perf_counter() - t_detect, 4),
        },
    }
    return face_boxes, crop_boxes, masks, meta


def boxes_and_masks(
    frames: np.ndarray,
    detected: list[Box | None],
    bbox_shift: int,
    options: PrepareOptions,
    face_parser: FaceParser | None = None,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(face boxes (N, 4), crop boxes (N, 4), blend masks) from the detector's boxes: -1 boxes
    and an empty (0, 0) mask where no face was found."""
    n = len(frames)
    face_boxes = np.full((n, 4), -1, dtype=np.int32)
    crop_boxes = np.full((n, 4), -1, dtype=np.int32)
    masks: list[np.ndarray] = []
    for i, box in enumerate(detected):
        if box is None:
            masks.append(np.zeros((0, 0), dtype=np.uint8))
            continue
        fb = face_box_v15(box, frames.shape[1:], bbox_shift, options.extra_margin)
        cb = crop_box(fb, frames.shape[1:], options.mask.expand)
        face_boxes[i], crop_boxes[i] = fb, cb
        masks.append(blend_mask(fb, cb, frame=frames[i], parser=face_parser, options=options.mask))
        if i % 10 == 9 or i == n - 1:
            _report(progress, (i + 1) / n, "making blend masks")
    return face_boxes, crop_boxes, masks


def compute_latents(
    frames: np.ndarray,
    face_boxes: np.ndarray,
    encode_latents: EncodeLatents,
    progress: Progress | None = None,
) -> np.ndarray:
    """(N, 8, 32, 32) float32 latents of every frame's face crop; zero where no face."""
    n = len(frames)
    out = np.zeros((n, *LATENT_SHAPE), dtype=np.float32)
    with_face = np.flatnonzero(face_boxes[:, 0] >= 0)
    for start in range(0, len(with_face), LATENT_BATCH):
        idx = with_face[start : start + LATENT_BATCH]
        crops = np.stack([face_crop(frames[i], tuple(face_boxes[i])) for i in idx])
        got = np.asarray(encode_latents(crops))
        if got.shape != (len(idx), *LATENT_SHAPE):
            raise ValueError(
                f"encode_latents returned shape {got.shape}, expected {(len(idx), *LATENT_SHAPE)}"
            )
        out[idx] = got.astype(np.float32, copy=False)
        _report(progress, (start + len(idx)) / max(len(with_face), 1), "encoding latents")
    return out


def prepare_avatar_file(
    source: Source,
    *,
    name: str,
    avatar_id: str,
    bbox_shift: int = 0,
    limits: DecodeLimits | None = None,
    detector: FaceDetector | None = None,
    encode_latents: EncodeLatents | None = None,
    progress: Progress | None = None,
    options: PrepareOptions | None = None,
    face_pipeline: FacePipeline | None = None,
    fallback_reason: str | None = None,
) -> Avatar:
    """Decode an uploaded file and prepare it (decoding is 0..0.2 of `progress`)."""
    t0 = time.perf_counter()
    media = decode_media(source, limits, sub_progress(progress, 0.0, 0.2))
    t_decode = time.perf_counter() - t0
    avatar = prepare_avatar(
        media.frames,
        media.fps,
        name=name,
        avatar_id=avatar_id,
        bbox_shift=bbox_shift,
        detector=detector,
        encode_latents=encode_latents,
        progress=sub_progress(progress, 0.2, 1.0),
        options=options,
        face_pipeline=face_pipeline,
        fallback_reason=fallback_reason,
    )
    avatar.meta["source_kind"] = media.kind
    avatar.meta["decode_seconds"] = round(t_decode, 4)
    return avatar
