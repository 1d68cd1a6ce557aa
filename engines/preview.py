"""The `preview` engine: no weights, CPU only. It moves the avatar's mouth from loudness.

Features: one loudness per frame, the RMS of the same audio window MuseTalk's frame i hears,
samples [640 i - 1280, 640 i + 1920), with samples outside the audio (before its start, past
its end or past the job's horizon) counting as zeros, so streaming features equal offline ones
wherever the horizon covers the window.

Picture: the avatar frame at the loop position, with the lower third of the face box opened:
the rows below the lip line shift down by up to `max_open` x face height (a smooth vertical
displacement field, tapered at the sides and back to zero below the chin, applied with
`cv2.remap`), and the gap between the lips darkens a little. Silent frames and frames with no
face are the avatar frame unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np

from avatars.avatar import Avatar
from engines.base import (
    LOOKAHEAD_SAMPLES,
    SAMPLES_PER_FRAME,
    Engine,
    EngineError,
    FrameJob,
    frames_in,
)

log = logging.getLogger(__name__)

WINDOW_BEFORE = 2 * SAMPLES_PER_FRAME  # 80 ms before the frame's start
WINDOW = WINDOW_BEFORE + LOOKAHEAD_SAMPLES  # 200 ms in all


@dataclass(frozen=True)
class PreviewOptions:
    """Loudness -> mouth opening."""

    silence_db: float = -45.0  # at or below: mouth closed, frame unchanged
    full_db: float = -15.0  # at or above: mouth fully open
    max_open: float = 0.10  # opening at full loudness, as a fraction of face height
    darken: float = 0.55  # how much the gap between the lips darkens at full opening

    def __post_init__(self) -> None:
        if self.full_db <= self.silence_db:
            raise ValueError("full_db must be above silence_db")
        if not 0.0 < self.max_open <= 0.5:
            raise ValueError(f"max_open must be in (0, 0.5], got {self.max_open}")
        if not 0.0 <= self.darken <= 1.0:
            raise ValueError(f"darken must be in [0, 1], got {self.darken}")


def window_rms(audio: np.ndarray, index: int, horizon: int | None = None) -> float:
    """RMS of frame `index`'s window of `audio[:horizon]` (zeros outside)."""
    end_audio = audio.size if horizon is None else min(horizon, audio.size)
    start = max(0, SAMPLES_PER_FRAME * index - WINDOW_BEFORE)
    stop = min(end_audio, SAMPLES_PER_FRAME * index + LOOKAHEAD_SAMPLES)
    if stop <= start:
        return 0.0
    seg = audio[start:stop].astype(np.float64)
    return float(np.sqrt(np.dot(seg, seg) / WINDOW))


def _box_weights(
    frame_h: int, frame_w: int, box: np.ndarray
) -> tuple[slice, slice, np.ndarray, float]:
    """The region the mouth moves in, its displacement weights (0..1) and the lip row."""
    x1, y1, x2, y2 = (int(v) for v in box)
    w, h = x2 - x1, y2 - y1
    top = y1 + (2 * h) // 3
    bottom = min(frame_h, y2 + h // 6)
    left, right = max(0, x1 + w // 8), min(frame_w, x2 - w // 8)
    lip = top + 0.35 * (y2 - top)  # where the lips part, a third into the lower third
    ys = np.arange(top, bottom, dtype=np.float32)
    rise = np.clip((ys - top) / max(lip - top, 1.0), 0.0, 1.0)
    fall = np.clip((bottom - ys) / max(bottom - y2, 1.0), 0.0, 1.0)
    sy = np.minimum(rise * rise * (3 - 2 * rise), fall * fall * (3 - 2 * fall))
    xs = (np.arange(left, right, dtype=np.float32) - left) / max(right - left - 1, 1)
    tx = np.clip(np.sin(np.pi * xs) * 1.6, 0.0, 1.0)
    return slice(top, bottom), slice(left, right), np.outer(sy, tx).astype(np.float32), lip - top


class PreviewEngine(Engine):
    """Loudness-driven mouth movement on the CPU (no model, no weights)."""

    name: ClassVar[str] = "preview"

    def __init__(self, options: PreviewOptions | None = None) -> None:
        self.options = options or PreviewOptions()
        self._avatars: dict[str, Avatar] = {}
        self._weights: dict[tuple[str, int], tuple[slice, slice, np.ndarray, float]] = {}

    # -- avatars -------------------------------------------------------------------------
    def load_avatar(self, avatar: Avatar) -> None:
        self._avatars[avatar.id] = avatar

    def unload_avatar(self, avatar_id: str) -> None:
        self._avatars.pop(avatar_id, None)
        for key in [k for k in self._weights if k[0] == avatar_id]:
            del self._weights[key]

    def _avatar(self, avatar_id: str) -> Avatar:
        try:
            return self._avatars[avatar_id]
        except KeyError:
            raise EngineError(f"avatar {avatar_id!r} is not loaded") from None

    # -- features ------------------------------------------------------------------------
    def offline_features(self, audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        n = frames_in(audio.size)
        csum = np.concatenate([[0.0], np.cumsum(audio.astype(np.float64) ** 2)])
        idx = np.arange(n) * SAMPLES_PER_FRAME
        start = np.clip(idx - WINDOW_BEFORE, 0, audio.size)
        stop = np.clip(idx + LOOKAHEAD_SAMPLES, 0, audio.size)
        energy = np.maximum(csum[stop] - csum[start], 0.0)
        return np.sqrt(energy / WINDOW).astype(np.float32)

    def stream_features(self, audio: np.ndarray, jobs: Sequence[FrameJob]) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        return np.array([window_rms(audio, j.index, j.horizon) for j in jobs], dtype=np.float32)

    def level(self, rms: float) -> float:
        """Loudness -> opening in [0, 1]."""
        if rms <= 0.0:
            return 0.0
        db = 20.0 * np.log10(rms)
        o = self.options
        return float(np.clip((db - o.silence_db) / (o.full_db - o.silence_db), 0.0, 1.0))

    # -- pictures ------------------------------------------------------------------------
    def render(
        self, avatar_id: str, loop_positions: Sequence[int], features: np.ndarray
    ) -> np.ndarray:
        avatar = self._avatar(avatar_id)
        feats = np.asarray(features, dtype=np.float32).reshape(-1)
        if len(feats) != len(loop_positions):
            raise ValueError(f"{len(loop_positions)} loop positions but {len(feats)} features")
        h, w = avatar.size
        out = np.empty((len(loop_positions), h, w, 3), dtype=np.uint8)
        for k, (pos, rms) in enumerate(zip(loop_positions, feats, strict=True)):
            out[k] = self.render_one(avatar, avatar.loop_frame(int(pos)), float(rms))
        return out

    def render_one(self, avatar: Avatar, frame_index: int, rms: float) -> np.ndarray:
        frame = avatar.frames[frame_index]
        level = self.level(rms)
        box = avatar.face_boxes[frame_index]
        if level <= 0.0 or box[0] < 0:
            return frame
        rows, cols, weights, lip = self._region(avatar, frame_index)
        if weights.size == 0:
            return frame
        box_h = float(box[3] - box[1])
        shift = self.options.max_open * box_h * level
        out = frame.copy()
        region = frame[rows, cols]
        rh, rw = weights.shape
        gx, gy = np.meshgrid(np.arange(rw, dtype=np.float32), np.arange(rh, dtype=np.float32))
        map_y = gy - shift * weights
        moved = cv2.remap(region, gx, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        # darken the gap that opened between the lips: rows lip .. lip + shift
        gap = np.clip(1.0 - np.abs(gy - (lip + shift / 2)) / max(shift / 2, 1.0), 0.0, 1.0)
        shade = 1.0 - self.options.darken * level * gap * weights
        out[rows, cols] = np.clip(moved * shade[..., None], 0, 255).astype(np.uint8)
        return out

    def _region(self, avatar: Avatar, frame_index: int) -> tuple[slice, slice, np.ndarray, float]:
        key = (avatar.id, frame_index)
        cached = self._weights.get(key)
        if cached is None:
            h, w = avatar.size
            cached = _box_weights(h, w, avatar.face_boxes[frame_index])
            self._weights[key] = cached
        return cached
