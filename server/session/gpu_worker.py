"""Which frame worker the server runs, and the GPU scheduler as a server worker.

`create_worker` picks, by `engines.backends.pipeline_backend`:

- the MuseTalk engine on a CUDA device: `GpuWorker`, the GPU scheduler
  (`engines.pipeline.scheduler.GpuScheduler`: cross-session batches on the three-stream
  `GpuPipeline`, built by `engines.backends.build_pipeline`) with the backend the settings
  name (`torch` = eager on the GPU pipeline, `compiled`, `tensorrt`, `auto` = the one the
  engine was built with; one that cannot run is an EngineError saying why);
- anything else (MuseTalk on CPU, the preview engine): the synchronous `FrameWorker`.
  `compiled` / `tensorrt` asked for with MuseTalk on CPU is an EngineError; with the preview
  engine (which `auto` may have chosen) the backend does not apply and is only logged.

`GpuWorker` adds what sessions read from a worker (`step_ema`, the time from a batch's launch
to its frames being on the host) and the server's metrics, and raises `WorkerStopped` where
the scheduler raises `SchedulerStopped`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from engines.backends import build_pipeline, pipeline_backend, pipeline_options
from engines.base import Engine
from engines.pipeline.scheduler import GpuScheduler, SchedulerOptions, SchedulerStopped
from server.metrics import ServerMetrics
from server.session.worker import STEP_EMA_ALPHA, FrameWorker, Worker, WorkerStopped, WorkItem
from server.settings import Settings

log = logging.getLogger(__name__)


def create_worker(
    engine: Engine,
    settings: Settings,
    metrics: ServerMetrics | None = None,
    warm_up: bool = True,
) -> Worker:
    """The server's frame worker for `engine` (see the module docstring); not started.
    `warm_up`: compile / capture the backend's buckets now (`compiled`: minutes)."""
    backend = pipeline_backend(engine, settings.backend)
    if backend is None:
        return FrameWorker(engine, settings.max_batch, metrics)
    t0 = time.perf_counter()
    # I420 straight from the GPU: half the host copy, no colour conversion on the CPU
    options = SchedulerOptions(
        max_batch=settings.max_batch, output="i420", gather_s=settings.gather_ms / 1e3
    )
    pipeline = build_pipeline(
        engine,
        pipeline_options(backend, options.max_batch, options.output, options.max_in_flight),
        warm_up,
    )
    worker = GpuWorker(engine, options, pipeline, metrics)
    log.info(
        "gpu scheduler chosen: backend=%s max_batch=%d gather_ms=%g warm_up_s=%.1f",
        backend,
        settings.max_batch,
        settings.gather_ms,
        time.perf_counter() - t0,
    )
    return worker


class _Timed:
    """A launched batch whose `result()` also reports launch-to-host time."""

    def __init__(self, pending: Any, t0: float, report: Callable[[float, int], None]) -> None:
        self.pending = pending
        self.t0 = t0
        self.report = report

    def result(self) -> list[np.ndarray]:
        frames: list[np.ndarray] = self.pending.result()
        self.report(time.perf_counter() - self.t0, len(frames))
        return frames


class GpuWorker(GpuScheduler):
    """The GPU scheduler with the server worker's extras (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        options: SchedulerOptions | None = None,
        pipeline: Any | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        super().__init__(engine, options, pipeline=pipeline, metrics=metrics)
        self.server_metrics = metrics
        self.step_ema = 0.0
        self.busy_s = 0.0

    def submit(self, item: WorkItem) -> None:
        try:
            super().submit(item)
        except SchedulerStopped as exc:
            raise WorkerStopped(str(exc)) from exc

    def call(
        self, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        try:
            return super().call(fn, *args, **kwargs)
        except SchedulerStopped as exc:
            raise WorkerStopped(str(exc)) from exc

    def _report(self, seconds: float, frames: int) -> None:
        self.busy_s += seconds
        self.step_ema += STEP_EMA_ALPHA * (seconds - self.step_ema)
        if self.server_metrics is not None:
            self.server_metrics.worker_step.observe(seconds)
            self.server_metrics.frames_rendered.inc(frames)

    def _launch(self, batch: list[Any]) -> Any:
        t0 = time.perf_counter()
        kind, payload = super()._launch(batch)
        if kind == "pending":
            return kind, _Timed(payload, t0, self._report)
        self._report(time.perf_counter() - t0, sum(len(i.jobs) for i in batch))
        return kind, payload
