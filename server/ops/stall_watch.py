"""Where a process stalls: event-loop lag, garbage-collector pauses, and (with
`server.ops.malloc_tuning`) malloc trims.

Frames leave each session on a 40 ms clock. When the server's event loop stops for a few
hundred ms, every session's clock catches up with a burst of ticks, which can overrun a media
process's encoder queue (frames dropped before the encoder, in all sessions at once). These
measurements say whether, and which, stall it was:

- `LoopLag`: a task sleeping `interval_s` and measuring how late it wakes (the lag every
  callback on the loop saw at that moment); a lag over `warn_s` is logged with the last
  collector pause and malloc trim, so a log line names its likely cause.
- `GcPauses`: the time of each cyclic-GC collection, by generation (`gc.callbacks`). A full
  collection walks every tracked object; after torch.compile's warm-up that is millions, hence
  `freeze_heap`: `gc.freeze()` once the server is ready moves what exists then into the
  permanent generation, which collections no longer walk (objects made later are collected as
  usual).
- Trims are timed by `malloc_tuning.Trimmer` itself; `recent` reads its last one.

Histograms are optional (the media processes have no /metrics; there the warnings alone go to
the server's log).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import Any

from prometheus_client import Histogram

from server.ops import malloc_tuning

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 0.02
LAG_WARN_S = 0.15  # above this a media queue of 10 frames has little room left
GC_FREEZE_ENV = "LIPSTREAM_GC_FREEZE"  # the setting gc_freeze, for the media processes
RECENT_S = 2.0  # a pause or trim this long ago still counts as the likely cause


class GcPauses:
    """Times every collection through `gc.callbacks` (`install` / `uninstall`)."""

    def __init__(self, histogram: Histogram | None = None) -> None:
        self.histogram = histogram
        self.collections = [0, 0, 0]
        self.longest_s = 0.0
        self.last: tuple[float, int, float] | None = None  # (monotonic end, generation, s)
        self._t0 = 0.0

    def install(self) -> GcPauses:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._t0 = now
            return
        took = now - self._t0
        generation = int(info.get("generation", 0))
        if 0 <= generation < 3:
            self.collections[generation] += 1
        self.longest_s = max(self.longest_s, took)
        self.last = (time.monotonic(), generation, took)
        if self.histogram is not None:
            self.histogram.labels(str(generation)).observe(took)


def freeze_heap() -> int:
    """Collect once, then move every object left into the permanent generation (see the
    module docstring). Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class LoopLag:
    """Measures the running loop's lag every `interval_s` until `stop` (an owned task)."""

    def __init__(
        self,
        histogram: Histogram | None = None,
        gc_pauses: GcPauses | None = None,
        interval_s: float = LAG_INTERVAL_S,
        warn_s: float = LAG_WARN_S,
    ) -> None:
        if interval_s <= 0 or warn_s <= 0:
            raise ValueError("the lag interval and warning level must be > 0")
        self.histogram = histogram
        self.gc_pauses = gc_pauses
        self.interval_s = interval_s
        self.warn_s = warn_s
        self.longest_s = 0.0
        self.stalls = 0  # lags over warn_s
        self._window = (0.0, 0)  # since the last take_window: longest lag, lags over 100 ms
        self._task: asyncio.Task[None] | None = None

    def start(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.interval_s)
            self.observe(max(0.0, loop.time() - t0 - self.interval_s))

    def observe(self, lag: float) -> None:
        if self.histogram is not None:
            self.histogram.observe(lag)
        self.longest_s = max(self.longest_s, lag)
        self._window = (max(self._window[0], lag), self._window[1] + int(lag > 0.1))
        if lag > self.warn_s:
            self.stalls += 1
            recent = " ".join(f"{k}={v}" for k, v in self.recent().items()) or "no gc or trim"
            log.warning("event loop stalled: lag_ms=%.1f %s", lag * 1e3, recent)

    def take_window(self) -> tuple[float, int]:
        """(longest lag in s, lags over 100 ms) since the last call."""
        out, self._window = self._window, (0.0, 0)
        return out

    def recent(self) -> dict[str, Any]:
        """The collector pause and malloc trim of the last `RECENT_S` seconds, if any."""
        now = time.monotonic()
        out: dict[str, Any] = {}
        last_gc = self.gc_pauses.last if self.gc_pauses is not None else None
        if last_gc is not None and now - last_gc[0] <= RECENT_S:
            out["gc_generation"] = last_gc[1]
            out["gc_ms"] = round(last_gc[2] * 1e3, 1)
        trim = malloc_tuning.last_trim()
        if trim is not None and now - trim[0] <= RECENT_S:
            out["trim_ms"] = round(trim[1] * 1e3, 1)
        return out
