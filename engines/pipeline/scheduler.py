"""One GPU scheduler per device: cross-session batching, earliest deadline first, stages
overlapped on CUDA streams, frames handed back without blocking the GPU thread.

`GpuScheduler` is a drop-in for `server.session.worker.FrameWorker` (same methods: start, stop,
alive, submit, cancel, queued, call, acall; the same work items: anything with `key`,
`avatar_id`, `audio`, `jobs`, `deadline`, `done`, `seq`). Each step it

1. waits until fewer than `max_in_flight` batches are on the GPU (this is what makes the batch
   size adapt: a lone session finds the GPU free and runs at batch 1; under load frames pile
   up while earlier batches run, and the next batch takes them all, up to `max_batch`);
2. takes the queued items of all sessions in deadline order, skipping items due more than
   `lookahead_s` after the earliest one (a session whose TTS arrives faster than real
   time cannot starve the others), up to `max_batch` frames;
3. launches them on the `engines.pipeline.gpu.GpuPipeline` (features -> UNet+VAE ->
   paste-back+I420 -> pinned copy, each on its stream) and returns at once to step 1;
4. a delivery thread waits for each batch's last event, copies its frames out and calls
   each item's `done(item, frames, None)`.

Without a GPU pipeline (CPU, preview engine) step 3 runs the engine synchronously, as the
FrameWorker does, so the same scheduler serves tests and CPU machines. `engines.backends.
create_scheduler` builds one with the pipeline its engine and backend call for.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.base import Engine
from engines.pipeline.launch import LAUNCH_PHASES, Row
from engines.pipeline.work_queue import WorkQueue

log = logging.getLogger(__name__)


# On the H200, 20 ms took the sessions holding 25 fps with a p99 frame interval <= 60 ms from
# 12 to 16 (bench/results/stream_H200_2026-12-01_gather20.json, docs/benchmarks.md)
GATHER_S = 0.02
# a session that submitted work this recently is "active": a gather waits for each active
# session's next frame (up to `gather_s`), not for sessions that have gone quiet. Three frame
# periods at 25 fps: a speaking session submits a frame every 40 ms
ACTIVE_S = 0.12


@dataclass(frozen=True)
class SchedulerOptions:
    max_batch: int = 48
    max_in_flight: int = 2
    lookahead_s: float = 0.5
    output: str = "rgb"  # frames handed back: "rgb" (H, W, 3) or "i420" (flat planes)
    # once a GPU slot is free while another batch is still running, wait up to this long for
    # more frames (fewer, larger batches: less per-step GPU overhead, at most this much more
    # latency); it ends early once every active session has a frame queued, so a lone session
    # never waits. 0: never wait
    gather_s: float = GATHER_S

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be >= 1")
        if self.lookahead_s < 0 or self.gather_s < 0:
            raise ValueError("lookahead_s and gather_s must be >= 0")
        if self.output not in ("rgb", "i420"):
            raise ValueError(f"output must be rgb or i420, got {self.output!r}")


@dataclass
class StepStats:
    started: float
    frames: int
    items: int
    sessions: int
    launch_s: float


class SchedulerStopped(RuntimeError):
    """The scheduler was stopped; no more work is taken."""


class GpuScheduler(WorkQueue):
    """See the module docstring."""

    stopped_error = SchedulerStopped
    stopped_message = "the gpu scheduler is stopped"

    def __init__(
        self,
        engine: Engine,
        options: SchedulerOptions | None = None,
        pipeline: Any | None = None,
        name: str = "lipstream-gpu",
        metrics: Any | None = None,
    ) -> None:
        super().__init__(name)
        self.engine = engine
        self.options = options or SchedulerOptions()
        self.pipeline = pipeline
        self.metrics = metrics
        self._deliver_thread: threading.Thread | None = None
        self._deliveries: queue.Queue[Any] = queue.Queue()
        self._in_flight = threading.Semaphore(self.options.max_in_flight)
        self._on_gpu = 0  # batches launched and not yet delivered (under _cond)
        self._submitted: dict[str, float] = {}  # session -> its last submit (under _cond)
        self.history: deque[StepStats] = deque(maxlen=100_000)
        self.frames = 0
        self.steps = 0
        self.failure: BaseException | None = None  # a device error that ended the scheduler
        self._phases_counted: dict[str, float] = {}  # pipeline.launch_s already in the metrics

    @property
    def max_batch(self) -> int:
        return self.options.max_batch

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._deliver_thread = threading.Thread(
            target=self._deliver, name=f"{self._name}-out", daemon=True
        )
        self._deliver_thread.start()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._set_stopping()
        self._in_flight.release()  # wake a thread waiting for a GPU slot
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("gpu scheduler did not stop in time: timeout_s=%s", timeout)
            self._thread = None
        self._deliveries.put(None)
        if self._deliver_thread is not None:
            self._deliver_thread.join(timeout)
            self._deliver_thread = None
        self._cancel_calls()

    def load_avatar(self, avatar: Any) -> concurrent.futures.Future[Any]:
        """Make `avatar` resident (engine + GPU paste-back data, one warm frame), on the
        scheduler thread between steps."""

        def load() -> None:
            self.engine.load_avatar(avatar)
            if self.pipeline is not None:
                self.pipeline.prepare_avatar(avatar.id)

        return self.call(load)

    def unload_avatar(self, avatar_id: str) -> concurrent.futures.Future[Any]:
        def unload() -> None:
            if self.pipeline is not None:
                self.pipeline.unload(avatar_id)
            self.engine.unload_avatar(avatar_id)

        return self.call(unload)

    # -- scheduling ----------------------------------------------------------------------
    def pick(self, now: float | None = None) -> list[Any]:
        """Items to run next (call with the lock held): earliest deadline first across
        sessions, within `lookahead_s` of the earliest, up to `max_batch` frames (at least
        one item, whatever its size)."""
        return self._pick_due(self.options.max_batch, self.options.lookahead_s)

    def _run(self) -> None:
        bind_device(self.pipeline, self.engine)
        log.info(
            "gpu scheduler started: engine=%s gpu_pipeline=%s",
            self.engine.name,
            self.pipeline is not None,
        )
        while True:
            self._in_flight.acquire()  # at most max_in_flight batches on the GPU
            if self.options.gather_s > 0 and self._on_gpu > 0:
                self._gather(self.options.gather_s)
            batch = self._next_step(self.pick)
            if batch is None:
                break
            if not batch:
                self._in_flight.release()
                continue
            t0 = time.perf_counter()
            try:
                work = self._launch(batch)
            except Exception as exc:
                log.exception("batch failed: frames=%d", sum(len(i.jobs) for i in batch))
                work = ("error", exc)
                self._check_device(exc)
            launch_s = time.perf_counter() - t0
            frames = sum(len(i.jobs) for i in batch)
            self.history.append(
                StepStats(t0, frames, len(batch), len({i.key for i in batch}), launch_s)
            )
            self.steps += 1
            self.frames += frames
            if self.metrics is not None:
                self.metrics.worker_batch.observe(frames)
                self.metrics.worker_launch.observe(launch_s)
                self._count_launch_phases()
            with self._cond:
                self._on_gpu += 1
            self._deliveries.put((batch, work))
        log.info("gpu scheduler stopped: steps=%d frames=%d", self.steps, self.frames)

    def _batch_off_gpu(self) -> None:
        with self._cond:
            self._on_gpu -= 1
        self._in_flight.release()

    def submit(self, item: Any) -> None:
        super().submit(item)
        if self.options.gather_s > 0:  # only a gather asks (a session's `cancel` forgets it)
            with self._cond:
                self._submitted[item.key] = time.perf_counter()

    def cancel(self, key: str) -> int:
        with self._cond:
            self._submitted.pop(key, None)
        return super().cancel(key)

    def _gather(self, seconds: float) -> None:
        """While another batch is still on the GPU: wait for work, then up to `seconds` more
        while fewer than `max_batch` frames are queued and some active session has none
        queued (returns early for stopping or a pending call). A lone session's frame goes
        at once; with many, the batch waits for the sessions whose next frame is due."""
        with self._cond:
            self._wait_for_work()
            end = time.perf_counter() + seconds
            while not (self._stopping or self._calls):
                left = end - time.perf_counter()
                if left <= 0 or self.queued() >= self.options.max_batch:
                    return
                if self._all_active_queued():
                    return
                self._cond.wait(left)

    def _all_active_queued(self) -> bool:
        """Whether every session that submitted work within ACTIVE_S has some queued (lock
        held); forgets the sessions that have gone quiet."""
        now = time.perf_counter()
        quiet = [key for key, t in self._submitted.items() if now - t > ACTIVE_S]
        for key in quiet:
            del self._submitted[key]
        return all(key in self._queues for key in self._submitted)

    def _count_launch_phases(self) -> None:
        """Add what the pipeline's launch phases took since the last step to the metrics."""
        totals = getattr(self.pipeline, "launch_s", None)
        if not totals:
            return
        for phase in LAUNCH_PHASES:
            total = totals.get(phase, 0.0)
            delta = total - self._phases_counted.get(phase, 0.0)
            if delta > 0:
                self.metrics.worker_launch_phase.labels(phase).inc(delta)  # type: ignore[union-attr]
                self._phases_counted[phase] = total

    def _check_device(self, exc: BaseException) -> None:
        """A device error ends the scheduler (its thread stops, `alive` turns false and the
        server's /readyz 503): the GPU context cannot be used again in this process, so the
        server must be restarted. Any other error fails only its own batch."""
        if self.failure is not None or not device_lost(exc):
            return
        self.failure = exc
        log.critical("gpu scheduler stopping: the GPU failed, restart the server: error=%s", exc)
        self._set_stopping()
        self._in_flight.release()  # the scheduler thread may wait for a GPU slot

    def _launch(self, batch: list[Any]) -> Any:
        if self.pipeline is not None:
            rows = [Row(item.avatar_id, j.loop_position) for item in batch for j in item.jobs]
            parts = [(item.audio, item.jobs) for item in batch]
            return ("pending", self.pipeline.launch(rows, parts))
        # CPU / generic engine: synchronous, grouped by avatar
        frames: dict[int, list[np.ndarray]] = {}
        groups: dict[str, list[tuple[int, Any]]] = {}
        for n, item in enumerate(batch):
            feats = self.engine.stream_features(item.audio, item.jobs)
            groups.setdefault(item.avatar_id, []).append((n, feats))
        for avatar_id, members in groups.items():
            positions = [j.loop_position for n, _ in members for j in batch[n].jobs]
            joined = _concat([f for _, f in members])
            images = self.engine.render(avatar_id, positions, joined)
            off = 0
            for n, _ in members:
                k = len(batch[n].jobs)
                frames[n] = [images[off + i] for i in range(k)]
                off += k
        return ("frames", [frames[n] for n in range(len(batch))])

    def _deliver(self) -> None:
        bind_device(self.pipeline, self.engine)
        while True:
            got = self._deliveries.get()
            if got is None:
                break
            batch, (kind, payload) = got
            try:
                if kind == "pending":
                    flat = payload.result()
                    per_item, off = [], 0
                    for item in batch:
                        per_item.append(flat[off : off + len(item.jobs)])
                        off += len(item.jobs)
                elif kind == "frames":
                    per_item = payload
                else:
                    raise payload
            except Exception as exc:
                for item in batch:
                    _call_done(item, None, exc)
                self._batch_off_gpu()
                self._check_device(exc)
                continue
            self._batch_off_gpu()
            for item, frames in zip(batch, per_item, strict=True):
                _call_done(item, frames, None)


def bind_device(*owners: Any) -> None:
    """Make the first CUDA device among `owners`' `device` attributes the calling thread's
    current device: with one scheduler per GPU, whatever a thread launches without naming a
    device (compiled kernels, events) lands on its own GPU. Nothing where none is on CUDA, or
    where the device names no index (`cuda`: the current device already)."""
    for owner in owners:
        device = getattr(owner, "device", None)
        name = device if isinstance(device, str) else str(device)
        if getattr(device, "type", None) == "cuda" or name.startswith("cuda"):
            if name.startswith("cuda:"):
                import torch

                torch.cuda.set_device(torch.device(name))
            return


def device_lost(exc: BaseException) -> bool:
    """True for a CUDA error: after one (an illegal address, a kernel fault) the CUDA context
    is unusable, and every later call on it fails too."""
    return type(exc).__name__ == "AcceleratorError" or "CUDA error" in str(exc)


def _call_done(item: Any, frames: list[np.ndarray] | None, exc: BaseException | None) -> None:
    try:
        item.done(item, frames, exc)
    except Exception:
        log.exception("work item callback failed: session=%s", getattr(item, "key", "?"))


def _concat(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts, axis=0)
    import torch

    return torch.cat(parts, dim=0)
