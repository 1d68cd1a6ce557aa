"""The work-queue plumbing shared by `engines.pipeline.scheduler.GpuScheduler` and
`server.session.worker.FrameWorker`: per-session queues of work items, calls run between steps on
the one engine thread, and the earliest-deadline-first pick across sessions.

A work item is anything with `key` (its session), `jobs`, `deadline` and a writable `seq`.
Subclasses own the thread (`start`, `stop`, `_run`) and name the exception raised once
stopped (`stopped_error`, `stopped_message`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import math
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar


class WorkQueue:
    """See the module docstring."""

    stopped_error: ClassVar[type[Exception]] = RuntimeError
    stopped_message: ClassVar[str] = "the work queue is stopped"

    def __init__(self, name: str) -> None:
        self._name = name
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Any]] = {}
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seq = itertools.count()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- input ---------------------------------------------------------------------------
    def submit(self, item: Any) -> None:
        item.seq = next(self._seq)
        with self._cond:
            if self._stopping:
                raise self.stopped_error(self.stopped_message)
            self._queues.setdefault(item.key, deque()).append(item)
            self._cond.notify()

    def cancel(self, key: str) -> int:
        """Drop the queued (not yet started) items of one session; returns how many."""
        with self._cond:
            q = self._queues.pop(key, None)
        return len(q) if q else 0

    def queued(self, key: str | None = None) -> int:
        """Frames waiting (for one session, or all)."""
        with self._cond:
            queues = (
                [self._queues.get(key, deque())] if key is not None else list(self._queues.values())
            )
            return sum(len(item.jobs) for q in queues for item in q)

    def call(
        self, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        """Run `fn(*args, **kwargs)` on the engine thread between steps."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise self.stopped_error(self.stopped_message)
            self._calls.append((lambda: fn(*args, **kwargs), fut))
            self._cond.notify()
        return fut

    async def acall(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.wrap_future(self.call(fn, *args, **kwargs))

    # -- for subclasses ------------------------------------------------------------------
    def _set_stopping(self) -> None:
        """Take no more work, drop what is queued, fail the calls not yet run and wake the
        thread."""
        with self._cond:
            self._stopping = True
            self._queues.clear()
            self._cond.notify_all()
        self._cancel_calls()

    def _cancel_calls(self) -> None:
        """Fail the calls the (stopping) thread will not run with the stopped error (their
        awaiting callers see why, not a cancellation)."""
        with self._cond:
            calls = list(self._calls)
            self._calls.clear()
        for _, fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(self.stopped_error(self.stopped_message))

    def _next_step(self, pick: Callable[[], list[Any]]) -> list[Any] | None:
        """On the engine thread: wait for work, run the pending calls and return the items
        `pick` takes (with the lock held); None once stopping."""
        with self._cond:
            self._wait_for_work()
            if self._stopping:
                return None
            calls = list(self._calls)
            self._calls.clear()
            batch = pick()
        for fn, fut in calls:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)
        return batch

    def _wait_for_work(self) -> None:
        """Block (lock held) until there is an item, a call or a stop."""
        while not (self._stopping or self._calls or self._queues):
            self._cond.wait()

    def _pick_due(self, max_frames: int, lookahead_s: float = math.inf) -> list[Any]:
        """Items to run next (call with the lock held): earliest deadline first across
        sessions, within `lookahead_s` of the earliest, up to `max_frames` frames (at least
        one item, whatever its size)."""
        heap = [(q[0].deadline, q[0].seq, key) for key, q in self._queues.items() if q]
        heapq.heapify(heap)
        batch: list[Any] = []
        frames = 0
        horizon = None
        while heap:
            deadline, _, key = heapq.heappop(heap)
            if horizon is None:
                horizon = deadline + lookahead_s
            elif deadline > horizon:
                break
            q = self._queues[key]
            item = q[0]
            if batch and frames + len(item.jobs) > max_frames:
                break
            q.popleft()
            batch.append(item)
            frames += len(item.jobs)
            if q:
                heapq.heappush(heap, (q[0].deadline, q[0].seq, key))
            else:
                del self._queues[key]
        return batch
