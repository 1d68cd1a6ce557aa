"""The engine interface: audio in, lip-synced frames out. Offline render and the server share it.

Timing (MuseTalk v1.5): 16 kHz audio, 25 fps video, so frame i starts at sample 640*i. Its
audio features cover [t - 80 ms, t + 120 ms), so frame i can be made once samples
[0, 640*i + 1920) of the utterance have arrived: `LOOKAHEAD_SAMPLES` is that 120 ms.

An engine is shared by all sessions on a device. It is stateless per utterance: a session's
`engines.stream.SpeechStream` decides which frames are ready and with how much audio
("horizon"), and the engine computes features and pictures for them, in batches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from avatars.avatar import Avatar

SAMPLE_RATE = 16_000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
LOOKAHEAD_SAMPLES = 1_920  # 120 ms past the frame's start


def check_buckets(buckets: Sequence[int]) -> None:
    """Batch buckets (the compiled backend's CUDA-graph batch sizes) must be positive and
    strictly increasing; ValueError otherwise."""
    if not buckets or any(b < 1 for b in buckets):
        raise ValueError(f"buckets must be positive batch sizes, got {tuple(buckets)}")
    if tuple(sorted(set(buckets))) != tuple(buckets):
        raise ValueError(f"buckets must be strictly increasing, got {tuple(buckets)}")


def frames_in(n_samples: int) -> int:
    """Frames an utterance of `n_samples` yields once complete: floor(duration x 25)."""
    return n_samples // SAMPLES_PER_FRAME


def ready_horizon(index: int) -> int:
    """Samples frame `index` needs before it can be made while the utterance goes on."""
    return SAMPLES_PER_FRAME * index + LOOKAHEAD_SAMPLES


@dataclass(frozen=True)
class FrameJob:
    """One frame to make: its index in the utterance, how much of the utterance's audio its
    features may read (`horizon`, in samples), and where in the avatar's idle loop it sits."""

    index: int
    horizon: int
    loop_position: int


class EngineError(RuntimeError):
    """An engine cannot run as asked (missing weights, unsupported backend, ...)."""


class Engine(ABC):
    """A lip-sync model on one device.

    Features are whatever the engine conditions a frame on (a tensor (n, 50, 384) for
    MuseTalk, a loudness per frame for preview); `render` takes them back. Both support
    `len()` and slicing along the first axis so callers can batch and split them.
    """

    name: ClassVar[str]

    @abstractmethod
    def load_avatar(self, avatar: Avatar) -> None:
        """Make the avatar resident on the engine's device (idempotent). May compute what is
        missing for this engine (e.g. MuseTalk latents) and store it on `avatar`."""

    @abstractmethod
    def unload_avatar(self, avatar_id: str) -> None:
        """Free the device memory held for this avatar (no-op if not loaded)."""

    @abstractmethod
    def offline_features(self, audio: np.ndarray) -> Any:
        """Features for every frame of a whole clip (float32 mono 16 kHz), computed exactly
        as MuseTalk's offline inference does: frames_in(len(audio)) rows."""

    @abstractmethod
    def stream_features(self, audio: np.ndarray, jobs: Sequence[FrameJob]) -> Any:
        """Features for `jobs` of one utterance, each reading only `audio[:job.horizon]`
        (zero beyond it), so the result depends on the audio alone, not on how it arrived."""

    @abstractmethod
    def render(self, avatar_id: str, loop_positions: Sequence[int], features: Any) -> np.ndarray:
        """Lip-synced frames: (n, H, W, 3) uint8 RGB, one per loop position / feature row."""

    def idle_frame(self, avatar: Avatar, loop_position: int) -> np.ndarray:
        """The unchanged avatar frame at that idle-loop position (no model work)."""
        return avatar.frames[avatar.loop_frame(loop_position)]
