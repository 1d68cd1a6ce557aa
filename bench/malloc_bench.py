"""`lipstream bench --malloc`: what each way of handling the server's frame buffers costs.

Each strategy runs in a fresh interpreter (the allocator's state is process-wide): two worker
threads (a media process encodes several sessions; the server has its GPU thread and its loop)
plus a few mostly idle ones, each worker making `frames` 720p I420 buffers (1.4 MB) and a copy of
each, keeping 20 in flight and, once per 1000, a burst of 200. Reported per strategy: CPU
milliseconds per frame (process time / frames) and, measured first (before the threads), the
RSS (MB) still held above a steady state of a few frames two seconds after a burst of 200 was
freed.

Strategies: `glibc-default` (the dynamic mmap threshold), `mmap-threshold-256k` (the threshold
fixed below the frame size: every buffer an mmap), `trim-1s` (the default plus
`server.ops.malloc_tuning`'s trimmer, here every second so the two-second wait sees it).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

STRATEGIES = ("glibc-default", "mmap-threshold-256k", "trim-1s")
FRAME_BYTES = 1382400  # a 720p I420 picture


def rss_mb() -> float:
    """This process's resident memory (VmRSS), MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def burst_kept_mb(wait_s: float) -> float:
    """In this process: a steady few frame buffers come and go (glibc raises its mmap
    threshold on the first free, so later ones come from the arenas), then a burst of 200 is
    held at once and let go; the RSS (MB) above the steady state `wait_s` seconds later."""
    src = np.random.default_rng(0).integers(0, 255, FRAME_BYTES, dtype=np.uint8)
    steady = []
    for _ in range(50):
        steady.append(src.copy())
        if len(steady) > 4:
            steady.pop(0)
    base = rss_mb()
    burst = [src.copy() for _ in range(200)]
    del burst
    time.sleep(wait_s)
    return rss_mb() - base


PROGRAM = textwrap.dedent(
    """
    import collections, ctypes, json, sys, threading, time
    import numpy as np
    from server.ops import malloc_tuning
    from bench.malloc_bench import FRAME_BYTES, burst_kept_mb

    strategy, frames = sys.argv[1], int(sys.argv[2])
    if strategy == "mmap-threshold-256k":
        ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    trimmer = malloc_tuning.start(1.0) if strategy == "trim-1s" else None

    # retention first, in a process that has only seen steady frames
    kept = burst_kept_mb(2.0)
    src = np.random.default_rng(0).integers(0, 255, FRAME_BYTES, dtype=np.uint8)

    # then the cost per frame, with threads as in the server and a media process
    stop = threading.Event()

    def idle():
        while not stop.wait(0.001):
            pass

    def work():
        held = collections.deque()
        for i in range(frames):
            a = src.copy()
            held.append(a.copy())
            if i % 1000 == 500:
                held.extend(src.copy() for _ in range(180))
            while len(held) > 20:
                held.popleft()

    for _ in range(4):
        threading.Thread(target=idle, daemon=True).start()
    c0, w0 = time.process_time(), time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    stop.set()
    print(json.dumps({
        "cpu_ms_per_frame": round(cpu / (2 * frames) * 1e3, 3),
        "wall_ms_per_frame": round(wall / (2 * frames) * 1e3, 3),
        "burst_kept_mb": round(kept, 1),
        "trims": trimmer.trims if trimmer else 0,
        "slowest_trim_ms": round(trimmer.slowest_s * 1e3, 2) if trimmer else None,
    }))
    """
)


def run_one(strategy: str, frames: int) -> dict[str, Any]:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", PROGRAM, strategy, str(frames)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"malloc bench {strategy} failed: {proc.stderr.strip()[-400:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def run_malloc_bench(frames: int = 3000, out: Path | None = None) -> dict[str, Any]:
    """All strategies; JSON to `out` (and stdout), progress on stderr."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError("the malloc bench measures glibc: it runs on Linux only")
    if frames < 1000:
        raise ValueError("frames must be >= 1000 (a burst comes once per 1000)")
    results = {}
    for strategy in STRATEGIES:
        print(f"malloc bench: {strategy} ({frames} frames x 2 threads) ...", file=sys.stderr)
        results[strategy] = run_one(strategy, frames)
    base = results["glibc-default"]["cpu_ms_per_frame"]
    for r in results.values():
        r["cpu_vs_default"] = round(r["cpu_ms_per_frame"] / base, 2) if base else None
    report = {
        "bench": "malloc",
        "date": time.strftime("%Y-%m-%d"),
        "machine": _cpu_model(),
        "cpus": _cpus(),
        "python": platform.python_version(),
        "libc": "-".join(platform.libc_ver()),
        "frame_bytes": FRAME_BYTES,
        "frames_per_thread": frames,
        "strategies": results,
    }
    text = json.dumps(report, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
    return report


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.machine()


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
