"""glibc malloc tuning for the long-running server and its media processes.

Every frame the server handles is a fresh buffer of ~1.4 MB (a 720p I420 picture) that lives
for a few frame times. glibc serves such sizes with mmap at first, but raises its mmap
threshold to the size of each mmapped chunk it frees ("dynamic threshold"), so from then on
they come from the thread arenas, which keep the memory after the peak: the process's RSS
follows the largest number of frames ever in flight at once, and grows in steps as rarer
bursts come (a 10-minute GPU soak grew 543 MB that way, flat once the peaks stopped). A fixed
threshold (which also fixes the trim threshold) returns each such buffer to the kernel when it
is freed. Measured on this project's CPU machine (tests/test_malloc_tuning.py): after a burst
of 200 720p frames (276 MB) is freed, +195 MB stays resident with glibc's default, +0 MB with
the threshold fixed at 256 KiB.

`apply` sets it in this process (mallopt) and, through `MALLOC_MMAP_THRESHOLD_`, in processes
started from it afterwards (the media processes). Other C libraries: nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MAX_THRESHOLD_KB = 32 * 1024  # glibc's upper bound on 64-bit (HEAP_MAX_SIZE / 2)


def apply(threshold_kb: int) -> bool:
    """Fix glibc's mmap threshold at `threshold_kb` KiB (0: leave glibc's own dynamic one).
    Returns True where it was set."""
    if threshold_kb < 0 or threshold_kb > MAX_THRESHOLD_KB:
        raise ValueError(f"threshold_kb must be in 0..{MAX_THRESHOLD_KB}, got {threshold_kb}")
    if threshold_kb == 0 or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        log.info("malloc tuning skipped: no mallopt in the C library: lib=%s", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold_kb * 1024) != 1:
        log.warning("malloc tuning refused by mallopt: threshold_kb=%d", threshold_kb)
        return False
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(threshold_kb * 1024)  # for child processes
    log.info("malloc mmap threshold fixed: threshold_kb=%d", threshold_kb)
    return True
