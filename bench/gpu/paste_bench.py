"""The paste stage's cost, whole-frame I420 conversion against the region-only one
(`engines.pipeline.paste`), on one CUDA GPU:

    python -m bench.gpu.paste_bench OUT.json [--height 720 --width 1280]

For each batch size: GPU ms per frame (CUDA events; the kernels as stream C runs them) and
host ms per call (the launch cost the scheduler thread pays), for `whole` =
`rgb_to_i420(paste_back(...))` (the whole frame converted) and `region` = `paste_i420`;
and whether the two gave the same bytes. Prints one JSON line per batch size as it goes.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

BATCHES = (1, 16, 48)


def _whole(gav: Any, idx: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    from engines.pipeline import paste

    return paste.rgb_to_i420(paste.paste_back(gav, idx, faces))


def measure(height: int, width: int, batches: tuple[int, ...] = BATCHES) -> dict[str, Any]:
    from bench.gpu.measure import cpu_time_ms, gpu_time_ms, synthetic_avatar
    from engines.pipeline import paste

    if not torch.cuda.is_available():
        raise SystemExit("paste_bench needs a CUDA GPU")
    dev = torch.device("cuda")
    av = synthetic_avatar(25, height, width)
    gav = paste.upload_avatar(av, dev)
    if gav.i420 is None:
        raise SystemExit(f"{height}x{width}: an odd frame size has no region-only I420 path")
    res: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "size": [height, width],
        "region": list(gav.region),
        "avatar_bytes_per_frame": gav.nbytes / len(av.frames),
        "i420_bytes_per_frame": paste.i420_size(height, width),
        "batches": {},
    }
    g = torch.Generator(device=dev).manual_seed(0)
    for b in batches:
        idx = torch.arange(b, device=dev) % len(av.frames)
        faces = torch.randint(0, 256, (b, 3, 256, 256), generator=g, device=dev).to(torch.uint8)
        ways = {
            "whole": functools.partial(_whole, gav, idx, faces),
            "region": functools.partial(paste.paste_i420, gav, idx, faces),
        }
        row: dict[str, Any] = {"same_bytes": bool(torch.equal(ways["whole"](), ways["region"]()))}
        for name, fn in ways.items():
            ms = gpu_time_ms(fn, reps=30)
            host = cpu_time_ms(fn, reps=30)  # launches only, mostly: nothing syncs
            torch.cuda.synchronize()
            row[name] = {"gpu_ms_per_frame": ms["median_ms"] / b, "host_ms_per_call": host}
        row["gpu_speedup"] = row["whole"]["gpu_ms_per_frame"] / row["region"]["gpu_ms_per_frame"]
        res["batches"][str(b)] = row
        print(json.dumps({"batch": b, **row}), file=sys.stderr, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    a = ap.parse_args()
    res = measure(a.height, a.width)
    a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
