"""The GPU frame pipeline: audio encoder -> UNet + VAE -> paste-back + I420 -> pinned host.

Three CUDA streams, one per stage, with events between them:

    stream A  log-mel (torch STFT) + whisper encoder, batched across sessions
    stream B  UNet (t = 0) + VAE decode (eager or `compiled` CUDA graphs)
    stream C  paste-back into the avatar frames + RGB -> I420 + copy to pinned host memory

`launch` only enqueues work and returns a `Pending`; the caller (the scheduler thread) can
launch the next batch at once, so batch n+1's encoder and UNet run while batch n is pasted
and copied. `Pending.result()` (on a delivery thread) waits for batch n's last event and
copies its frames out of the pinned buffer, which is then reused.

Streaming features follow `engines.musetalk.audio_features.AudioFeaturizer.stream` exactly
(the same segment keys and step rows), with the log-mel computed on the GPU and the encoder
passes of all sessions in one batch. Encoder batches are padded to a fixed size, so a
pass's result does not depend on which other passes shared its batch.
"""

from __future__ import annotations

import functools
import logging
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engines.base import EngineError, FrameJob
from engines.gpu import paste
from engines.gpu.compiled import CompiledEncoder, CompiledOptions, CompiledStep, MuseTalkStep

log = logging.getLogger(__name__)

ENCODER_BATCH = 8  # fixed encoder batch (padded): results independent of batch mates
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
        # mel (B, 80, frames) -> (B, steps, 5, d); the tensorrt backend swaps in its engine
        self.run_encoder: Any = lambda mel: torch.stack(
            self.encoder(mel, output_hidden_states=True).hidden_states, dim=2
        )
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
        b = self.encoder_batch
        rows = -(-n // b) * b
        out = torch.empty(
            (n, self.window_steps, self.af.N_HIDDEN, self.d_model),
            dtype=self.dtype,
            device=self.device,
        )
        if n == 0:
            return out
        wave = self.window_wave(segments, rows)
        for start in range(0, rows, b):
            mel = self.log_mel(wave[start : start + b]).to(self.dtype)
            hidden = self.run_encoder(mel)
            stop = min(start + b, n)
            out[start:stop] = hidden[: stop - start]
        return out

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


@dataclass(frozen=True)
class PipelineOptions:
    backend: str = "compiled"  # "torch" (eager) or "compiled"
    buckets: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48)
    output: str = "i420"  # "i420" (what the video track sends) or "rgb"
    decode_from_row: int = 0  # > 0: opt-in partial VAE decode (see MuseTalkStep)
    fold_upsample: bool = True  # compiled: folded VAE upsampling convolutions (engines.gpu.fold)
    compile_encoder: bool = True  # compiled: whisper encoder compiled + one CUDA graph
    tune: bool = False  # compiled: inductor kernel tuning at warm-up (CompiledOptions.tune)
    host_slots: int = 3  # pinned output buffers in rotation (batches in flight)

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "compiled", "tensorrt"):
            raise ValueError(
                f"pipeline backend must be torch, compiled or tensorrt, got {self.backend!r}"
            )
        if self.output not in ("i420", "rgb"):
            raise ValueError(f"output must be i420 or rgb, got {self.output!r}")
        if self.host_slots < 2:
            raise ValueError("host_slots must be >= 2 for overlap")


@dataclass
class Row:
    """One frame of a batch: which avatar, which loop position."""

    avatar_id: str
    loop_position: int


@dataclass
class Pending:
    """A launched batch: wait on `done`, then read each row's frame from `host`."""

    done: torch.cuda.Event
    host: dict[str, torch.Tensor]  # per avatar: (k, frame bytes) pinned
    order: list[tuple[str, int]]  # per row: (avatar id, index in that avatar's block)
    sizes: dict[str, tuple[int, int]]
    output: str
    give_back: Callable[[], None] | None = None  # frees this batch's host slot
    released: bool = field(default=False)

    def result(self) -> list[np.ndarray]:
        """Block until the batch is on the host; frames copied out (I420 (bytes,) or RGB (H, W, 3)).
        The host slot is given back whether or not the batch succeeded."""
        try:
            self.done.synchronize()
            frames = [self.host[a][i].numpy().copy() for a, i in self.order]
        finally:
            self.release()
        if self.output == "rgb":
            frames = [
                f.reshape(*self.sizes[a], 3) for f, (a, _) in zip(frames, self.order, strict=True)
            ]
        return frames

    def release(self) -> None:
        if not self.released and self.give_back is not None:
            self.give_back()
        self.released = True


class GpuPipeline:
    """The three-stream GPU path over a `MuseTalkEngine`'s models and resident avatars."""

    def __init__(self, engine: Any, options: PipelineOptions | None = None) -> None:
        if engine.device.type != "cuda":
            raise EngineError("the GPU pipeline needs the engine on a CUDA device")
        self.engine = engine
        self.options = options or PipelineOptions()
        self.device = engine.device
        self.features = GpuFeaturizer(engine.features)
        step = MuseTalkStep(
            engine.unet,
            engine.vae,
            decode_from_row=self.options.decode_from_row,
            fold_upsample=self.options.fold_upsample and self.options.backend == "compiled",
        ).to(self.device)
        self.step: Any = step
        self.build_report: dict[str, Any] = {}
        self.encoder: CompiledEncoder | None = None
        if self.options.backend == "compiled":
            self.step = CompiledStep(
                step, CompiledOptions(buckets=self.options.buckets, tune=self.options.tune)
            )
            if self.options.compile_encoder:
                self.encoder = CompiledEncoder(
                    self.features.encoder,
                    self.features.encoder_batch,
                    int(self.features.mel_filters.shape[1]),
                    2 * self.features.window_steps,
                )
                self.features.run_encoder = self.encoder
        elif self.options.backend == "tensorrt":
            from engines.gpu.tensorrt import Profile, load_or_build

            if self.options.decode_from_row:
                raise EngineError("decode_from_row is not supported by the tensorrt backend")
            trt_step, trt_encoder, self.build_report = load_or_build(
                engine, Profile(min(self.options.buckets), 16, max(self.options.buckets))
            )
            self.step = trt_step
            self.features.run_encoder = trt_encoder
        self.streams = {k: torch.cuda.Stream(self.device) for k in "ABC"}
        self._avatars: dict[str, paste.GpuAvatar] = {}
        # pinned output buffers by slot; a slot is taken by a launch and given back by its
        # Pending (or by the launch itself if it fails), so a free slot is never in flight
        self._free_slots: queue.Queue[int] = queue.Queue()
        for k in range(self.options.host_slots):
            self._free_slots.put(k)
        self._host: list[dict[tuple[str, int], torch.Tensor]] = [
            {} for _ in range(self.options.host_slots)
        ]

    def warm_up(self) -> dict[int, float]:
        """Compile / capture the step's buckets, and run the featurizer once (cuFFT plans,
        encoder kernels), so a session's first frame pays none of it."""
        from engines.base import ready_horizon

        if self.encoder is not None:
            self.encoder.warm_up()
        jobs = [FrameJob(0, ready_horizon(0), 0)]
        self.features.stream_many([(np.zeros(ready_horizon(0), np.float32), jobs)])
        torch.cuda.synchronize(self.device)
        if isinstance(self.step, CompiledStep):
            return self.step.warm_up()
        return {}

    def avatar(self, avatar_id: str) -> paste.GpuAvatar:
        gav = self._avatars.get(avatar_id)
        if gav is None:
            res = self.engine._resident(avatar_id)
            gav = self._avatars[avatar_id] = paste.upload_avatar(res.avatar, self.device)
        return gav

    def prepare_avatar(self, avatar_id: str) -> None:
        """Upload the avatar's paste-back data and run one silent frame through every stage,
        so a session's first frame pays no lazy set-up (measured: 240-280 ms instead of
        ~115 ms for the first utterance after start without it)."""
        from engines.base import ready_horizon

        jobs = [FrameJob(0, ready_horizon(0), 0)]
        self.launch([Row(avatar_id, 0)], [(np.zeros(ready_horizon(0), np.float32), jobs)]).result()

    def unload(self, avatar_id: str) -> None:
        self._avatars.pop(avatar_id, None)

    def _host_buf(self, slot: int, avatar_id: str, n: int, nbytes: int) -> torch.Tensor:
        key = (avatar_id, nbytes)
        buf = self._host[slot].get(key)
        if buf is None or buf.shape[0] < n:
            buf = torch.empty((max(n, 8), nbytes), dtype=torch.uint8, pin_memory=True)
            self._host[slot][key] = buf
        return buf

    @torch.no_grad()
    def launch(
        self,
        rows: Sequence[Row],
        parts: Sequence[tuple[np.ndarray, Sequence[FrameJob]]] | None = None,
        features: torch.Tensor | None = None,
    ) -> Pending:
        """Enqueue one batch: `rows` in order, their features from `parts` (streaming: each
        (utterance audio, jobs)) or given. Blocks only while all host slots are in flight.
        A launch that raises gives its host slot back (a leaked slot would block every later
        launch: the server would stop rendering)."""
        slot = self._free_slots.get()
        try:
            return self._launch(slot, rows, parts, features)
        except BaseException:
            self._free_slots.put(slot)
            raise

    def _launch(
        self,
        slot: int,
        rows: Sequence[Row],
        parts: Sequence[tuple[np.ndarray, Sequence[FrameJob]]] | None,
        features: torch.Tensor | None,
    ) -> Pending:
        sa, sb, sc = self.streams["A"], self.streams["B"], self.streams["C"]
        cur = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(sa):
            sa.wait_stream(cur)
            if features is None:
                if parts is None:
                    raise ValueError("launch needs `parts` (streaming) or `features`")
                feats = self.features.stream_many(parts)
            else:
                feats = features.to(self.device)
            ev_a = torch.cuda.Event()
            ev_a.record(sa)
        if len(feats) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(feats)} feature rows")
        # group rows by avatar (their order inside each block is kept)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.avatar_id, []).append(i)
        frame_idx: dict[str, torch.Tensor] = {}
        with torch.cuda.stream(sb):
            sb.wait_event(ev_a)
            lat_parts, perm = [], []
            for aid, idx in groups.items():
                res = self.engine._resident(aid)
                av = res.avatar
                fi = torch.tensor(
                    [av.loop_frame(rows[i].loop_position) for i in idx], dtype=torch.long
                )
                frame_idx[aid] = fi.to(self.device, non_blocking=True)
                lat_parts.append(res.latents.index_select(0, frame_idx[aid]))
                perm.extend(idx)
            perm_t = torch.tensor(perm, dtype=torch.long).to(self.device, non_blocking=True)
            lat = torch.cat(lat_parts).to(self.engine.dtype)
            faces = self.step(lat, feats.index_select(0, perm_t).to(self.engine.dtype))
            ev_b = torch.cuda.Event()
            ev_b.record(sb)
        feats.record_stream(sb)
        host: dict[str, torch.Tensor] = {}
        order: list[tuple[str, int]] = [("", 0)] * len(rows)
        sizes: dict[str, tuple[int, int]] = {}
        with torch.cuda.stream(sc):
            sc.wait_event(ev_b)
            start = 0
            for aid, idx in groups.items():
                gav = self.avatar(aid)
                k = len(idx)
                pictures = paste.paste_back(gav, frame_idx[aid], faces[start : start + k])
                # frames with no face: the avatar frame as it is (its mask is all zero)
                out = (
                    paste.rgb_to_i420(pictures)
                    if self.options.output == "i420"
                    else pictures.reshape(k, -1)
                )
                buf = self._host_buf(slot, aid, k, int(out.shape[1]))
                buf[:k].copy_(out, non_blocking=True)
                host[aid] = buf
                sizes[aid] = gav.size
                for j, i in enumerate(idx):
                    order[i] = (aid, j)
                start += k
            done = torch.cuda.Event()
            done.record(sc)
        # keep the batch's tensors alive until stream C is done with them
        for t in (faces, *frame_idx.values()):
            t.record_stream(sc)
        return Pending(
            done=done,
            host=host,
            order=order,
            sizes=sizes,
            output=self.options.output,
            give_back=functools.partial(self._free_slots.put, slot),
        )

    def render(
        self, avatar_id: str, loop_positions: Sequence[int], features: torch.Tensor
    ) -> list[np.ndarray]:
        """Offline: frames for `loop_positions` with given features, batch by batch, overlapped."""
        cap = (
            self.step.max_batch
            if isinstance(self.step, CompiledStep)
            else max(self.options.buckets)
        )
        pending: list[Pending] = []
        frames: list[np.ndarray] = []
        for s in range(0, len(loop_positions), cap):
            rows = [Row(avatar_id, int(p)) for p in loop_positions[s : s + cap]]
            pending.append(self.launch(rows, features=features[s : s + cap]))
            if len(pending) >= self.options.host_slots - 1:
                frames.extend(pending.pop(0).result())
        for p in pending:
            frames.extend(p.result())
        return frames
