"""How close the VAE decoder (or the UNet) runs to the GPU's limit: its convolution FLOPs per
frame and, from a kernel trace, where its time goes (one device call; full-size random
weights, fp16):

    python -m bench.gpu.kernel_profile OUT.json [--model vae|unet] [--batch 16]

- `conv_flops`: FLOPs of every Conv2d of one frame (counted from the real shapes by hooks),
  per output resolution;
- `eager`: the channels-last fp16 model (the VAE with folded upsampling), cuDNN autotuned:
  CUDA kernel time per frame by kind (convolution/GEMM, normalisation, attention, other),
  the top kernels, and the convolutions' achieved TFLOP/s;
- `compiled`: the same under torch.compile (as the server runs it, without the CUDA graph,
  so that each kernel is traced), if `--budget-s` leaves time for its compile;
- each with its largest distance from the stock eager model (uint8 faces for the VAE, the
  raw output for the UNet).
Flags: `--no-fold`, `--nchw`, `--nhwc-norm` (channels-last GroupNorms, engines.pipeline.nhwc_norm);
`--device cpu --size tiny` for a smoke run (aten ops' CPU time instead of kernels).
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
    (
        "norm",
        ("group_norm", "groupnorm", "layer_norm", "welford", "reduction", "var_mean", "rsqrt"),
    ),
    (
        "conv_gemm",
        ("conv", "xmma", "gemm", "cutlass", "implicit", "cudnn", "nhwc", "sm90", "sm80", "nvjet"),
    ),
)


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel, from its name (first match in KINDS, else "other")."""
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def conv_flops(
    decode: Callable[[], Any], model: torch.nn.Module, frames: int = 1
) -> dict[str, Any]:
    """FLOPs (2 per multiply-add) per frame of each Conv2d that `decode()` runs (over
    `frames` frames), summed per output height, from the shapes seen by forward hooks."""
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
        "total": sum(per_res.values()) / frames,
        "by_height": {h: f / frames for h, f in sorted(per_res.items())},
        "convs": calls,
    }


def kernel_table(fn: Callable[[], Any], reps: int, device: torch.device) -> list[tuple[str, float]]:
    """(kernel name, total microseconds) over `reps` calls of `fn`, from torch.profiler: CUDA
    kernels on a GPU, aten ops' own CPU time on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        _sync(device)
    totals: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if cuda and ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.name] += ev.device_time_total
        elif not cuda and ev.name.startswith("aten::"):
            totals[ev.name] += ev.self_cpu_time_total
    return sorted(totals.items(), key=lambda kv: -kv[1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _model(args: argparse.Namespace, dev: torch.device, dtype: torch.dtype) -> Any:
    """(module to hook, make(module) -> the call to profile, compare(output) -> tensor)."""
    from bench.gpu import measure
    from engines.pipeline.compiled import to_faces

    unet, vae, _ = measure.build_models(args.size, dev, dtype)
    g = torch.Generator(device=dev).manual_seed(5)
    side = 32 if args.size == "full" else 8
    if args.model == "vae":
        z = torch.randn((args.batch, 4, side, side), device=dev, generator=g, dtype=dtype)
        return vae, (lambda m: lambda: m.decode(z).sample), to_faces
    lat = torch.randn((args.batch, 8, side, side), device=dev, generator=g, dtype=dtype)
    cond = torch.randn((args.batch, 50, 384), device=dev, generator=g, dtype=dtype)
    t0 = torch.zeros(1, dtype=torch.long, device=dev)
    return unet, (lambda m: lambda: m(lat, t0, encoder_hidden_states=cond).sample), None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu.kernel_profile")
    ap.add_argument("out")
    ap.add_argument("--model", default="vae", choices=["vae", "unet"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=150.0, help="skip `compiled` past this")
    ap.add_argument("--no-fold", action="store_true", help="keep the VAE's own upsampling")
    ap.add_argument("--nchw", action="store_true", help="NCHW instead of channels-last")
    ap.add_argument(
        "--nhwc-norm",
        action="store_true",
        help="channels-last GroupNorms (engines.pipeline.nhwc_norm)",
    )
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    ap.add_argument("--size", default="full", choices=["full", "tiny"])
    args = ap.parse_args(argv)
    from bench.gpu import measure
    from engines.pipeline.compiled import use_inductor_cache
    from engines.pipeline.fold import fold_upsamplers

    t_start = time.perf_counter()
    use_inductor_cache()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    torch.backends.cudnn.benchmark = True
    model, make, compare = _model(args, dev, dtype)
    fold = args.model == "vae" and not args.no_fold

    def comparable(out: torch.Tensor) -> torch.Tensor:
        # int16: uint8 faces would wrap around in the subtraction below (-1 reads as 255)
        return compare(out).to(torch.int16) if compare is not None else out.float()

    with torch.inference_mode():
        reference = comparable(make(model)())  # the stock eager model
    if args.nhwc_norm:
        from engines.pipeline.nhwc_norm import swap_group_norms

        swap_group_norms(getattr(model, "decoder", model))
    if fold:
        fold_upsamplers(model)
    if not args.nchw:
        model = model.to(memory_format=torch.channels_last)
    call = make(model)
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "gpu": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "size": args.size,
        "batch": args.batch,
        "fold": fold,
        "layout": "nchw" if args.nchw else "channels_last",
        "nhwc_norm": args.nhwc_norm,
    }

    def save(name: str, value: Any) -> None:
        res[name] = value
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"[kernel_profile] {name} {json.dumps(value)[:400]}", file=sys.stderr, flush=True)

    def profile_of(fn: Callable[[], Any]) -> dict[str, Any]:
        out = summarise(kernel_table(fn, args.reps, dev), args.reps * args.batch, flops["total"])
        out["event_ms_per_frame"] = measure.median_ms(fn, dev, 10, cpu_reps=3) / args.batch
        d = (comparable(fn()) - reference).abs().max()
        out["max_diff_vs_stock"] = int(d) if compare is not None else float(d)
        return out

    flops = conv_flops(call, model, args.batch)
    save("conv_flops", flops)
    with torch.inference_mode():
        save("eager", profile_of(call))
        if time.perf_counter() - t_start > args.budget_s:
            save("compiled", {"skipped": "budget"})
            return
        compiled = torch.compile(call)
        t = time.perf_counter()
        compiled()
        _sync(dev)
        compile_s = time.perf_counter() - t
        out = profile_of(compiled)
        out["compile_s"] = compile_s
        save("compiled", out)


if __name__ == "__main__":
    main()
