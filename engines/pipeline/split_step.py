"""`MuseTalkStep` as two compiled stages on two CUDA streams (opt-in: `PipelineOptions.
split_stages`, bench variant `compiled-split`).

With one UNet+VAE graph per bucket, the GPU runs a batch's UNet, then its VAE decode, then
the next batch's UNet, all on one stream. The decoder's 30 GroupNorms are memory-bound (0.35-
0.46 of its 1.35-1.41 ms per frame on the H200) while the UNet's and the decoder's
convolutions are compute-bound, so the next batch's UNet may fit beside the decode. Here
each stage has its own compiled function, its own CUDA graph per bucket, graph pool and
capture stream (graphs that replay at the same time must not share a cuBLAS workspace, see
`engines.pipeline.compiled.warm_and_capture`), and the caller runs `unet_stage` on one stream and
`vae_stage` on another, with an event between them.

Buffers: the UNet graph writes its output into a static buffer; `vae_stage` copies it into
the decoder graph's static input on the decoder's stream and records an event, and the next
`unet_stage` waits for that event before its graph overwrites the buffer. The decoder's own
stream keeps its batches in order. Host order is launch order (one scheduler thread): a
batch's `vae_stage` is always enqueued before the next batch's `unet_stage`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from engines.pipeline.compiled import (
    AUDIO_DIM,
    AUDIO_TOKENS,
    LATENT_SHAPE,
    CompiledOptions,
    CompiledStep,
    MuseTalkStep,
    warm_and_capture,
)

log = logging.getLogger(__name__)


class _StageGraphs:
    """One stage's compiled function and its captured buckets (static inputs, graph, output)."""

    def __init__(self, fn: Any, device: torch.device) -> None:
        self.fn = fn
        self.pool: Any = None
        self.capture_stream = torch.cuda.Stream(device)
        self.inputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def capture(self, bucket: int, *shapes_dtypes: tuple[tuple[int, ...], torch.dtype]) -> None:
        device = self.capture_stream.device
        static = tuple(torch.zeros(shape, dtype=dt, device=device) for shape, dt in shapes_dtypes)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph, out = warm_and_capture(
            self.fn, *static, warmups=0, pool=self.pool, stream=self.capture_stream
        )
        self.inputs[bucket], self.graphs[bucket], self.outputs[bucket] = static, graph, out


@dataclass
class StageHandle:
    """What `unet_stage` hands to `vae_stage`: the batch's bucket and size, and its predicted
    latents where no graph ran (else they are in the UNet graph's output buffer)."""

    bucket: int
    n: int
    pred: torch.Tensor | None = None


class SplitCompiledStep(CompiledStep):
    """See the module docstring. A `CompiledStep` (its checks, layout, buckets and tuning
    switch) whose two stages are compiled and captured apart; `__call__` runs both on the
    current stream (for callers that want one step, e.g. the bench's accuracy sections)."""

    def __init__(self, step: MuseTalkStep, options: CompiledOptions | None = None) -> None:
        super().__init__(step, options)  # its whole-step function stays unused (lazy)
        unet_fn: Any = self.step.unet_part
        vae_fn: Any = self.step.vae_part
        if self.options.compile:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
            unet_fn = torch.compile(unet_fn, mode=self.options.mode, dynamic=None)
            vae_fn = torch.compile(vae_fn, mode=self.options.mode, dynamic=None)
        self.unet = _StageGraphs(unet_fn, self.device)
        self.vae = _StageGraphs(vae_fn, self.device)
        self._copied: torch.cuda.Event | None = None  # the last batch's UNet output is copied

    @property
    def capture_streams(self) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        return self.unet.capture_stream, self.vae.capture_stream

    def _warm_bucket(self, b: int, side: torch.cuda.Stream) -> None:
        """Both stages of one bucket: compiled on `side`, then captured and replayed."""
        lat, aud = self._warm_inputs(b)
        with torch.cuda.stream(side):
            for _ in range(3):
                pred = self.unet.fn(lat, aud)
            # the decoder graph's input buffer is contiguous (the UNet's output may be
            # channels-last): warm it on that layout, so its capture compiles nothing
            pred = torch.zeros_like(pred, memory_format=torch.contiguous_format).copy_(pred)
            if self.dynamic_for(b):
                torch._dynamo.mark_dynamic(pred, 0)
            for _ in range(3):
                self.vae.fn(pred)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        if self.options.cuda_graphs:
            self.unet.capture(
                b, ((b, *LATENT_SHAPE), self.dtype), ((b, AUDIO_TOKENS, AUDIO_DIM), self.dtype)
            )
            self.vae.capture(b, (tuple(pred.shape), pred.dtype))
            self.unet.graphs[b].replay()
            self.vae.graphs[b].replay()
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def unet_stage(self, latents: torch.Tensor, audio: torch.Tensor) -> StageHandle:
        """Enqueue the UNet on the current stream (at most `max_batch` rows)."""
        n = int(latents.shape[0])
        if n > self.max_batch:
            raise ValueError(f"a split step takes at most {self.max_batch} rows, got {n}")
        b = self.bucket_for(n)
        graph = self.unet.graphs.get(b)
        if graph is None:
            if self.options.cuda_graphs:
                log.warning("bucket %d was not warmed up; running without a CUDA graph", b)
            pred = self.unet.fn(latents.to(self.dtype), audio.to(self.dtype))
            return StageHandle(b, n, pred)
        if self._copied is not None:  # the last batch's output is out of the buffer
            torch.cuda.current_stream(self.device).wait_event(self._copied)
        static_lat, static_aud = self.unet.inputs[b]
        static_lat[:n].copy_(latents)
        static_aud[:n].copy_(audio)
        if n < b:  # keep padding rows deterministic (zeros), whatever ran before
            static_lat[n:].zero_()
            static_aud[n:].zero_()
        graph.replay()
        return StageHandle(b, n)

    @torch.inference_mode()
    def vae_stage(self, handle: StageHandle) -> torch.Tensor:
        """Enqueue the decode of `handle`'s batch on the current stream, which must wait for
        the stream `unet_stage` ran on first; returns fresh uint8 faces."""
        stream = torch.cuda.current_stream(self.device)
        if handle.pred is not None:
            handle.pred.record_stream(stream)
            return self.vae.fn(handle.pred.contiguous())[: handle.n]  # type: ignore[no-any-return]
        (static_pred,) = self.vae.inputs[handle.bucket]
        static_pred.copy_(self.unet.outputs[handle.bucket])
        copied = torch.cuda.Event()
        copied.record(stream)
        self._copied = copied
        self.vae.graphs[handle.bucket].replay()
        return self.vae.outputs[handle.bucket][: handle.n].clone()

    def __call__(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        if int(latents.shape[0]) > self.max_batch:  # in chunks, each through this call
            return super().__call__(latents, audio)
        return self.vae_stage(self.unet_stage(latents, audio))
