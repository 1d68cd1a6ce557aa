"""The bench's offline sections, each a function of the `BenchContext`:

- `reference`: MuseTalk's realtime way, the baseline (eager fp16, batch 20, PIL paste-back
  on the CPU, one thread) on the clip, features included;
- `offline`: UNet+VAE fps per variant and batch size;
- `accuracy`: compiled vs eager (and both vs an fp32 reference) in uint8 levels;
- `full_pipeline`: the full GPU path for the clip (audio encoder + UNet + VAE + GPU paste-back
  into the avatar frames + I420 + pinned host copy), per variant, in interleaved rounds;
- `render`: `lipstream render`'s path (mp4 written) with the torch engine and the GPU path.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.context import BenchContext
from engines.base import frames_in


def reference(ctx: BenchContext) -> dict[str, Any]:
    """MuseTalk's realtime script: features, eager fp16 UNet+VAE in batches of 20, faces to
    the CPU, PIL paste-back per frame (one thread)."""
    from bench.gpu.measure import pil_paste_back
    from engines.musetalk.unet_step import unet_forward
    from engines.musetalk.vae import decode_latents

    torch, eng, av = ctx.torch, ctx.engine, ctx.avatar
    res = eng._resident(av.id)

    def run() -> tuple[float, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        feats = eng.offline_features(ctx.clip)
        n = len(feats)
        gpu_s = 0.0
        for s in range(0, n, 20):
            idx = [av.loop_frame(i) for i in range(s, min(n, s + 20))]
            g0 = time.perf_counter()
            with torch.no_grad():
                pred = unet_forward(eng.unet, res.latents[idx], feats[s : s + len(idx)])
                faces = decode_latents(eng.vae, pred)
            gpu_s += time.perf_counter() - g0
            for k, i in enumerate(idx):
                pil_paste_back(
                    av.frames[i], faces[k], av.face_boxes[i], av.crop_boxes[i], av.masks[i]
                )
        return n / (time.perf_counter() - t0), n / gpu_s

    run()  # warm-up
    fps, gpu_fps = run()
    return {"fps": fps, "unet_vae_fps_batch20": gpu_fps, "frames": frames_in(ctx.clip.size)}


def offline(ctx: BenchContext) -> dict[str, Any]:
    """UNet + VAE decode alone: ms and fps per variant and batch size."""
    from bench.gpu import measure

    torch = ctx.torch
    out: dict[str, Any] = {}
    for backend in ctx.o.backends:
        if backend == "tensorrt":
            out[backend] = {"error": _trt_reason()}
            continue
        p = ctx.pipeline(backend)
        rows = {}
        for b in ctx.o.batches:
            lat = torch.randn((b, 8, 32, 32), device=ctx.dev, dtype=torch.float16)
            aud = torch.randn((b, 50, 384), device=ctx.dev, dtype=torch.float16)
            with torch.inference_mode():
                t = measure.gpu_time_ms(
                    lambda p=p, lat=lat, aud=aud: p.step(lat, aud),  # type: ignore[misc]
                    reps=10,
                    warmup=2,
                )
            rows[str(b)] = {"ms": t["median_ms"], "fps": b * 1e3 / t["median_ms"]}
        out[backend] = rows
    return out


def accuracy(ctx: BenchContext) -> dict[str, Any]:
    """Distance in uint8 levels between the compiled step, the eager fp16 one and an fp32
    reference (and each other compiled variant asked for against eager and fp32): max, mean
    and the fractions over 1 and 2 levels."""
    from engines.pipeline.compiled import MuseTalkStep

    torch = ctx.torch
    steps = {"compiled": ctx.pipeline("compiled").step}
    # the other compiled variants asked for (`--backends compiled,compiled-stocknorm`)
    steps.update({n: ctx.pipeline(n).step for n in ctx.o.backends if n.startswith("compiled-")})
    eager = ctx.pipeline("torch").step
    ref32 = MuseTalkStep(
        copy.deepcopy(ctx.engine.unet).float(), copy.deepcopy(ctx.engine.vae).float()
    ).to(ctx.dev)
    g = torch.Generator(device=ctx.dev).manual_seed(5)
    stats: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for b in (1, 5, 16):
            lat = torch.randn((b, 8, 32, 32), device=ctx.dev, generator=g)
            aud = torch.randn((b, 50, 384), device=ctx.dev, generator=g)
            e = eager(lat.half(), aud.half()).int()
            r = ref32(lat, aud).int()
            _add_diff(stats, "eager_vs_fp32", e - r)
            for name, step in steps.items():
                v = step(lat.half(), aud.half()).int()
                _add_diff(stats, f"{name}_vs_eager", v - e)
                _add_diff(stats, f"{name}_vs_fp32", v - r)
    del ref32
    torch.cuda.empty_cache()
    return {
        name: {
            "max": s["max"],
            "mean": s["sum"] / s["pixels"],
            "fraction_over_1": s["over1"] / s["pixels"],
            "fraction_over_2": s["over2"] / s["pixels"],
        }
        for name, s in stats.items()
    }


def _add_diff(stats: dict[str, dict[str, float]], name: str, diff: Any) -> None:
    d = diff.abs()
    s = stats.setdefault(name, {"pixels": 0, "over2": 0, "over1": 0, "sum": 0.0, "max": 0.0})
    s["max"] = max(s["max"], float(d.max()))
    s["pixels"] += d.numel()
    s["over2"] += int((d > 2).sum())
    s["over1"] += int((d > 1).sum())
    s["sum"] += float(d.float().sum())


def full_pipeline(ctx: BenchContext) -> dict[str, Any]:
    """Offline fps per variant, timed in interleaved rounds (A B C A B C ...) so that clock
    and thermal drift over the run falls on all of them alike; each variant's fps is the
    median of its rounds. After each variant is built (compiled) one round runs over every
    variant built so far, and the figures are saved: a run cut short during a later compile
    keeps comparable figures for the earlier variants."""
    torch = ctx.torch
    n = frames_in(ctx.clip.size)
    names = [b for b in ctx.o.backends if b != "tensorrt"]

    def run(p: Any) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        feats = ctx.engine.offline_features(ctx.clip)
        frames = p.render(ctx.avatar.id, list(range(n)), feats)
        assert len(frames) == n
        return n / (time.perf_counter() - t0)

    def result() -> dict[str, Any]:
        return {
            name: {"fps": statistics.median(r), "fps_rounds": r, "frames": n}
            for name, r in runs.items()
        }

    runs: dict[str, list[float]] = {}
    for name in names:
        run(ctx.pipeline(name))  # untimed: lazy set-up, the avatar's buffers
        runs[name] = []
        for built in runs:
            runs[built].append(run(ctx.pipeline(built)))
        ctx.res["pipeline"] = {**result(), "partial": True}
        ctx.save()
    for _ in range(ctx.o.rounds - 1):
        for name in names:
            runs[name].append(run(ctx.pipeline(name)))
    return result()


def render(ctx: BenchContext) -> dict[str, Any]:
    """`lipstream render`'s path into an mp4: the torch engine with its CPU paste-back, and
    the compiled step with the GPU paste-back (RGB out), 48 frames a batch."""
    from engines.backends import build_pipeline
    from engines.pipeline.gpu import PipelineOptions
    from engines.render.offline import RenderOptions, render_to_files
    from engines.render.video_io import Mp4Writer

    torch = ctx.torch
    out: dict[str, Any] = {}
    mp4 = Path(ctx.tmp.name) / "clip.mp4"
    options = RenderOptions(batch_size=20, progress=False)
    r = render_to_files(ctx.engine, ctx.avatar, ctx.clip, mp4, options=options)
    out["torch_engine_cpu_paste"] = {"fps": r.fps, "encoder": r.encoder}
    n = frames_in(ctx.clip.size)
    # an RGB pipeline running the compiled variant's step (its captured graphs, shared)
    rgb = PipelineOptions(backend="torch", buckets=ctx.o.buckets, output="rgb")
    p = build_pipeline(ctx.engine, rgb, warm_up=False)
    p.step = ctx.pipeline("compiled").step
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    feats = ctx.engine.offline_features(ctx.clip)
    height, width = ctx.avatar.size
    writer = Mp4Writer(mp4, height, width, ctx.clip)
    try:
        for s in range(0, n, 48):
            positions = list(range(s, min(n, s + 48)))
            writer.write_batch(np.stack(p.render(ctx.avatar.id, positions, feats[s : s + 48])))
    finally:
        writer.close()
    out["compiled_gpu_paste"] = {"fps": n / (time.perf_counter() - t0), "encoder": writer.encoder}
    return out


def _trt_reason() -> str:
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"tensorrt not importable: {exc}"
    return "tensorrt importable (see `lipstream engines build`)"
