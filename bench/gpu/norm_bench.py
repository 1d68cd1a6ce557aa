"""GroupNorm + SiLU alone, at the VAE decoder's shapes: eager torch and the compiled
channels-last form (`engines.pipeline.nhwc_norm`), against the bytes each call must move
(read twice, write once):

    python -m bench.gpu.norm_bench OUT.json [--batch 16] [--reps 20] [--no-compile]
        [--device cuda|cpu] [--shapes C:H:W:count,...]

For each shape: ms per call and GB/s of each form, the largest difference from eager
float32 GroupNorm + SiLU, and the decoder's total per frame (count x time / batch) for each
form. Progress on stderr; JSON written after each shape. The CPU run (`--device cpu`, small
`--shapes`) is a smoke test of the code path only; its times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# (channels, height, width, how many of the decoder's norm + SiLU pairs run at that shape) for
# the sd-vae-ft-mse decoder at MuseTalk's 256 x 256 face: mid block and up block 0 at 32 x 32,
# up block 1 at 64, up block 2 at 128 (its first norm sees 512 channels), up block 3 at 256
DECODER_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (512, 32, 32, 10),
    (512, 64, 64, 6),
    (512, 128, 128, 1),
    (256, 128, 128, 5),
    (256, 256, 256, 1),
    (128, 256, 256, 6),
)
GROUPS = 32


def _parse_shapes(text: str) -> tuple[tuple[int, int, int, int], ...]:
    out = []
    for item in text.split(","):
        c, h, w, k = (int(v) for v in item.split(":"))
        out.append((c, h, w, k))
    return tuple(out)


def bench_shape(
    x: torch.Tensor, norm: nn.GroupNorm, reps: int, compile_torch: bool
) -> dict[str, Any]:
    """One shape: {form: {ms, GB_s, max_diff}} for eager and compiled channels-last; `x`
    channels-last, `norm` in x's dtype."""
    from bench.gpu import measure
    from engines.pipeline.nhwc_norm import ChannelsLastGroupNorm

    nbytes = 3 * x.numel() * x.element_size()
    want = nn.functional.silu(
        nn.functional.group_norm(
            x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps
        )
    )
    forms: dict[str, Callable[[], torch.Tensor]] = {"eager": lambda: nn.functional.silu(norm(x))}
    if compile_torch:
        cl = ChannelsLastGroupNorm(norm)
        forms["compiled_channels_last"] = torch.compile(lambda: nn.functional.silu(cl(x)))
    row: dict[str, Any] = {"MB": x.numel() * x.element_size() / 2**20}
    for name, fn in forms.items():
        ms = measure.median_ms(fn, x.device, reps)
        diff = float((fn().float() - want).abs().max())
        row[name] = {"ms": ms, "GB_s": nbytes / ms / 1e6, "max_diff": diff}
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu.norm_bench")
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled torch form")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="", help="C:H:W:count,... instead of the decoder's")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    shapes = _parse_shapes(args.shapes) if args.shapes else DECODER_SHAPES
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch": args.batch,
        "dtype": str(dtype),
        "shapes": {},
    }
    totals: dict[str, float] = {}
    g = torch.Generator().manual_seed(0)
    for c, h, w, count in shapes:
        norm = nn.GroupNorm(GROUPS if c % GROUPS == 0 else 1, c, eps=1e-6)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(c, generator=g))
            norm.bias.copy_(0.1 * torch.randn(c, generator=g))
        norm = norm.to(dev, dtype)
        x = torch.randn((args.batch, c, h, w), generator=g).to(dev, dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            row = bench_shape(x, norm, args.reps, not args.no_compile)
        row["count"] = count
        for name in [k for k in row if isinstance(row[k], dict)]:
            totals[f"{name}_ms_per_frame"] = totals.get(f"{name}_ms_per_frame", 0.0) + (
                count * row[name]["ms"] / args.batch
            )
        res["shapes"][f"{c}x{h}x{w}"] = row
        res["decoder_totals"] = totals
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
        summary = {k: round(v["ms"], 4) for k, v in row.items() if isinstance(v, dict)}
        print(f"[norm_bench] {c}x{h}x{w} x{count}: {summary}", file=sys.stderr)
    print(f"[norm_bench] decoder per frame: {json.dumps(totals)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
