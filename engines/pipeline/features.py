"""Streaming (and offline) audio features on the GPU: log-mel + whisper encoder, the passes
of all sessions in one batch.

Follows `engines.musetalk.audio_features.AudioFeaturizer.stream` exactly (the same segment
keys and step rows), with the log-mel computed on the GPU. Encoder batches are padded to a
fixed size, so a pass's result does not depend on which other passes shared its batch; or, with
`plan` set (`engines.pipeline.encoder_calls`), each step's windows go out as the calls of the
least measured time. Only the segments' real samples cross to the device; the zero-padded 30 s
windows are built there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from engines.base import FrameJob

ENCODER_BATCH = 4  # fixed encoder batch (padded): results independent of batch mates
STAGING_SLOTS = 2  # host staging buffers of encoder audio in rotation (one may be uploading)


class GpuFeaturizer:
    """Batched streaming (and offline) features on the GPU from an `AudioFeaturizer`.

    Only the segments' real samples cross to the device (one upload per `encode`); the
    zero-padded windows are built there."""

    def __init__(self, featurizer: Any, encoder_batch: int = ENCODER_BATCH) -> None:
        from engines.musetalk import audio_features as af

        self.af = af
        self.base = featurizer
        self.encoder = featurizer.encoder
        ext = featurizer.extractor
        self.device = featurizer.device
        self.dtype = featurizer.dtype
        self.window_samples = int(featurizer.window_samples)
        self.window_steps = int(featurizer.window_steps)
        self.d_model = int(featurizer.d_model)
        self.n_fft = int(ext.n_fft)
        self.hop = int(ext.hop_length)
        self.mel_filters = torch.from_numpy(np.asarray(ext.mel_filters, np.float32)).to(self.device)
        self.window = torch.hann_window(self.n_fft, device=self.device)
        self.encoder_batch = encoder_batch
        # n windows -> the batch sizes of its encoder calls (None: n padded to encoder_batch)
        self.plan: Callable[[int], Sequence[int]] | None = None
        # mel (B, 80, frames) -> (B, steps, 5, d); the tensorrt backend swaps in its engine
        self.run_encoder: Any = lambda mel: torch.stack(
            self.encoder(mel, output_hidden_states=True).hidden_states, dim=2
        )
        # zero-padded windows (B, window_samples) float32 -> (B, steps, 5, d): log-mel, then
        # run_encoder; the compiled backend swaps in one CUDA graph that does both
        self.run_windows: Any = lambda wave: self.run_encoder(self.log_mel(wave).to(self.dtype))
        # the wave's host side: only the real samples, in pinned buffers in rotation, each
        # written again only once its last upload has left it (its event)
        self._staging: list[torch.Tensor | None] = [None] * STAGING_SLOTS
        self._uploaded: list[torch.cuda.Event | None] = [None] * STAGING_SLOTS
        self._next_staging = 0
        self._staging_lock = threading.Lock()

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, window_samples) float32 -> (B, 80, 2 * window_steps): WhisperFeatureExtractor's
        torch path, per row (each row's own max - 8 floor)."""
        stft = torch.stft(wave, self.n_fft, self.hop, window=self.window, return_complex=True)
        mags = stft[..., :-1].abs() ** 2
        mel = self.mel_filters.T @ mags
        log_spec = torch.clamp(mel, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, peak - 8.0)
        return (log_spec + 4.0) / 4.0

    def _staging_buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        """Slot `slot`'s host buffer (>= nbytes; pinned on CUDA), free to write (call locked)."""
        done = self._uploaded[slot]
        if done is not None:
            done.synchronize()  # its last upload may still be reading it
        buf = self._staging[slot]
        if buf is None or buf.numel() < nbytes:
            size = max(1 << 20, 1 << (nbytes - 1).bit_length())
            pin = self.device.type == "cuda"
            buf = self._staging[slot] = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        return buf

    def window_wave(self, segments: Sequence[np.ndarray], rows: int) -> torch.Tensor:
        """(rows, window_samples) float32 on the device: row i = segments[i], then zeros.

        One upload of [row shift, row end (int64, per row) | the samples back to back], then
        on the device one zero fill and one scatter: sample k (in row r, the first row whose
        end is > k) lands at r * window + k - (r's first sample) = k + shift[r]."""
        if rows < max(1, len(segments)):
            raise ValueError(f"{len(segments)} segments do not fit in {rows} rows")
        arrays = [np.asarray(s, dtype=np.float32) for s in segments]
        lengths = np.zeros(rows, dtype=np.int64)
        for i, a in enumerate(arrays):
            if a.ndim != 1 or a.size > self.window_samples:
                raise ValueError(
                    f"segment {i} has shape {a.shape}, wanted 1-D of <= {self.window_samples}"
                )
            lengths[i] = a.size
        ends = np.cumsum(lengths)
        total = int(ends[-1])
        head = 16 * rows
        nbytes = head + 4 * total
        with self._staging_lock:
            slot = self._next_staging
            self._next_staging = (slot + 1) % STAGING_SLOTS
            buf = self._staging_buffer(slot, nbytes)
            host = buf.numpy()
            meta = host[:head].view(np.int64)
            meta[:rows] = np.arange(rows) * self.window_samples - (ends - lengths)
            meta[rows:] = ends
            np.concatenate(arrays, out=host[head:nbytes].view(np.float32))
            dev = buf[:nbytes].to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
                self._uploaded[slot] = done
            ints = dev[:head].view(torch.int64)
            k = torch.arange(total, device=self.device)
            row = torch.searchsorted(ints[rows:], k, right=True)
            wave = torch.zeros(rows * self.window_samples, dtype=torch.float32, device=self.device)
            # on the CPU `dev` is the staging buffer itself: copied out before it is let go
            wave.index_copy_(0, k + ints[:rows][row], dev[head:].view(torch.float32))
        return wave.view(rows, self.window_samples)

    @torch.no_grad()
    def encode(self, segments: Sequence[np.ndarray]) -> torch.Tensor:
        """(len(segments), window_steps, 5, d) hidden states; segments zero-padded to the window."""
        n = len(segments)
        out = torch.empty(
            (n, self.window_steps, self.af.N_HIDDEN, self.d_model),
            dtype=self.dtype,
            device=self.device,
        )
        if n == 0:
            return out
        sizes = self.call_sizes(n)
        wave = self.window_wave(segments, sum(sizes))
        start = 0
        for size in sizes:  # largest first: the padding rows fall in the last call
            hidden = self.run_windows(wave[start : start + size])
            stop = min(start + size, n)
            out[start:stop] = hidden[: stop - start]
            start += size
        return out

    def call_sizes(self, n: int) -> Sequence[int]:
        """The batch of each encoder call for `n` windows (their sum: the rows, padding too)."""
        if self.plan is not None:
            return self.plan(n)
        return [self.encoder_batch] * -(-n // self.encoder_batch)

    @torch.no_grad()
    def stream_many(self, parts: Sequence[tuple[np.ndarray, Sequence[FrameJob]]]) -> torch.Tensor:
        """Features for several utterances' jobs at once: (total jobs, 50, d)."""
        af = self.af
        w, s_per = self.window_samples, self.window_steps
        segments: list[np.ndarray] = []
        all_rows: list[np.ndarray] = []
        for audio, jobs in parts:
            audio = np.asarray(audio, dtype=np.float32).reshape(-1)
            keys: dict[tuple[int, int], int] = {}
            rows = np.full((len(jobs), af.STEPS_PER_FRAME), -1, dtype=np.int64)
            for j, job in enumerate(jobs):
                if job.horizon > audio.size:
                    raise ValueError(
                        f"frame {job.index} needs {job.horizon} samples, only {audio.size} given"
                    )
                steps = af.frame_steps(job.index)
                valid = (steps >= 0) & (steps < af.steps_in(job.horizon))
                for k in np.flatnonzero(valid):
                    seg = int(steps[k]) // s_per
                    key = (seg, min(job.horizon, (seg + 1) * w))
                    p = keys.get(key)
                    if p is None:
                        p = keys[key] = len(segments)
                        segments.append(audio[seg * w : key[1]])
                    rows[j, k] = p * s_per + int(steps[k]) - seg * s_per
            all_rows.append(rows)
        n_jobs = sum(len(r) for r in all_rows)
        if n_jobs == 0:
            return torch.zeros(
                (0, af.STEPS_PER_FRAME * af.N_HIDDEN, self.d_model),
                dtype=self.dtype,
                device=self.device,
            )
        hidden = (
            self.encode(segments).reshape(-1, af.N_HIDDEN, self.d_model)
            if segments
            else torch.zeros((0, af.N_HIDDEN, self.d_model), dtype=self.dtype, device=self.device)
        )
        table = torch.cat([hidden, hidden.new_zeros((1, af.N_HIDDEN, self.d_model))], dim=0)
        rows = np.concatenate(all_rows)
        rows[rows < 0] = table.shape[0] - 1
        clips = table[torch.from_numpy(rows).to(self.device, non_blocking=True)]
        return clips.reshape(n_jobs, af.STEPS_PER_FRAME * af.N_HIDDEN, self.d_model)
