"""The GPU frame pipeline: audio encoder -> UNet + VAE -> paste-back + I420 -> pinned host.

Three CUDA streams, one per stage, with events between them:

    stream A  log-mel (torch STFT) + whisper encoder, batched across sessions
    stream B  UNet (t = 0) + VAE decode (eager or `compiled` CUDA graphs)
    stream C  paste-back into the avatar frames + RGB -> I420 + copy to pinned host memory

`launch` only enqueues work and returns a `Pending`; the caller (the scheduler thread) can
launch the next batch at once, so batch n+1's encoder and UNet run while batch n is pasted
and copied. `Pending.result()` (on a delivery thread) waits for batch n's last event and
copies its frames out of the pinned buffer, which is then reused.

Streaming features: `engines.pipeline.features.GpuFeaturizer` (the encoder passes of all
sessions in one batch, exactly as `AudioFeaturizer.stream`).
"""

from __future__ import annotations

import functools
import logging
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engines.base import EngineError, FrameJob, check_buckets
from engines.pipeline import paste
from engines.pipeline.compiled import CompiledEncoder, CompiledOptions, CompiledStep, MuseTalkStep
from engines.pipeline.encoder_calls import plan_calls
from engines.pipeline.features import ENCODER_BATCH, GpuFeaturizer
from engines.pipeline.launch import LAUNCH_PHASES, Row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineOptions:
    """How a `GpuPipeline` runs. `buckets`: the batch sizes it captures (compiled: one CUDA
    graph each; tensorrt: the range of its optimisation profile), chosen by
    `engines.backends.batch_buckets`. The compiled backend's switches below are the server's
    defaults, each measured to win end to end (docs/benchmarks.md has the figures)."""

    backend: str  # "torch" (eager), "compiled" or "tensorrt"
    buckets: tuple[int, ...]
    output: str = "i420"  # "i420" (what the video track sends) or "rgb"
    host_slots: int = 3  # pinned output buffers in rotation (batches in flight)
    # compiled: the VAE decoder's upsampling convolutions in their folded 2x2 form
    # (engines.pipeline.fold)
    fold_upsample: bool = True
    # compiled: the UNet's and the VAE decoder's GroupNorms in channels-last form
    # (engines.pipeline.nhwc_norm); False keeps torch's own
    nhwc_norm: bool = True
    compile_encoder: bool = True  # compiled: whisper encoder compiled + one CUDA graph
    # compiled: the log-mel inside the encoder's CUDA graph (one replay per encoder call
    # instead of ~25 eager ops and a replay)
    log_mel_in_graph: bool = True
    # whisper passes per encoder call, padded: results never depend on which other passes
    # shared the call
    encoder_batch: int = ENCODER_BATCH
    # compiled: a CUDA graph per batch size here (e.g. (1, 2, 4, 8)), each step's windows
    # split over them by the times measured at warm-up (engines.pipeline.encoder_calls);
    # empty: every call at encoder_batch
    encoder_batches: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "compiled", "tensorrt"):
            raise ValueError(
                f"pipeline backend must be torch, compiled or tensorrt, got {self.backend!r}"
            )
        check_buckets(self.buckets)
        if self.output not in ("i420", "rgb"):
            raise ValueError(f"output must be i420 or rgb, got {self.output!r}")
        if not 1 <= self.encoder_batch <= 64:
            raise ValueError(f"encoder_batch must be in [1, 64], got {self.encoder_batch}")
        if self.encoder_batches and (
            self.backend != "compiled"
            or not self.compile_encoder
            or not all(1 <= b <= 64 for b in self.encoder_batches)
        ):
            raise ValueError(
                "encoder_batches needs the compiled backend with its compiled encoder and "
                f"batch sizes in [1, 64], got {self.encoder_batches} ({self.backend})"
            )
        if self.host_slots < 2:
            raise ValueError("host_slots must be >= 2 for overlap")


@dataclass(frozen=True)
class BackendModels:
    """The UNet + VAE step and the whisper encoder of a backend built outside this package
    (the tensorrt backend's engines, `engines.tensorrt.engine.load_or_build`)."""

    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents, audio) -> faces
    encoder: Callable[[torch.Tensor], torch.Tensor]  # mel (B, 80, frames) -> (B, steps, 5, d)
    report: dict[str, Any]  # how they were built (cached or not, paths, seconds)


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

    def __init__(
        self, engine: Any, options: PipelineOptions, models: BackendModels | None = None
    ) -> None:
        """`models`: the step and encoder of the tensorrt backend (required there); the
        torch backends build their own from the engine's models."""
        if engine.device.type != "cuda":
            raise EngineError("the GPU pipeline needs the engine on a CUDA device")
        self.engine = engine
        self.options = options
        self.device = engine.device
        self.features = GpuFeaturizer(engine.features, options.encoder_batch)
        self.build_report: dict[str, Any] = {}
        self.encoder: CompiledEncoder | None = None
        self.step: Any
        if options.backend == "tensorrt":
            if models is None:
                raise EngineError(
                    "the tensorrt backend's pipeline needs its engines: build it with "
                    "engines.backends.build_pipeline"
                )
            self.step, self.build_report = models.step, models.report
            self.features.run_encoder = models.encoder
        else:
            self.step = self._torch_step()
        # A features, B UNet+VAE, C paste-back
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
        self._peak_warmed = False  # warm_peak's batches have run
        self.launch_s = dict.fromkeys(LAUNCH_PHASES, 0.0)  # host seconds in launch(), in all

    def _torch_step(self) -> MuseTalkStep | CompiledStep:
        """The UNet + VAE step of the torch backends: eager, or (compiled) with its switches,
        torch.compile'd and captured per bucket; the compiled backend's whisper encoder too."""
        o = self.options
        compiled = o.backend == "compiled"
        step = MuseTalkStep(
            self.engine.unet,
            self.engine.vae,
            fold_upsample=o.fold_upsample and compiled,
            nhwc_norm=o.nhwc_norm and compiled,
        ).to(self.device)
        if not compiled:
            return step
        if o.compile_encoder:
            f = self.features
            self.encoder = CompiledEncoder(
                f.encoder,
                o.encoder_batches or f.encoder_batch,
                int(f.mel_filters.shape[1]),
                2 * f.window_steps,
                log_mel=f.log_mel if o.log_mel_in_graph else None,
                samples=f.window_samples,
            )
            if self.encoder.takes_wave:
                f.run_windows = self.encoder
            else:
                f.run_encoder = self.encoder
        return CompiledStep(step, CompiledOptions(buckets=o.buckets))

    def warm_up(self) -> dict[int, float]:
        """Compile / capture the step's buckets, and run the featurizer once (cuFFT plans,
        encoder kernels), so a session's first frame pays none of it."""
        from engines.base import ready_horizon
        from engines.pipeline.warm_up import progress

        step = self.step if isinstance(self.step, CompiledStep) else None
        buckets = len(step.options.buckets) if step is not None else 0
        progress.begin(
            (self.encoder is not None) + buckets, f"{self.options.backend} backend warm-up"
        )
        if self.encoder is not None:
            t0 = time.perf_counter()
            self.encoder.warm_up()
            if self.encoder.costs:  # several batch sizes: each step's calls by their times
                self.features.plan = functools.partial(plan_calls, costs=self.encoder.costs)
            progress.step_done("whisper encoder", time.perf_counter() - t0)
        jobs = [FrameJob(0, ready_horizon(0), 0)]
        self.features.stream_many([(np.zeros(ready_horizon(0), np.float32), jobs)])
        torch.cuda.synchronize(self.device)
        return step.warm_up() if step is not None else {}  # each bucket a step of the progress

    def avatar(self, avatar_id: str) -> paste.GpuAvatar:
        gav = self._avatars.get(avatar_id)
        if gav is None:
            res = self.engine._resident(avatar_id)
            gav = self._avatars[avatar_id] = paste.upload_avatar(
                res.avatar, self.device, keep_frames=self.options.output == "rgb"
            )
        return gav

    def prepare_avatar(self, avatar_id: str) -> None:
        """Upload the avatar's paste-back data and run one silent frame through every stage,
        so a session's first frame pays no lazy set-up (measured: 240-280 ms instead of
        ~115 ms for the first utterance after start without it); then `warm_peak`."""
        from engines.base import ready_horizon

        jobs = [FrameJob(0, ready_horizon(0), 0)]
        self.launch([Row(avatar_id, 0)], [(np.zeros(ready_horizon(0), np.float32), jobs)]).result()
        self.warm_peak(avatar_id)

    def warm_peak(self, avatar_id: str) -> None:
        """Run the largest batch this pipeline takes, with the most encoder passes a batch
        can need (every frame straddling a 30 s window boundary: two passes each, the longer
        one a full window), once per host slot: GPU caching-allocator blocks, the features'
        staging buffers and this avatar's pinned output buffers then have their peak sizes
        from the start, instead of growing the first time a rare large batch comes (a 10 min
        GPU soak saw GPU memory step up by 3.7 % after 200 s). The batches run once per
        process; a later avatar only gets its output buffers (no GPU work between steps)."""
        from engines.base import ready_horizon

        n = max(self.options.buckets)
        if self._peak_warmed:
            height, width = self.avatar(avatar_id).size
            nbytes = (
                paste.i420_size(height, width)
                if self.options.output == "i420"
                else height * width * 3
            )
            for slot in range(self.options.host_slots):
                self._host_buf(slot, avatar_id, n, nbytes)
            return
        self._peak_warmed = True
        window_frames = self.features.window_steps // 2  # 2 encoder steps per video frame
        first = max(0, window_frames - n // 2 - 2)
        jobs = [FrameJob(first + k, ready_horizon(first + k), k) for k in range(n)]
        rng = np.random.default_rng(0)
        audio = (0.1 * rng.standard_normal(jobs[-1].horizon)).astype(np.float32)
        rows = [Row(avatar_id, k) for k in range(n)]
        pending = [self.launch(rows, [(audio, jobs)]) for _ in range(self.options.host_slots)]
        for p in pending:
            p.result()

    def unload(self, avatar_id: str) -> None:
        self._avatars.pop(avatar_id, None)
        for slot in self._host:  # its pinned output buffers
            for key in [k for k in slot if k[0] == avatar_id]:
                del slot[key]

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
        t0 = time.perf_counter()
        slot = self._free_slots.get()
        self.launch_s["slot_wait"] += time.perf_counter() - t0
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
        t0 = time.perf_counter()
        feats, ev_a = self._features_stage(parts, features)
        t1 = time.perf_counter()
        self.launch_s["features"] += t1 - t0
        if len(feats) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(feats)} feature rows")
        # group rows by avatar (their order inside each block is kept)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.avatar_id, []).append(i)
        faces, frame_idx, ev_b = self._model_stage(rows, groups, feats, ev_a)
        t2 = time.perf_counter()
        self.launch_s["unet_vae"] += t2 - t1
        pending = self._paste_stage(slot, len(rows), groups, faces, frame_idx, ev_b)
        self.launch_s["paste"] += time.perf_counter() - t2
        return pending

    def _features_stage(
        self,
        parts: Sequence[tuple[np.ndarray, Sequence[FrameJob]]] | None,
        features: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Stream A: the batch's features (streaming: from `parts`), and their event."""
        sa = self.streams["A"]
        cur = torch.cuda.current_stream(self.device)  # the caller's: A starts after its work
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
        return feats, ev_a

    def _model_stage(
        self,
        rows: Sequence[Row],
        groups: dict[str, list[int]],
        feats: torch.Tensor,
        ev_a: torch.cuda.Event,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.cuda.Event]:
        """Stream B, after A: UNet + VAE decode of the rows, grouped by avatar. Returns the
        faces (in group order), each avatar's frame indices, and B's event."""
        sb = self.streams["B"]
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
            audio = feats.index_select(0, perm_t).to(self.engine.dtype)
            faces = self.step(lat, audio)
            ev_b = torch.cuda.Event()
            ev_b.record(sb)
        feats.record_stream(sb)
        return faces, frame_idx, ev_b

    def _paste_stage(
        self,
        slot: int,
        n_rows: int,
        groups: dict[str, list[int]],
        faces: torch.Tensor,
        frame_idx: dict[str, torch.Tensor],
        ev_b: torch.cuda.Event,
    ) -> Pending:
        """Stream C, after B: paste-back (+ I420) into each avatar's frames and the copy into
        host slot `slot`'s pinned buffers."""
        sc = self.streams["C"]
        host: dict[str, torch.Tensor] = {}
        order: list[tuple[str, int]] = [("", 0)] * n_rows
        sizes: dict[str, tuple[int, int]] = {}
        with torch.cuda.stream(sc):
            sc.wait_event(ev_b)
            start = 0
            for aid, idx in groups.items():
                gav = self.avatar(aid)
                k = len(idx)
                # frames with no face: the avatar frame as it is (its mask is all zero)
                out = paste.paste_flat(
                    gav, frame_idx[aid], faces[start : start + k], self.options.output == "i420"
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
