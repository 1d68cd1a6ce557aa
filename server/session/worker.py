"""The frame worker: ONE thread per engine, serving every session on it.

Sessions `submit` work items (the frame jobs of one utterance, with its audio). Each step the
thread takes the items due first across all sessions (earliest deadline first, up to
`max_batch` frames), computes their features (one `stream_features` call per item: each reads
its own utterance), renders them grouped by avatar as one `render` call per avatar (features
concatenated), and hands each item's frames back through its `done` callback (which moves them
to the session's event loop). Engine calls never run on the event loop.

Other engine work (loading and unloading avatars) goes through `call`, which runs between
steps on the same thread, so the engine is only ever touched by this thread.

Where the engine is MuseTalk on a CUDA GPU, the server uses `server.session.gpu_worker.GpuWorker`
instead (the GPU scheduler: stage overlap on CUDA streams, adaptive batch buckets); both
satisfy the `Worker` protocol that sessions and the avatar service use.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from avatars.avatar import Avatar
from engines.base import Engine, FrameJob
from engines.pipeline.scheduler import device_lost
from engines.pipeline.work_queue import WorkQueue
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

STEP_EMA_ALPHA = 0.2
Done = Callable[["WorkItem", list[np.ndarray] | None, BaseException | None], None]


@dataclass
class WorkItem:
    key: str  # the session's id (cancel() drops a session's queued items by it)
    avatar_id: str
    utterance: int
    audio: np.ndarray
    jobs: list[FrameJob]
    pcm: list[np.ndarray]
    deadline: float  # monotonic time the first job is due to be shown
    done: Done  # called on the worker thread with (item, frames, None) or (item, None, error)
    seq: int = field(default=0, compare=False)
    submitted: float = field(default=0.0, compare=False)  # loop time it was handed over


class WorkerStopped(RuntimeError):
    """The worker was stopped; no more work is taken."""


class Worker(Protocol):
    """What sessions and the avatar service need of a frame worker (FrameWorker, GpuWorker)."""

    step_ema: float  # recent step time (s), for sessions to plan their lead
    failure: BaseException | None  # the device error that stopped the worker, if one did

    @property
    def max_batch(self) -> int: ...
    @property
    def alive(self) -> bool: ...
    def start(self) -> None: ...
    def stop(self, timeout: float = 10.0) -> None: ...
    def submit(self, item: WorkItem) -> None: ...
    def cancel(self, key: str) -> int: ...
    def queued(self, key: str | None = None) -> int: ...
    def call(
        self, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]: ...
    async def acall(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...
    def load_avatar(self, avatar: Avatar) -> concurrent.futures.Future[Any]: ...
    def unload_avatar(self, avatar_id: str) -> concurrent.futures.Future[Any]: ...


def concat_features(parts: list[Any]) -> Any | None:
    """One feature batch from several (numpy or torch); None if they cannot be joined."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts, axis=0)
    if all(type(p).__module__.startswith("torch") for p in parts):
        import torch

        return torch.cat(parts, dim=0)
    return None


def _by_utterance(batch: list[WorkItem]) -> list[list[WorkItem]]:
    """The batch's items grouped by (session, utterance), in order."""
    groups: dict[tuple[str, int], list[WorkItem]] = {}
    for item in batch:
        groups.setdefault((item.key, item.utterance), []).append(item)
    return list(groups.values())


class FrameWorker(WorkQueue):
    """See the module docstring."""

    stopped_error = WorkerStopped
    stopped_message = "the frame worker is stopped"

    def __init__(
        self,
        engine: Engine,
        max_batch: int = 16,
        metrics: ServerMetrics | None = None,
        name: str = "lipstream-frames",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        super().__init__(name)
        self.engine = engine
        self.max_batch = max_batch
        self.metrics = metrics
        self.steps = 0
        self.frames = 0
        self.busy_s = 0.0
        self.step_ema = 0.0  # recent engine step time (s), for sessions to plan their lead
        self.failure: BaseException | None = None  # a device error that stopped the worker

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._set_stopping()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("frame worker did not stop in time", extra={"timeout_s": timeout})
            self._thread = None
        self._cancel_calls()

    def load_avatar(self, avatar: Avatar) -> concurrent.futures.Future[Any]:
        """Make `avatar` resident in the engine, on the worker thread."""
        return self.call(self.engine.load_avatar, avatar)

    def unload_avatar(self, avatar_id: str) -> concurrent.futures.Future[Any]:
        return self.call(self.engine.unload_avatar, avatar_id)

    # -- thread --------------------------------------------------------------------------
    def _run(self) -> None:
        log.info(
            "frame worker started", extra={"engine": self.engine.name, "max_batch": self.max_batch}
        )
        while True:
            batch = self._next_step(self._pick)
            if batch is None:
                break
            if batch:
                self._process(batch)
        log.info("frame worker stopped", extra={"steps": self.steps, "frames": self.frames})

    def _pick(self) -> list[WorkItem]:
        """Items due first across sessions, up to max_batch frames (at least one item)."""
        return self._pick_due(self.max_batch)

    def _process(self, batch: list[WorkItem]) -> None:
        t0 = time.perf_counter()
        groups: dict[str, list[tuple[WorkItem, Any]]] = {}
        for items in _by_utterance(batch):
            # one features call per utterance: the newest item's audio holds every older
            # item's audio (each job reads only up to its own horizon)
            jobs = [j for item in items for j in item.jobs]
            try:
                feats = self.engine.stream_features(items[-1].audio, jobs)
            except Exception as exc:
                log.exception("stream_features failed", extra={"session_id": items[0].key})
                self._check_device(exc)
                for item in items:
                    self._done(item, None, exc)
                continue
            offset = 0
            for item in items:
                n = len(item.jobs)
                part = feats if len(items) == 1 else feats[offset : offset + n]
                groups.setdefault(item.avatar_id, []).append((item, part))
                offset += n
        n = 0
        for avatar_id, members in groups.items():
            n += self._render_group(avatar_id, members)
        dt = time.perf_counter() - t0
        self.steps += 1
        self.frames += n
        self.busy_s += dt
        self.step_ema += STEP_EMA_ALPHA * (dt - self.step_ema)
        if self.metrics is not None:
            self.metrics.worker_batch.observe(n)
            self.metrics.worker_step.observe(dt)
            self.metrics.worker_launch.observe(dt)  # synchronous: launching is the whole step
            self.metrics.frames_rendered.inc(n)

    def _render_group(self, avatar_id: str, members: list[tuple[WorkItem, Any]]) -> int:
        joined = concat_features([f for _, f in members])
        if joined is None:  # features of a kind we cannot join: one render per item
            return sum(self._render_group(avatar_id, [m]) for m in members)
        positions = [j.loop_position for item, _ in members for j in item.jobs]
        try:
            images = self.engine.render(avatar_id, positions, joined)
        except Exception as exc:
            log.exception("render failed", extra={"avatar_id": avatar_id, "frames": len(positions)})
            self._check_device(exc)
            for item, _ in members:
                self._done(item, None, exc)
            return 0
        offset = 0
        for item, _ in members:
            k = len(item.jobs)
            self._done(item, [images[offset + i] for i in range(k)], None)
            offset += k
        return len(positions)

    def _check_device(self, exc: BaseException) -> None:
        """A device error stops the worker (`alive` turns false): its device cannot be used
        again in this process. Any other error fails only its own items."""
        if self.failure is not None or not device_lost(exc):
            return
        self.failure = exc
        log.critical("frame worker stopping: its device failed", extra={"error": str(exc)[:300]})
        self._set_stopping()

    @staticmethod
    def _done(item: WorkItem, frames: list[np.ndarray] | None, exc: BaseException | None) -> None:
        try:
            item.done(item, frames, exc)
        except Exception:
            log.exception("work item callback failed", extra={"session_id": item.key})
