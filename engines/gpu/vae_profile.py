"""How close the VAE decoder runs to the GPU's limit: its convolution FLOPs per frame and,
from a kernel trace, where its time goes (one device call; full-size random weights, fp16):

    python -m engines.gpu.vae_profile OUT.json [--batch 16] [--budget-s 150]

- `conv_flops`: FLOPs of every Conv2d of one decode (counted from the real shapes by hooks),
  per output resolution;
- `eager`: the folded, channels-last fp16 decoder, cuDNN autotuned: CUDA kernel time per
  frame by kind (convolution/GEMM, normalisation, attention, other), the top kernels, and
  the convolutions' achieved TFLOP/s;
- `compiled`: the same decoder under torch.compile (as the server runs it, without the CUDA
  graph, so that each kernel is traced), if the budget leaves time for its compile.
Each section lands in the JSON as soon as it is done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "softmax", "sdpa")),
    ("norm", ("group_norm", "groupnorm", "layer_norm", "welford", "reduction")),
    ("conv_gemm", ("conv", "xmma", "gemm", "cutlass", "implicit", "cudnn", "nhwc", "sm90", "sm80")),
)


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel, from its name (first match in KINDS, else "other")."""
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def conv_flops(decode: Callable[[], Any], model: torch.nn.Module) -> dict[str, Any]:
    """FLOPs (2 per multiply-add) of each Conv2d that `decode()` runs, summed per output
    height, from the shapes seen by forward hooks."""
    per_res: dict[int, float] = defaultdict(float)
    calls = 0

    def hook(mod: torch.nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal calls
        kh, kw = mod.kernel_size
        per_res[int(out.shape[-2])] += 2.0 * out.numel() * (mod.in_channels // mod.groups) * kh * kw
        calls += 1

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    try:
        with torch.inference_mode():
            decode()
    finally:
        for h in handles:
            h.remove()
    return {
        "total": sum(per_res.values()),
        "by_height": dict(sorted(per_res.items())),
        "convs": calls,
    }


def kernel_table(fn: Callable[[], Any], reps: int) -> list[tuple[str, float]]:
    """(kernel name, total CUDA microseconds) over `reps` calls of `fn`, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.name] += ev.device_time_total
    return sorted(totals.items(), key=lambda kv: -kv[1])


def summarise(
    table: list[tuple[str, float]], frames: int, flops_per_frame: float
) -> dict[str, Any]:
    """Per-frame milliseconds by kind, the top kernels, and the convolutions' TFLOP/s."""
    by_kind: dict[str, float] = defaultdict(float)
    for name, us in table:
        by_kind[kernel_kind(name)] += us
    ms = {k: v / 1e3 / frames for k, v in sorted(by_kind.items())}
    conv_ms = ms.get("conv_gemm", 0.0)
    return {
        "ms_per_frame": ms,
        "total_ms_per_frame": sum(ms.values()),
        "conv_tflops": flops_per_frame / (conv_ms * 1e-3) / 1e12 if conv_ms else None,
        "top": [[name[:120], round(us / 1e3 / frames, 4)] for name, us in table[:20]],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m engines.gpu.vae_profile")
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--budget-s", type=float, default=150.0, help="skip the compiled section past this"
    )
    args = ap.parse_args(argv)
    from engines.gpu import measure
    from engines.gpu.compiled import use_inductor_cache
    from engines.gpu.fold import fold_upsamplers

    t_start = time.perf_counter()
    use_inductor_cache()
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    _, vae, _ = measure.build_models("full", dev, torch.float16)
    fold_upsamplers(vae)
    vae = vae.to(memory_format=torch.channels_last)
    g = torch.Generator(device=dev).manual_seed(5)
    z = torch.randn((args.batch, 4, 32, 32), device=dev, generator=g, dtype=torch.float16)
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "batch": args.batch,
    }

    def save(name: str, value: Any) -> None:
        res[name] = value
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"[vae_profile] {name} {json.dumps(value)[:400]}", file=sys.stderr, flush=True)

    flops = conv_flops(lambda: vae.decode(z[:1]), vae)
    save("conv_flops", flops)
    with torch.inference_mode():
        eager = lambda: vae.decode(z).sample  # noqa: E731
        timed = measure.gpu_time_ms(eager, reps=10)
        out = summarise(kernel_table(eager, args.reps), args.reps * args.batch, flops["total"])
        out["event_ms_per_frame"] = timed["median_ms"] / args.batch
        save("eager", out)
        if time.perf_counter() - t_start > args.budget_s:
            save("compiled", {"skipped": "budget"})
            return
        compiled = torch.compile(lambda x: vae.decode(x).sample)
        t = time.perf_counter()
        compiled(z)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t
        timed = measure.gpu_time_ms(lambda: compiled(z), reps=10)
        out = summarise(
            kernel_table(lambda: compiled(z), args.reps), args.reps * args.batch, flops["total"]
        )
        out["event_ms_per_frame"] = timed["median_ms"] / args.batch
        out["compile_s"] = compile_s
        save("compiled", out)


if __name__ == "__main__":
    main()
