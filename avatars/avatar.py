"""The prepared avatar: everything the engines need per frame, computed once at registration."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FORMAT_VERSION = 1


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
