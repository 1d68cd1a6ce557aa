"""Pictures in the video track's layout: I420, and the cache of unchanged avatar frames.

The tracks carry I420 (`yuv420p`): a (H*3/2, W) array, the Y plane then the U and V planes,
sizes rounded up to even. Frames reach it from two places:

- the frame worker: the GPU scheduler hands back flat I420 buffers (only reshaped here), the
  CPU worker RGB (H, W, 3) frames (converted here with cv2). `AvatarPictures.lay_out` does
  either on the worker thread, so the event loop never converts a colour;
- the avatar itself, for idle and held ticks: `IdleFrames` keeps their I420 pictures, shared by
  every session of the server, so an idle session costs no colour conversion per tick. The
  application makes one `IdleFrames` and hands it to whoever needs it (the sessions' pictures;
  the avatar service, which forgets a deleted avatar's).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import cv2
import numpy as np

from avatars.avatar import Avatar
from engines.base import Engine
from engines.render.video_io import pad_even

log = logging.getLogger(__name__)

IDLE_FRAMES_MAX_BYTES = 256 * 2**20


def to_i420(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H*3/2, W) I420 (odd sizes padded to even); I420 passes through."""
    if image.ndim == 2:
        return image
    return cv2.cvtColor(pad_even(np.ascontiguousarray(image)), cv2.COLOR_RGB2YUV_I420)


def i420_shape(height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of a (height, width) picture in `to_i420`'s layout (sizes rounded up
    to even)."""
    return 3 * ((height + 1) // 2), 2 * ((width + 1) // 2)


def i420_image(flat: np.ndarray, height: int, width: int) -> np.ndarray:
    """A flat I420 buffer of a (height, width) picture as `to_i420` lays it out,
    (H'*3/2, W') with H', W' rounded up to even. Even sizes: a view, no copy. Odd: the Y
    plane gains a repeated last row / column (the chroma planes already have ceil sizes)."""
    ch, cw = (height + 1) // 2, (width + 1) // 2
    n = height * width
    if flat.ndim != 1 or flat.size != n + 2 * ch * cw:
        raise ValueError(
            f"an I420 buffer of {height}x{width} has {n + 2 * ch * cw} bytes, got {flat.shape}"
        )
    if height % 2 == 0 and width % 2 == 0:
        return flat.reshape(height * 3 // 2, width)
    y = np.pad(flat[:n].reshape(height, width), ((0, height % 2), (0, width % 2)), mode="edge")
    return np.concatenate([y.reshape(-1), flat[n:]]).reshape(i420_shape(height, width))


class IdleFrames:
    """The I420 pictures of unchanged avatar frames (idle and held ticks), shared by every
    session of the server. Bounded by `max_bytes` (least recently used out). Used from the
    event loop only."""

    def __init__(self, max_bytes: int = IDLE_FRAMES_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, avatar_id: str, index: int, image: np.ndarray) -> np.ndarray:
        """Frame `index` of the avatar as I420 (read-only); `image` is that frame, converted
        only where the cache does not hold it yet."""
        key = (avatar_id, index)
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit
        out = to_i420(image)
        out.flags.writeable = False
        if out.nbytes <= self.max_bytes:
            self._items[key] = out
            self._bytes += out.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
        return out

    def forget(self, avatar_id: str) -> None:
        """Drop the avatar's pictures (it was deleted)."""
        for key in [k for k in self._items if k[0] == avatar_id]:
            self._bytes -= self._items.pop(key).nbytes

    def __len__(self) -> int:
        return len(self._items)


class AvatarPictures:
    """One session's pictures of its avatar, in the track's layout: the worker's frames laid
    out (`lay_out`, on the worker thread) and idle frames from the shared cache (`idle`)."""

    def __init__(self, avatar: Avatar, engine: Engine, idle_frames: IdleFrames) -> None:
        self.avatar = avatar
        self.engine = engine
        self.idle_frames = idle_frames
        self.height, self.width = (int(v) for v in avatar.frames.shape[1:3])

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of every picture of this avatar."""
        return i420_shape(self.height, self.width)

    def lay_out(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """The worker's frames (RGB (H, W, 3), or the GPU's flat I420) as I420 pictures.
        Raises ValueError for a frame of the wrong size."""
        return [
            i420_image(f, self.height, self.width) if f.ndim == 1 else to_i420(f) for f in frames
        ]

    def idle(self, loop_position: int) -> np.ndarray:
        """The unchanged avatar frame at that idle-loop position (from the cache)."""
        avatar = self.avatar
        return self.idle_frames.get(
            avatar.id,
            avatar.loop_frame(loop_position),
            self.engine.idle_frame(avatar, loop_position),
        )
