"""Sessions per host at 1 GPU and at k GPUs: the streaming bench over several devices.

    python -m bench.multi_gpu OUT.json [--devices all|0,1,...] [--per-gpu 12,16,20,24]
        [--seconds 20] [--backend compiled] [--gather-ms 0] [--models-dir DIR]
    python -m bench.multi_gpu OUT.json --modelled h200-2026-12-01 --devices 2 ...

Each device gets what the server gives it with `--devices`: its own MuseTalk engine (random
full-size weights unless `--models-dir`), its own pipeline of the backend (compiled and warmed
up on that GPU) and its own `GpuScheduler`, with the bench's synthetic avatar resident. For
k = 1 and k = all devices, and each sessions-per-GPU figure P, k * P sessions are placed over
the first k devices by the server's own `Placer` and pushed through
`bench.simulation.simulate`, one thread per device, all at once, in one process (as one server
runs them). A point holds when every device's run meets the streaming bar (every frame, every
session at >= 24.5 fps, p99 frame interval <= 60 ms). The JSON has every point, the most
sessions held at 1 and at k GPUs, their ratio to k times the 1-GPU figure, and the first-frame
p50 at each. `--modelled` runs the same over modelled GPUs (`bench.modelled_gpu`) on the CPU: a
check of the harness, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.simulation import meets_streaming_bar, simulate


@dataclass
class Device:
    name: str
    sched: Any  # engines.pipeline.scheduler.GpuScheduler, started
    avatar_id: str
    close: Any  # () -> None


def modelled_devices(k: int, calibration: str) -> list[Device]:
    from bench.modelled_gpu import CALIBRATIONS, ModelledPipeline
    from engines.pipeline.scheduler import GpuScheduler, SchedulerOptions
    from engines.preview import PreviewEngine

    out = []
    for i in range(k):
        pipe = ModelledPipeline(CALIBRATIONS[calibration]())
        sched = GpuScheduler(PreviewEngine(), SchedulerOptions(max_batch=48), pipeline=pipe)
        sched.start()

        def close(s: Any = sched, p: Any = pipe) -> None:
            s.stop()
            p.close()

        out.append(Device(f"modelled:{i}", sched, "modelled", close))
    return out


def gpu_devices(
    names: tuple[str, ...], args: argparse.Namespace, info: dict[str, Any]
) -> list[Device]:
    """One engine, pipeline and scheduler per GPU, built one GPU after another (the first
    fills the compile caches the others then hit)."""
    import tempfile

    import torch

    from bench.gpu import measure
    from engines.backends import build_pipeline, pipeline_options
    from engines.musetalk.engine import MuseTalkEngine
    from engines.musetalk.weights import make_random
    from engines.pipeline.scheduler import GpuScheduler, SchedulerOptions

    root = args.models_dir
    if root is None:
        root = str(Path(tempfile.mkdtemp(prefix="lipstream-multi-")) / "models")
        make_random(root, size="full", seed=0)
    info["gpus"] = [torch.cuda.get_device_name(torch.device(n)) for n in names]
    info["warm_up_s"] = {}
    out = []
    for name in names:
        t0 = time.perf_counter()
        with torch.cuda.device(torch.device(name)):
            engine = MuseTalkEngine(root, device=name, batch_size=20)
            avatar = measure.synthetic_avatar(args.avatar_frames, 720, 1280)
            avatar.latents = None  # the engine encodes them with its VAE
            engine.load_avatar(avatar)
            options = pipeline_options(args.backend, 48, "i420", 2)
            pipe = build_pipeline(engine, options, warm_up=True)
            pipe.prepare_avatar(avatar.id)
        opts = SchedulerOptions(max_batch=48, output="i420", gather_s=args.gather_ms / 1e3)
        sched = GpuScheduler(engine, opts, pipeline=pipe)
        sched.start()
        info["warm_up_s"][name] = round(time.perf_counter() - t0, 1)
        out.append(Device(name, sched, avatar.id, sched.stop))
    return out


def run_point(devices: list[Device], total: int, seconds: float) -> dict[str, Any]:
    """`total` sessions placed over `devices` by the server's Placer, all run at once."""
    from server.session.placement import Placer

    placer = Placer([d.name for d in devices], max_sessions=max(total, len(devices)))
    for k in range(total):
        placer.place(f"s{k}", "avatar", now=0.0)
    counts = {d.device: d.sessions for d in placer.loads(0.0)}
    runs: dict[str, Any] = {}

    def one(d: Device) -> None:
        if counts[d.name]:
            runs[d.name] = simulate(d.sched, d.avatar_id, counts[d.name], seconds, None)

    threads = [threading.Thread(target=one, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    firsts = [r["first_frame_ms_p50"] for r in runs.values() if r["first_frame_ms_p50"]]
    return {
        "sessions": total,
        "per_device": {name: counts[name] for name in counts},
        "holds": len(runs) == sum(1 for c in counts.values() if c)
        and all(meets_streaming_bar(r) for r in runs.values()),
        "first_frame_ms_p50_max": max(firsts) if firsts else None,
        "frame_interval_ms_p99_max": max(r["frame_interval_ms_p99"] for r in runs.values()),
        "delivered_fps_min": min(r["delivered_fps_min"] for r in runs.values()),
        "frames_missing": sum(r["frames_expected"] - r["frames_delivered"] for r in runs.values()),
        "runs": runs,
    }


def sweep(devices: list[Device], per_gpu: list[int], seconds: float) -> dict[str, Any]:
    """k = 1 and k = len(devices): every point, the most sessions held, the ratio."""
    ks = sorted({1, len(devices)})
    out: dict[str, Any] = {"points": {}, "max_sessions": {}, "first_frame_ms_p50": {}}
    for k in ks:
        points: dict[str, Any] = {}
        for p in per_gpu:
            point = run_point(devices[:k], k * p, seconds)
            points[str(k * p)] = point
            print(
                f"gpus={k} sessions={k * p} holds={point['holds']} "
                f"p99={point['frame_interval_ms_p99_max']:.1f}ms "
                f"first_p50={point['first_frame_ms_p50_max']}",
                file=sys.stderr,
            )
        held = [int(n) for n, pt in points.items() if pt["holds"]]
        best = max(held) if held else 0
        out["points"][str(k)] = points
        out["max_sessions"][str(k)] = best
        out["first_frame_ms_p50"][str(k)] = (
            points[str(best)]["first_frame_ms_p50_max"] if best else None
        )
    one, many = out["max_sessions"]["1"], out["max_sessions"][str(ks[-1])]
    out["scaling"] = many / (ks[-1] * one) if one else None  # the bar: >= 0.9
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.multi_gpu", description=__doc__.split("\n")[0]
    )
    ap.add_argument("out", type=Path)
    ap.add_argument("--devices", default="all", help="all | 0,1,... (with --modelled: a count)")
    ap.add_argument("--per-gpu", default="12,16,20,24", help="sessions per GPU to try")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--backend", default="compiled", choices=["torch", "compiled"])
    ap.add_argument("--gather-ms", type=float, default=0.0)
    ap.add_argument("--avatar-frames", type=int, default=50)
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--modelled", default=None, metavar="CALIBRATION")
    args = ap.parse_args(argv)
    per_gpu = [int(v) for v in args.per_gpu.split(",")]
    info: dict[str, Any] = {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.modelled:
        devices = modelled_devices(int(args.devices), args.modelled)
        info["modelled"] = args.modelled
    else:
        from server.app import gpu_count
        from server.session.placement import device_list

        devices = gpu_devices(device_list(args.devices, gpu_count()), args, info)
    try:
        res = {"setup": info, **sweep(devices, per_gpu, args.seconds)}
    finally:
        for d in devices:
            d.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: res[k] for k in ("max_sessions", "first_frame_ms_p50", "scaling")}))


if __name__ == "__main__":
    main()
