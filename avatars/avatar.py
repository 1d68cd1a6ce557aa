"""The prepared avatar: everything the engines need per frame, computed once at registration."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FORMAT_VERSION = 1

# which face pipeline prepared an avatar (`avatars.prepare`); avatars stored before the field
# existed were all prepared by the fallback
FACE_PIPELINES = ("musetalk", "fallback")
LEGACY_FACE_PIPELINE_REASON = "registered before face models"
FALLBACK_WARNING = (
    "the lips will be less accurate: this avatar's face box and blend mask come from the "
    "fallback (OpenCV's Haar box and a geometric mask), not MuseTalk's face models"
)


def face_pipeline_fields(meta: dict) -> dict:
    """`face_pipeline`, `face_pipeline_reason` and `bbox_shift_range` of a stored avatar's
    meta; a ready avatar without them reads as "fallback", "registered before face models"."""
    pipeline = meta.get("face_pipeline")
    if pipeline not in FACE_PIPELINES:
        if meta.get("status") != "ready":
            return {"face_pipeline": None, "face_pipeline_reason": None, "bbox_shift_range": None}
        return {
            "face_pipeline": "fallback",
            "face_pipeline_reason": LEGACY_FACE_PIPELINE_REASON,
            "bbox_shift_range": None,
        }
    shift_range = meta.get("bbox_shift_range")
    if not (isinstance(shift_range, list) and len(shift_range) == 2):
        shift_range = None
    return {
        "face_pipeline": pipeline,
        "face_pipeline_reason": meta.get("face_pipeline_reason"),
        "bbox_shift_range": [int(v) for v in shift_range] if shift_range else None,
    }


@dataclass
class Avatar:
    """A prepared avatar, in CPU memory (engines copy what they need to their device).

    Shapes, with N source frames of H x W pixels:
      frames      (N, H, W, 3) uint8 RGB
      face_boxes  (N, 4) int32 x1, y1, x2, y2: detector box with `bbox_shift` and v1.5's
                  `extra_margin` applied, clipped to the frame; all -1 where no face was found
      crop_boxes  (N, 4) int32 x1, y1, x2, y2: the blend crop (1.5x the face box around its
                  centre, as MuseTalk's `get_crop_box`); all -1 where no face
      masks       N arrays (crop_h, crop_w) uint8 0..255: the blurred blend mask over the crop
                  box (weight of the generated face); shape (0, 0) where no face
      latents     (N, 8, 32, 32) float32: cat([latent(crop, rows 128..255 zeroed),
                  latent(crop)]) from the VAE's mode; None until a VAE has made them
    """

    id: str
    name: str
    fps: float
    frames: np.ndarray
    face_boxes: np.ndarray
    crop_boxes: np.ndarray
    masks: list[np.ndarray]
    latents: np.ndarray | None = None
    latents_key: str | None = None  # identifies the VAE weights that made `latents`
    bbox_shift: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    @property
    def has_face(self) -> np.ndarray:
        """(N,) bool: frames that get lip-synced (the others are shown unchanged)."""
        return np.asarray(self.face_boxes[:, 0] >= 0)

    @property
    def loop_length(self) -> int:
        """Length of the idle loop: frames forward then reversed (ping-pong), as MuseTalk."""
        return 1 if self.n_frames == 1 else 2 * self.n_frames

    def loop_frame(self, position: int) -> int:
        """Index into `frames` of idle-loop position `position` (any integer >= 0)."""
        p = position % self.loop_length
        return p if p < self.n_frames else self.loop_length - 1 - p
