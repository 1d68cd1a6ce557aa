"""How far the engine's warm-up has come (the compiled backend's takes minutes on a cold start).

One `WarmUpProgress` per process (`progress`): the GPU pipeline announces its steps (the
compiled whisper encoder, then each batch bucket) and marks each done (the pipelines of several
GPUs warming up at once add up to one count); the server shows the
snapshot in `/readyz` while it is starting, and each step is logged with its count. `cancel()`
(the server shutting down during the warm-up) makes the next step raise `WarmUpCancelled`, so
a shutdown waits for one bucket's compile at most, not for all of them. Thread-safe; no torch.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


class WarmUpCancelled(RuntimeError):
    """The warm-up was cancelled (the process is shutting down)."""


class WarmUpProgress:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._what = ""
        self._done = 0
        self._total = 0
        self._started: float | None = None
        self._cancelled = False

    def begin(self, total: int, what: str) -> None:
        """A warm-up of `total` steps starts (`what`: what it does, for the log and /readyz)."""
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        with self._lock:
            self._check()
            if self._started is not None and self._done < self._total:
                self._total += total  # another under way (one per GPU): one count for all
            else:
                self._what, self._done, self._total = what, 0, total
                self._started = time.monotonic()
        log.info("warm-up started: %s, %d steps", what, total)

    def step_done(self, label: str, seconds: float | None = None) -> None:
        """One step finished (`label`: which; `seconds`: how long it took, for the log);
        raises WarmUpCancelled once `cancel()` was called."""
        with self._lock:
            self._done += 1
            self._total = max(self._total, self._done)  # steps nobody announced still count
            done, total = self._done, self._total
            cancelled = self._cancelled
        took = "" if seconds is None else f" in {seconds:.1f} s"
        log.info("warm-up %d/%d: %s ready%s", done, total, label, took)
        if cancelled:
            raise WarmUpCancelled("the warm-up was cancelled")

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True

    def reset(self) -> None:
        """Forget a finished or cancelled warm-up (a new server in the same process)."""
        with self._lock:
            self._what, self._done, self._total = "", 0, 0
            self._started = None
            self._cancelled = False

    def _check(self) -> None:
        if self._cancelled:
            raise WarmUpCancelled("the warm-up was cancelled")

    def snapshot(self) -> dict[str, Any] | None:
        """{"what", "done", "total", "elapsed_s"}, or None before any warm-up began."""
        with self._lock:
            if self._started is None:
                return None
            return {
                "what": self._what,
                "done": self._done,
                "total": self._total,
                "elapsed_s": round(time.monotonic() - self._started, 1),
            }


progress = WarmUpProgress()
