"""The real GPU scheduler in front of a *modelled* GPU: what batching, in-flight depth and a
faster or slower GPU do to the streaming figures, without a GPU (CPU only, a model, not a
measurement):

    python -m bench.modelled_gpu OUT.json [--sessions=12,16,20] [--speedup=1.0,0.85]
        [--in-flight 2] [--lookahead 0.5] [--seconds 12] [--calibration h200-2026-12-01]

`ModelledPipeline` stands where `engines.pipeline.gpu.GpuPipeline` stands. Its `launch` holds
the scheduler thread for the host time a launch took on the GPU machine (per step + per
frame), then queues the batch on one modelled GPU that runs batches one after another, each
for the GPU time a batch of that size took there (interpolated from measured points, times
`speedup`). The streaming bench's own simulation (`bench.simulation.simulate`: sessions pushing
speech in real time, 20 ms chunks) drives it through the real `GpuScheduler`, so the figures
(p99 frame interval, late frames by playout lead, batch sizes) come out as in a GPU run.

The calibration `h200-2026-12-01` is the H200 of this project's bench runs that day: host
time per launch 4.0 ms + 0.2 ms per frame (`launch_ms_mean` at 1, 16 and 20 sessions:
4.25, 6.71, 12.98 ms at batches 1, 10.3, 43.5) and GPU time per batch as the steps per second
and frames per step of those runs imply (see `_h200_model`). It is fitted to those runs, so
it reproduces their regime, not their every figure; check a prediction against a GPU run.
"""

from __future__ import annotations

import argparse
import bisect
import json
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.pipeline.scheduler import LAUNCH_PHASES


@dataclass(frozen=True)
class GpuModel:
    """Host and GPU time of a launch, by batch size (ms)."""

    host_ms_per_step: float
    host_ms_per_frame: float
    gpu_points: tuple[tuple[float, float], ...]  # (batch, GPU ms for the batch), increasing
    speedup: float = 1.0  # GPU time x this (0.85: a GPU 15 % faster per batch)

    def host_ms(self, n: int) -> float:
        return self.host_ms_per_step + self.host_ms_per_frame * n

    def gpu_ms(self, n: int) -> float:
        """Linear between the measured points, extended past the last at its slope."""
        xs = [b for b, _ in self.gpu_points]
        ys = [ms for _, ms in self.gpu_points]
        if n <= xs[0]:
            return ys[0] * self.speedup
        k = min(bisect.bisect_left(xs, n), len(xs) - 1)
        k = max(k, 1)
        slope = (ys[k] - ys[k - 1]) / (xs[k] - xs[k - 1])
        return (ys[k - 1] + slope * (n - xs[k - 1])) * self.speedup


def _h200_model() -> GpuModel:
    # GPU ms per batch as the H200 streaming runs of 2026-12-01 imply (old defaults,
    # `bench/results/stream_H200_2026-12-01_nhwcnorm-enc4.json` and the cpaste runs): at 20
    # sessions the GPU ran flat out, 11.4 steps/s of 43.5 frames (87.7 ms a step, 496 fps as
    # offline at batch 48); at 16, 38.6 steps/s of 10.3 frames (at most 25.9 ms a step; 24.5
    # taken); at 12, 86 steps/s of 3.5 frames (at most 11.6; 10.5 taken); batch 1 from the
    # H100's 6.5 ms UNet+VAE, scaled
    points = ((1, 5.5), (3.5, 10.5), (10.3, 24.5), (43.5, 87.7))
    return GpuModel(host_ms_per_step=4.0, host_ms_per_frame=0.2, gpu_points=points)


CALIBRATIONS = {"h200-2026-12-01": _h200_model}


@dataclass
class _Batch:
    frames: int
    ready: float  # when the GPU may start it (the launch's host time is over)
    done: threading.Event = field(default_factory=threading.Event)


class ModelledPending:
    """What `launch` returns: `result()` waits for the modelled GPU to finish the batch."""

    def __init__(self, batch: _Batch) -> None:
        self._batch = batch

    def result(self) -> list[np.ndarray]:
        self._batch.done.wait()
        return [np.zeros(1, np.uint8) for _ in range(self._batch.frames)]

    def release(self) -> None:
        pass


class ModelledPipeline:
    """A stand-in for `GpuPipeline` on a modelled GPU (see the module notes)."""

    def __init__(self, model: GpuModel) -> None:
        self.model = model
        self.launch_s = dict.fromkeys(LAUNCH_PHASES, 0.0)
        self.gpu_busy_s = 0.0
        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        self._thread = threading.Thread(target=self._gpu, name="modelled-gpu", daemon=True)
        self._thread.start()

    def launch(self, rows: list[Any], parts: Any = None, features: Any = None) -> ModelledPending:
        n = len(rows)
        t0 = time.perf_counter()
        _sleep_until(t0 + self.model.host_ms(n) / 1e3)  # the scheduler thread is busy
        self.launch_s["features"] += time.perf_counter() - t0
        batch = _Batch(n, time.perf_counter())
        self._queue.put(batch)
        return ModelledPending(batch)

    def prepare_avatar(self, avatar_id: str) -> None:
        pass

    def unload(self, avatar_id: str) -> None:
        pass

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)

    def _gpu(self) -> None:
        free = time.perf_counter()
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            start = max(free, batch.ready)
            ms = self.model.gpu_ms(batch.frames)
            free = start + ms / 1e3
            self.gpu_busy_s += ms / 1e3
            _sleep_until(free)
            batch.done.set()


def _sleep_until(t: float) -> None:
    while True:
        left = t - time.perf_counter()
        if left <= 0:
            return
        time.sleep(min(left, 0.002) if left > 0.0005 else 0)


def run_point(
    model: GpuModel,
    sessions: int,
    seconds: float,
    in_flight: int,
    lookahead_s: float,
    gather_s: float = 0.0,
    phase_spread_s: float | None = None,
) -> dict[str, Any]:
    """One `bench.simulation.simulate` run of `sessions` through the real scheduler on `model`."""
    from bench.simulation import simulate
    from engines.pipeline.scheduler import GpuScheduler, SchedulerOptions
    from engines.preview import PreviewEngine

    pipeline = ModelledPipeline(model)
    opts = SchedulerOptions(
        max_batch=48, max_in_flight=in_flight, lookahead_s=lookahead_s, gather_s=gather_s
    )
    sched = GpuScheduler(PreviewEngine(), opts, pipeline=pipeline)
    sched.start()
    t0 = time.perf_counter()
    try:
        spread = {} if phase_spread_s is None else {"phase_spread_s": phase_spread_s}
        res = simulate(sched, "modelled", sessions, seconds, None, **spread)
    finally:
        sched.stop()
        pipeline.close()
    res["modelled_gpu_busy"] = pipeline.gpu_busy_s / (time.perf_counter() - t0)
    return res


KEYS = (
    "delivered_fps_min",
    "frame_interval_ms_p99",
    "late_frames_by_lead",
    "held_frames_by_lead",
    "frame_lateness_ms_p99",
    "batch_mean",
    "first_frame_ms_p50",
    "first_frame_ms_p99",
    "modelled_gpu_busy",
    "holds_realtime",
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.modelled_gpu")
    ap.add_argument("out")
    ap.add_argument("--sessions", default="12,16,20")
    ap.add_argument("--speedup", default="1.0", help="GPU time factors, e.g. 1.0,0.85,0.7")
    ap.add_argument("--in-flight", default="2", help="max_in_flight values, e.g. 1,2,3")
    ap.add_argument("--lookahead", type=float, default=0.5)
    ap.add_argument("--gather-ms", default="0", help="SchedulerOptions.gather_s values (ms)")
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument(
        "--phase-spread-ms",
        type=float,
        default=None,
        help="sessions' start spread (the bench's default: 20 ms; 40: frame phases at random)",
    )
    ap.add_argument("--calibration", default="h200-2026-12-01", choices=sorted(CALIBRATIONS))
    args = ap.parse_args(argv)
    base = CALIBRATIONS[args.calibration]()
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "what": "the real scheduler on a modelled GPU (a model, not a GPU measurement)",
        "calibration": args.calibration,
        "model": {
            "host_ms_per_step": base.host_ms_per_step,
            "host_ms_per_frame": base.host_ms_per_frame,
            "gpu_ms_points": base.gpu_points,
        },
        "seconds": args.seconds,
        "lookahead_s": args.lookahead,
        "phase_spread_ms": args.phase_spread_ms,  # None: the bench's default (20 ms)
        "runs": {},
    }
    for speedup in (float(v) for v in args.speedup.split(",")):
        model = GpuModel(
            base.host_ms_per_step, base.host_ms_per_frame, base.gpu_points, speedup=speedup
        )
        for in_flight in (int(v) for v in args.in_flight.split(",")):
            for gather_ms in (float(v) for v in args.gather_ms.split(",")):
                for n in (int(v) for v in args.sessions.split(",")):
                    key = f"speedup{speedup:g}_inflight{in_flight}_n{n}"
                    if gather_ms:
                        key += f"_gather{gather_ms:g}ms"
                    print(f"[modelled_gpu] {key} ...", file=sys.stderr, flush=True)
                    spread = None if args.phase_spread_ms is None else args.phase_spread_ms / 1e3
                    r = run_point(
                        model, n, args.seconds, in_flight, args.lookahead, gather_ms / 1e3, spread
                    )
                    res["runs"][key] = {k: r.get(k) for k in KEYS} | {"sessions": n}
                    print(f"[modelled_gpu] {key} {res['runs'][key]}", file=sys.stderr, flush=True)
                    with open(args.out, "w") as fh:
                        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
