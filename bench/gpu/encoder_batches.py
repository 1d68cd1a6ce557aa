"""What a whisper encoder call costs at each fixed batch, and so which `encoder_batch` a
streaming step should pad to (one device call; full-size random weights, fp16):

    python -m bench.gpu.encoder_batches OUT.json [--batches 1,2,4,8]

The streaming featurizer pads every encoder call to a fixed batch, so that a pass's result
never depends on which other passes shared its call. A step that needs k windows then costs
ceil(k / b) calls of batch b. For each b this measures one call (compiled + CUDA graph, as
the pipeline runs it; eager on the CPU smoke run) and tabulates the cost of k = 1..8
windows, with the cheapest b for each k.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from typing import Any

import torch


def step_costs(call_ms: dict[int, float], most: int = 8) -> dict[str, Any]:
    """{k: {b: ms for ceil(k/b) calls of batch b}, "best": {k: b}} for k = 1..most."""
    table = {
        k: {b: -(-k // b) * ms for b, ms in sorted(call_ms.items())} for k in range(1, most + 1)
    }
    best = {k: min(row, key=lambda b: (row[b], b)) for k, row in table.items()}
    return {"ms_for_k_windows": table, "best_batch_for_k": best}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu.encoder_batches")
    ap.add_argument("out")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (eager)")
    ap.add_argument("--size", default="full", choices=["full", "tiny"])
    args = ap.parse_args(argv)
    batches = sorted({int(b) for b in args.batches.split(",")})
    if not batches or batches[0] < 1:
        raise SystemExit(f"--batches must be positive, got {args.batches!r}")
    from bench.gpu import measure

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    _, _, encoder = measure.build_models(args.size, dev, dtype)
    n_mels = int(encoder.config.num_mel_bins)
    frames = 2 * int(encoder.config.max_source_positions)
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "gpu": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "mel": [n_mels, frames],
        "calls": {},
    }
    call_ms: dict[int, float] = {}
    for b in batches:
        mel = torch.randn((b, n_mels, frames), device=dev, dtype=dtype)
        with torch.inference_mode():
            if cuda:
                from engines.pipeline.compiled import CompiledEncoder

                ce = CompiledEncoder(encoder, b, n_mels, frames)
                warm_s = ce.warm_up()
                ms = float(measure.gpu_time_ms(partial(ce, mel), reps=30)["median_ms"])
            else:
                warm_s = 0.0
                run = partial(encoder, mel, output_hidden_states=True)
                ms = measure.cpu_time_ms(run, reps=3, warmup=1)
        call_ms[b] = ms
        res["calls"][b] = {"ms_per_call": ms, "ms_per_window": ms / b, "warmup_s": warm_s}
        print(f"[encoder_batches] batch {b}: {ms:.3f} ms per call", file=sys.stderr, flush=True)
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    res.update(step_costs(call_ms))
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"[encoder_batches] best batch for k windows: {res['best_batch_for_k']}", file=sys.stderr)


if __name__ == "__main__":
    main()
