"""glibc malloc tuning for the long-running server and its media processes: a trimmer thread.

Every frame the server handles is a fresh buffer of ~1.4 MB (a 720p I420 picture) that lives
for a few frame times. glibc serves the first such sizes with mmap, then raises its mmap
threshold to the size of each mmapped chunk it frees ("dynamic threshold"), so from then on
they come from the thread arenas, which keep freed memory: RSS follows the largest number of
frames ever in flight at once and grows in steps as rarer bursts come (a 10-minute GPU soak grew
543 MB that way, flat once the peaks stopped).

Two cures were measured (`lipstream bench --malloc`, which runs both against glibc's default):

- A fixed mmap threshold below the frame size: each frame buffer is an
  mmap, its page faults and an munmap (a TLB shootdown across the process's threads). Freed
  bursts go back at once, but every buffer costs several times what an arena chunk costs (CPU
  machine: ~7x per frame); the GPU soak run with it (12 sessions of 720p, H200) dropped 38
  frames with a p99 frame interval of 86 ms, where the default with trims dropped none (71 ms).
- glibc's default plus `malloc_trim(0)` every few seconds from a thread (this module): frames
  come from the arenas at their usual cost, and each trim gives the free pages of every arena
  back to the kernel (glibc >= 2.8 releases whole free pages inside arenas, not just at the
  top), so RSS returns to what is in use within one interval. A trim takes a few ms, mostly
  outside the GIL (ctypes releases it), holding one arena's lock at a time.

`start` runs the trimmer in this process and leaves its interval in the environment (the
setting's own variable) for processes started from it afterwards: the media processes call
`start_from_env`. Other C libraries (no `malloc_trim`): nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

ENV = "LIPSTREAM_MALLOC_TRIM_INTERVAL_S"  # the setting malloc_trim_interval_s
MAX_INTERVAL_S = 3600.0
SLOW_TRIM_S = 0.05  # a trim this long is logged (it holds arena locks while it runs)

TrimFn = Callable[[int], int]


class Trimmer:
    """A daemon thread calling `malloc_trim(0)` every `interval_s` seconds. Each trim's time
    goes to `observe` (a histogram's, in the server) and `last`; a slow one is logged."""

    def __init__(
        self, trim: TrimFn, interval_s: float, observe: Callable[[float], None] | None = None
    ) -> None:
        self.interval_s = interval_s
        self.observe = observe
        self.trims = 0
        self.slowest_s = 0.0
        self.last: tuple[float, float] | None = None  # (monotonic end, seconds)
        self._trim = trim
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="malloc-trim", daemon=True)

    def start(self) -> Trimmer:
        self._thread.start()
        return self

    def trim_now(self) -> float:
        """Trim once; returns the seconds it took."""
        t0 = time.perf_counter()
        self._trim(0)
        took = time.perf_counter() - t0
        self.trims += 1
        self.slowest_s = max(self.slowest_s, took)
        self.last = (time.monotonic(), took)
        if self.observe is not None:
            self.observe(took)
        if took > SLOW_TRIM_S:
            log.warning("malloc trim was slow: took_ms=%.1f", took * 1e3)
        return took

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.trim_now()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


_active: Trimmer | None = None


def libc_malloc_trim() -> TrimFn | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def check_interval(interval_s: float) -> float:
    if not 0 <= interval_s <= MAX_INTERVAL_S:
        raise ValueError(
            f"the malloc trim interval must be in 0..{MAX_INTERVAL_S:g} s (0: off), "
            f"got {interval_s!r}"
        )
    return float(interval_s)


def start(interval_s: float) -> Trimmer | None:
    """Trim this process's heap every `interval_s` seconds (0: no trimmer) from now on,
    replacing a trimmer started before; processes started from here afterwards get the same
    interval. Returns the running trimmer, or None."""
    global _active
    interval_s = check_interval(interval_s)
    os.environ[ENV] = repr(interval_s)
    if _active is not None:
        _active.stop()
        _active = None
    if interval_s == 0:
        return None
    trim = libc_malloc_trim()
    if trim is None:
        log.info("malloc trimmer skipped: the C library has no malloc_trim")
        return None
    _active = Trimmer(trim, interval_s).start()
    log.info("malloc trimmer started: interval_s=%g", interval_s)
    return _active


def observe_with(observe: Callable[[float], None]) -> None:
    """Send the running trimmer's trim times to `observe` from now on (none running: no-op)."""
    if _active is not None:
        _active.observe = observe


def last_trim() -> tuple[float, float] | None:
    """(monotonic end, seconds) of the running trimmer's last trim, or None."""
    return _active.last if _active is not None else None


def start_from_env() -> Trimmer | None:
    """In a child process: start the trimmer its parent asked for through `ENV`."""
    raw = os.environ.get(ENV)
    if not raw:
        return None
    try:
        return start(float(raw))
    except ValueError as exc:
        log.warning("malloc trimmer not started: %s=%r: %s", ENV, raw, exc)
        return None


def stop() -> None:
    """Stop this process's trimmer, if any."""
    global _active
    if _active is not None:
        _active.stop()
        _active = None
