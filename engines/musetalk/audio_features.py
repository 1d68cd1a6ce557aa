"""Whisper audio features per video frame, as MuseTalk v1.5 computes them, offline and streaming.

MuseTalk (`musetalk/utils/audio_processor.py`): the whole file is split into encoder-window
segments (30 s for whisper-tiny); each is turned into a log-mel by WhisperFeatureExtractor
(zero-padded to the window) and run through the encoder; the 5 hidden states (embeddings +
4 layers, the last after the final layer norm) are stacked -> (T, 5, 384) at 50 Hz; the
segments are concatenated and trimmed to floor(n / 16000 x 50) steps; 4 zero steps are
put in front and 12 behind; frame i (25 fps) takes steps [2i, 2i + 10) of that padded
sequence -> (10, 5, 384) -> (50, 384) in einops order 'b c h w -> b (c h) w' (step-major).
In unpadded step numbers frame i reads steps 2i-4 .. 2i+5, i.e. t-80 ms .. t+120 ms.

Streaming (`stream_features`): each step a frame reads comes from the window-length segment
that holds it (segments start at multiples of the window, as offline), computed from that
segment's audio cut at the job's horizon h (zeros after it, exactly as the extractor pads a
short last segment). A frame straddling a segment boundary takes its steps from two encoder
passes. The result depends on audio[:h] alone, and equals the offline feature bitwise once h
reaches the end of the segment(s) the frame reads (or the end of the utterance).

Two deliberate differences from MuseTalk's code, both only at edges:
- step and frame counts use integer arithmetic (n // 320, n // 640) where MuseTalk writes
  floor(n / 16000 * 50): float rounding makes MuseTalk's one smaller for ~0.02% of lengths
  (e.g. n = 9280), dropping one last step (or, for frames, n = 18560, one last frame);
- the positional encoding is added where the UNet input is built (`unet_step.py`), not here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engines.base import SAMPLE_RATE, FrameJob, frames_in

logger = logging.getLogger(__name__)

AUDIO_FPS = 50  # encoder steps per second
SAMPLES_PER_STEP = SAMPLE_RATE // AUDIO_FPS  # 320
LEFT_PAD = 4  # zero steps in front (MuseTalk: ceil(50/25) * audio_padding_length_left 2)
RIGHT_PAD = 12  # zero steps behind (ceil(50/25) * 3 * audio_padding_length_right 2)
STEPS_PER_FRAME = 10  # 2 * (2 + 2 + 1)
N_HIDDEN = 5  # embeddings + 4 encoder layers (whisper-tiny)


def steps_in(n_samples: int) -> int:
    """Encoder steps kept for `n_samples` of audio (MuseTalk's trim; integer arithmetic)."""
    return n_samples // SAMPLES_PER_STEP


def frame_steps(index: int) -> np.ndarray:
    """The 10 unpadded step numbers frame `index` reads (negative = left zero pad)."""
    return 2 * index - LEFT_PAD + np.arange(STEPS_PER_FRAME)


@dataclass(frozen=True)
class FeatureOptions:
    """`batch`: encoder passes per encoder call. With 1 (the default) every pass runs alone
    with the same shapes, so features are bitwise a function of the audio alone, whatever
    frames shared a call: batched matmuls differ in the last bit from unbatched ones (seen on
    CPU: batch 1 vs 2 differ by ~1e-6), which would make streaming output depend on how
    the audio was chunked. Larger batches trade that exactness for throughput."""

    batch: int = 1

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")


class AudioFeaturizer:
    """Whisper-encoder features per frame, offline (MuseTalk exact) or streaming."""

    def __init__(self, encoder: Any, extractor: Any, options: FeatureOptions | None = None):
        self.encoder = encoder
        self.extractor = extractor
        self.options = options or FeatureOptions()
        param = next(encoder.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.window_steps = int(encoder.config.max_source_positions)
        self.window_samples = self.window_steps * 2 * int(extractor.hop_length)
        self.d_model = int(encoder.config.d_model)
        if self.window_samples != self.window_steps * SAMPLES_PER_STEP:
            raise ValueError("whisper hop length must be 160 samples (10 ms at 16 kHz)")

    # -- encoder ------------------------------------------------------------------------
    def _mel(self, segment: np.ndarray) -> np.ndarray:
        """Log-mel of one segment, zero-padded to the window by the extractor: (80, 2*steps)."""
        out = self.extractor(segment, sampling_rate=SAMPLE_RATE, return_tensors="np")
        return np.asarray(out.input_features[0], dtype=np.float32)

    @torch.no_grad()
    def encode(self, segments: Sequence[np.ndarray]) -> torch.Tensor:
        """Hidden states of each segment: (len(segments), window_steps, 5, d_model)."""
        out = torch.empty(
            (len(segments), self.window_steps, N_HIDDEN, self.d_model),
            dtype=self.dtype,
            device=self.device,
        )
        b = self.options.batch
        for start in range(0, len(segments), b):
            mels = [self._mel(s) for s in segments[start : start + b]]
            x = torch.from_numpy(np.stack(mels)).to(self.device).to(self.dtype)
            hidden = self.encoder(x, output_hidden_states=True).hidden_states
            if len(hidden) != N_HIDDEN:
                raise ValueError(f"expected {N_HIDDEN} hidden states, encoder gave {len(hidden)}")
            out[start : start + len(mels)] = torch.stack(hidden, dim=2)
        return out

    def _empty(self, n: int) -> torch.Tensor:
        return torch.zeros(
            (n, STEPS_PER_FRAME * N_HIDDEN, self.d_model), dtype=self.dtype, device=self.device
        )

    # -- offline: MuseTalk's get_audio_feature + get_whisper_chunk -----------------------
    @torch.no_grad()
    def offline(self, audio: np.ndarray) -> torch.Tensor:
        """(frames_in(n), 50, d_model) features of a whole clip (float32 mono 16 kHz)."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        n = audio.size
        n_frames = frames_in(n)
        if n == 0:
            return self._empty(0)
        w = self.window_samples
        segments = [audio[i : i + w] for i in range(0, n, w)]
        hidden = self.encode(segments)  # (n_seg, S, 5, d)
        feats = hidden.reshape(-1, N_HIDDEN, self.d_model)[: steps_in(n)]
        zeros = feats.new_zeros((1, N_HIDDEN, self.d_model))
        padded = torch.cat(
            [zeros.expand(LEFT_PAD, -1, -1), feats, zeros.expand(RIGHT_PAD, -1, -1)], dim=0
        )
        starts = 2 * torch.arange(n_frames, device=self.device)
        idx = starts[:, None] + torch.arange(STEPS_PER_FRAME, device=self.device)[None, :]
        clips = padded[idx]  # (n_frames, 10, 5, d)
        return clips.reshape(n_frames, STEPS_PER_FRAME * N_HIDDEN, self.d_model)

    # -- streaming ----------------------------------------------------------------------
    @torch.no_grad()
    def stream(self, audio: np.ndarray, jobs: Sequence[FrameJob]) -> torch.Tensor:
        """(len(jobs), 50, d_model): job j reads only audio[:jobs[j].horizon]."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if not jobs:
            return self._empty(0)
        w, s_per = self.window_samples, self.window_steps
        keys: dict[tuple[int, int], int] = {}  # (segment, end sample) -> pass number
        rows = np.full((len(jobs), STEPS_PER_FRAME), -1, dtype=np.int64)
        for j, job in enumerate(jobs):
            if job.horizon > audio.size:
                raise ValueError(
                    f"frame {job.index} needs {job.horizon} samples, only {audio.size} given"
                )
            steps = frame_steps(job.index)
            valid = (steps >= 0) & (steps < steps_in(job.horizon))
            for k in np.flatnonzero(valid):
                seg = int(steps[k]) // s_per
                key = (seg, min(job.horizon, (seg + 1) * w))
                p = keys.setdefault(key, len(keys))
                rows[j, k] = p * s_per + int(steps[k]) - seg * s_per
        segments = [audio[seg * w : end] for seg, end in keys]
        hidden = self.encode(segments).reshape(-1, N_HIDDEN, self.d_model)
        table = torch.cat([hidden, hidden.new_zeros((1, N_HIDDEN, self.d_model))], dim=0)
        rows[rows < 0] = table.shape[0] - 1  # the zero row
        clips = table[torch.from_numpy(rows).to(self.device)]  # (n, 10, 5, d)
        logger.debug("stream features", extra={"jobs": len(jobs), "passes": len(keys)})
        return clips.reshape(len(jobs), STEPS_PER_FRAME * N_HIDDEN, self.d_model)
