"""Backend `compiled`: the MuseTalk UNet + VAE decode step, torch.compile'd once with a
dynamic batch axis, then captured as one CUDA graph per batch bucket.

A batch of n frames runs on the graph of the smallest bucket >= n (inputs padded), so a
lone session pays batch-1 cost and a full card runs at the largest bucket. Compilation
happens once at start (`warm_up`, its time logged); inductor's caches live under the
user cache dir (`TORCHINDUCTOR_CACHE_DIR`), so later starts reuse the generated kernels.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engines.base import EngineError, check_buckets
from engines.pipeline.fold import fold_upsamplers
from engines.pipeline.nhwc_norm import shared_copy, swap_group_norms
from engines.pipeline.warm_up import progress

log = logging.getLogger(__name__)

VAE_SCALING = 0.18215
AUDIO_TOKENS = 50
AUDIO_DIM = 384
LATENT_SHAPE = (8, 32, 32)


def cache_dir() -> Path:
    """Where compiled kernels (inductor) and TensorRT engines are cached."""
    from platformdirs import user_cache_dir

    return Path(
        os.environ.get("LIPSTREAM_CACHE_DIR") or user_cache_dir("lipstream", appauthor=False)
    )


def use_inductor_cache() -> Path:
    """Point inductor's on-disk caches at our cache dir (unless the user set one)."""
    path = cache_dir() / "inductor"
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def positional_encoding(n: int = AUDIO_TOKENS, d_model: int = AUDIO_DIM) -> torch.Tensor:
    """MuseTalk's sinusoidal encoding added to the audio tokens: (1, n, d_model)."""
    position = torch.arange(n, dtype=torch.float32)[:, None]
    div = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )
    pe = torch.zeros(n, d_model)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe[None]


class MuseTalkStep(nn.Module):
    """One generation step: (latents (B, 8, 32, 32), audio (B, 50, 384)) -> faces
    (B, 3, 256, 256) uint8 RGB. UNet at timestep 0, then VAE decode, as MuseTalk v1.5.

    `fold_upsample` runs the VAE decoder's upsampling convolutions in their folded 2x2 form
    (`engines.pipeline.fold`: the same sums, 2.25x fewer multiply-adds there) on a private copy
    of the decoder (~100 MB in fp16), so the eager model stays MuseTalk's.

    `nhwc_norm` swaps the GroupNorms of the UNet and the decoder for their channels-last form
    (`engines.pipeline.nhwc_norm`: the same arithmetic in the activations' own memory order):
    the decoder's on the same private copy, the UNet's on a copy that shares its weights."""

    unet: Any
    vae: Any

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        scaling: float = VAE_SCALING,
        fold_upsample: bool = False,
        nhwc_norm: bool = False,
    ) -> None:
        super().__init__()
        if nhwc_norm:
            unet = shared_copy(unet)  # the same weights, its GroupNorms swapped
            swap_group_norms(unet)
        self.unet = unet
        if fold_upsample or nhwc_norm:
            vae = copy.deepcopy(vae)
        if fold_upsample and fold_upsamplers(vae) == 0:
            raise ValueError("fold_upsample: the VAE has no foldable upsampling convolution")
        if nhwc_norm and swap_group_norms(getattr(vae, "decoder", vae)) == 0:
            raise ValueError("nhwc_norm: the VAE decoder has no GroupNorm")
        self.vae = vae
        self.scaling = scaling
        self.pe: torch.Tensor
        self.timestep: torch.Tensor
        self.register_buffer("pe", positional_encoding(), persistent=False)  # float32
        self.register_buffer("timestep", torch.zeros(1, dtype=torch.long), persistent=False)

    def forward(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        cond = audio + self.pe.to(audio.dtype)
        pred = self.unet(latents, self.timestep, encoder_hidden_states=cond).sample
        return to_faces(self.vae.decode((1 / self.scaling) * pred).sample)


def to_faces(image: torch.Tensor) -> torch.Tensor:
    """The VAE decoder's output in [-1, 1] -> uint8 faces (MuseTalk's (x / 2 + 0.5), clamped,
    x 255, rounded)."""
    return ((image / 2 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8)


@dataclass(frozen=True)
class CompiledOptions:
    buckets: tuple[int, ...]  # the batch sizes captured (engines.backends.batch_buckets)
    compile: bool = True  # False: CUDA graphs over the eager model
    cuda_graphs: bool = True
    channels_last: bool = True
    mode: str = "default"  # torch.compile mode (CUDA graphs are ours, not inductor's)
    dynamic_batch: bool = True  # one compile for every bucket > 1 (batch 1 is its own)

    def __post_init__(self) -> None:
        check_buckets(self.buckets)
        if self.mode not in ("default", "max-autotune-no-cudagraphs"):
            raise ValueError(f"unsupported compile mode {self.mode!r}")


def warm_and_capture(
    fn: Any,
    *args: torch.Tensor,
    warmups: int = 3,
    pool: Any = None,
    stream: torch.cuda.Stream | None = None,
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run `fn(*args)` `warmups` times on a side stream (compiles, cuDNN plans, lazy
    allocations), then capture one call as a CUDA graph on `stream`. Returns (graph, its
    output).

    Graphs that may replay at the same time on different streams must be captured on
    different `stream`s: torch keys its cuBLAS / cuBLASLt workspaces by (handle, stream), so
    every graph captured on one stream (torch's shared default capture stream when `stream`
    is None) bakes in the same workspace, and two of them replaying concurrently write it
    at once (seen as a sticky `cudaErrorInvalidAddressSpace` after minutes of streaming,
    with the encoder graph on stream A beside the UNet+VAE graph on stream B)."""
    device = args[0].device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn(*args)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = fn(*args)
    return graph, out


class _Graph:
    """One captured batch bucket: static input and output buffers plus its CUDA graph."""

    def __init__(
        self,
        fn,
        bucket: int,
        dtype: torch.dtype,
        device: torch.device,
        pool,
        stream: torch.cuda.Stream,
    ) -> None:
        self.bucket = bucket
        self.latents = torch.zeros((bucket, *LATENT_SHAPE), dtype=dtype, device=device)
        self.audio = torch.zeros((bucket, AUDIO_TOKENS, AUDIO_DIM), dtype=dtype, device=device)
        # warmed up by the caller (on random inputs, with a dynamic batch axis)
        self.graph, self.out = warm_and_capture(
            fn, self.latents, self.audio, warmups=0, pool=pool, stream=stream
        )


class CompiledStep:
    """`MuseTalkStep` behind torch.compile and per-bucket CUDA graphs. Call it on the
    current CUDA stream; it returns a fresh tensor (safe to keep across calls)."""

    def __init__(self, step: MuseTalkStep, options: CompiledOptions) -> None:
        if not torch.cuda.is_available():
            raise EngineError("the compiled backend needs a CUDA GPU")
        self.options = options
        self.step = step.eval()
        self.device = next(step.parameters()).device
        self.dtype = next(step.parameters()).dtype
        if self.device.type != "cuda":
            raise EngineError(
                f"the compiled backend needs the model on a CUDA device, got {self.device}"
            )
        if self.options.channels_last:
            self.step.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._fn: Any = self.step
        if self.options.compile:
            use_inductor_cache()
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
            self._fn = torch.compile(self.step, mode=self.options.mode, dynamic=None)
        self._graphs: dict[int, _Graph] = {}
        self._pool: Any = None
        # this step's own capture stream (see warm_and_capture): its buckets never replay
        # concurrently with each other, but they do beside the encoder's graph
        self.capture_stream = torch.cuda.Stream(self.device)
        self.warmup_s: dict[int, float] = {}

    @property
    def max_batch(self) -> int:
        return self.options.buckets[-1]

    def bucket_for(self, n: int) -> int:
        for b in self.options.buckets:
            if b >= n:
                return b
        return self.options.buckets[-1]

    @torch.inference_mode()
    def warm_up(self, buckets: Sequence[int] | None = None) -> dict[int, float]:
        """Compile and capture every bucket (first call per shape compiles). Returns and
        logs seconds per bucket."""
        torch.backends.cudnn.benchmark = True
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        # largest first: with a dynamic batch axis, its compile serves every bucket > 1
        for b in sorted(buckets or self.options.buckets, reverse=True):
            t0 = time.perf_counter()
            self._warm_bucket(b, side)
            self.warmup_s[b] = time.perf_counter() - t0
            log.info(
                "compiled bucket ready: batch=%d seconds=%.1f step=%s",
                b,
                self.warmup_s[b],
                type(self).__name__,
            )
            progress.step_done(f"batch {b}", self.warmup_s[b])  # WarmUpCancelled: shutting down
        return dict(self.warmup_s)

    def _warm_bucket(self, b: int, side: torch.cuda.Stream) -> None:
        """Compile (on `side`) and, with CUDA graphs, capture and replay one bucket."""
        lat, aud = self._warm_inputs(b)
        with torch.cuda.stream(side):
            for _ in range(3):
                self._fn(lat, aud)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        if self.options.cuda_graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            self._graphs[b] = _Graph(
                self._fn, b, self.dtype, self.device, self._pool, self.capture_stream
            )
            self._graphs[b].graph.replay()
            torch.cuda.synchronize(self.device)

    def dynamic_for(self, bucket: int) -> bool:
        """Whether the warm-up marks this bucket's batch axis dynamic (one compile serves
        every bucket > 1). Not where this bucket is the only one > 1 (e.g. `--buckets 48`
        for an offline bench): nothing would share the compile (a static one was quicker on
        2 CPU cores with the tiny config, UNet 47 s against 97 s; on the GPU about the same:
        110 s static on an H100, 109 s dynamic on an H200)."""
        return (
            self.options.compile
            and self.options.dynamic_batch
            and bucket > 1
            and sum(b > 1 for b in self.options.buckets) > 1
        )

    def _warm_inputs(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random (latents, audio) of one bucket for the warm-up, batch axis marked as
        `dynamic_for` says."""
        lat = torch.randn((bucket, *LATENT_SHAPE), device=self.device, dtype=self.dtype)
        aud = torch.randn((bucket, AUDIO_TOKENS, AUDIO_DIM), device=self.device, dtype=self.dtype)
        if self.dynamic_for(bucket):
            torch._dynamo.mark_dynamic(lat, 0)
            torch._dynamo.mark_dynamic(aud, 0)
        return lat, aud

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        n = int(latents.shape[0])
        if n > self.max_batch:
            return torch.cat(
                [
                    self(latents[i : i + self.max_batch], audio[i : i + self.max_batch])
                    for i in range(0, n, self.max_batch)
                ]
            )
        b = self.bucket_for(n)
        g = self._graphs.get(b)
        if g is None:
            if self.options.cuda_graphs:
                log.warning("bucket %d was not warmed up; running without a CUDA graph", b)
            return self._fn(latents.to(self.dtype), audio.to(self.dtype))
        g.latents[:n].copy_(latents)
        g.audio[:n].copy_(audio)
        if n < b:  # keep padding rows deterministic (zeros), whatever ran before
            g.latents[n:].zero_()
            g.audio[n:].zero_()
        g.graph.replay()
        return g.out[:n].clone()


class CompiledEncoder:
    """The whisper encoder of the streaming featurizer, mel (B, n_mels, frames) -> stacked
    hidden states (B, steps, 5, d), torch.compile'd and captured as one CUDA graph per batch
    size in `batch` (one int: the fixed batch the featurizer pads to; several: the featurizer
    splits each step's windows over them, `engines.pipeline.encoder_calls`, by the times per
    call `warm_up` measures into `costs`). Other shapes run the compiled function without a
    graph. The returned tensor is a graph's output buffer: read it (on the same stream) before
    the next call of that batch.

    With `log_mel` (the featurizer's, wave (B, samples) float32 -> mel) and `samples`, the
    graph takes the zero-padded windows themselves and computes the log-mel inside it: the
    ~25 eager ops of a log-mel per encoder call (host time on the worker thread) become
    part of the one replay."""

    def __init__(
        self,
        encoder: nn.Module,
        batch: int | Sequence[int],
        n_mels: int,
        frames: int,
        log_mel: Callable[[torch.Tensor], torch.Tensor] | None = None,
        samples: int = 0,
    ) -> None:
        if not torch.cuda.is_available():
            raise EngineError("the compiled encoder needs a CUDA GPU")
        if log_mel is not None and samples <= 0:
            raise ValueError("a compiled encoder with log_mel needs the window's samples")
        param = next(encoder.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.takes_wave = log_mel is not None
        self.batches = (batch,) if isinstance(batch, int) else tuple(sorted(set(batch)))
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"encoder batches must be >= 1, got {batch!r}")
        self.shapes = {
            b: (b, samples) if self.takes_wave else (b, n_mels, frames) for b in self.batches
        }
        self.shape = self.shapes[self.batches[-1]]
        self.input_dtype = torch.float32 if self.takes_wave else self.dtype

        def run(x: torch.Tensor) -> torch.Tensor:
            mel = log_mel(x).to(self.dtype) if log_mel is not None else x
            return torch.stack(encoder(mel, output_hidden_states=True).hidden_states, dim=2)

        use_inductor_cache()
        self._fn: Any = torch.compile(run, dynamic=False)
        self._eager = run
        # batch -> (graph, its input buffer, its output buffer)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]] = {}
        self.capture_stream = torch.cuda.Stream(self.device)  # its own: see warm_and_capture
        self.costs: dict[int, float] = {}  # batch -> ms per replay (several batches only)
        self.warmup_s = 0.0

    @torch.inference_mode()
    def warm_up(self) -> float:
        t0 = time.perf_counter()
        for b in self.batches:
            mel = torch.zeros(self.shapes[b], dtype=self.input_dtype, device=self.device)
            try:
                graph, out = warm_and_capture(self._fn, mel, stream=self.capture_stream)
            except Exception as exc:  # inductor failure: keep the eager encoder, still graphed
                log.warning("whisper encoder compile failed (%s); using it eagerly", exc)
                self._fn = self._eager
                graph, out = warm_and_capture(self._fn, mel, stream=self.capture_stream)
            self._graphs[b] = (graph, mel, out)
            graph.replay()
        torch.cuda.synchronize(self.device)
        if len(self.batches) > 1:
            self.costs = self._time_replays()
        self.warmup_s = time.perf_counter() - t0
        log.info(
            "compiled whisper encoder ready: batches=%s log_mel_inside=%s ms_per_call=%s "
            "seconds=%.1f",
            ",".join(map(str, self.batches)),
            self.takes_wave,
            {b: round(ms, 3) for b, ms in self.costs.items()},
            self.warmup_s,
        )
        return self.warmup_s

    def _time_replays(self, replays: int = 20) -> dict[int, float]:
        """Each graph's replay time (ms, the median of `replays` timed one by one)."""
        stream = torch.cuda.current_stream(self.device)
        costs = {}
        for b, (graph, _, _) in self._graphs.items():
            times = []
            for _ in range(replays):
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record(stream)
                graph.replay()
                end.record(stream)
                end.synchronize()
                times.append(start.elapsed_time(end))
            costs[b] = sorted(times)[len(times) // 2]
        return costs

    @torch.inference_mode()
    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        got = self._graphs.get(int(mel.shape[0]))
        if got is None or tuple(mel.shape) != self.shapes[int(mel.shape[0])]:
            return self._fn(mel.to(self.input_dtype))
        graph, static_in, out = got
        static_in.copy_(mel)
        graph.replay()
        return out
