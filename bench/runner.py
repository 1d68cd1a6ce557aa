"""`lipstream bench`: throughput and streaming latency on this machine, JSON out.

Sections, in the order they run (each in the JSON, progress on stderr, a short table last):
- `reference`, `offline`, `accuracy`, `pipeline`, `render`: the offline path
  (`bench.offline`), MuseTalk's own way as the baseline;
- `streaming`: N sessions pushing speech in real time (20 ms chunks) through the real
  `GpuScheduler` (no network): delivered fps, frame interval p50/p99, first-frame latency
  p50/p99, late frames, GPU memory, CPU use; `--sessions` sweeps N (`bench.streaming`);
- `encoders`: aiortc's VP8 / H.264 encoders at the avatar size: CPU cores per session.

What each section works on is a `bench.context.BenchContext`; the options and variant names
are `bench.options`; the table is `bench.report`. `python -m bench.runner` takes the same
options as `lipstream bench` without its soak, ramp and allocator modes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import offline
from bench.context import BenchContext
from bench.options import PHASE_SPREAD_S, BenchOptions, check_backends
from bench.report import print_table
from bench.streaming import streaming

log = logging.getLogger(__name__)

__all__ = ["PHASE_SPREAD_S", "Bench", "BenchOptions", "run_bench"]


class Bench:
    """The sections asked for, in order, each caught and timed, the JSON saved after each."""

    def __init__(self, options: BenchOptions, out_path: Path) -> None:
        self.ctx = BenchContext(options, out_path)

    def section(self, name: str, fn: Callable[[BenchContext], Any]) -> Any:
        ctx = self.ctx
        if name not in ctx.o.sections:
            return None
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            out = fn(ctx)
        except Exception as exc:
            log.exception("bench section failed: section=%s", name)
            out = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        if isinstance(out, dict):
            out["section_s"] = round(time.perf_counter() - t0, 1)
        ctx.res[name] = out
        ctx.save()
        print(
            f"[bench] {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True
        )
        return out

    def run(self) -> dict[str, Any]:
        ctx = self.ctx
        ctx.setup()
        self.section("reference", offline.reference)
        self.section("offline", offline.offline)
        self.section("accuracy", offline.accuracy)
        self.section("pipeline", offline.full_pipeline)
        self.section("render", offline.render)
        self.section("streaming", streaming)
        self.section("encoders", encoders)
        ctx.res["gpu_mem_peak_GiB"] = ctx.torch.cuda.max_memory_allocated() / 2**30
        ctx.save()
        return ctx.res


def encoders(ctx: BenchContext) -> dict[str, Any]:
    """aiortc's encoders at the avatar size: ms per frame and CPU cores per session."""
    from bench.gpu.measure import encoder_cost

    return encoder_cost(ctx.o.height, ctx.o.width, frames=40, threads=(1, 8, 16))


def run_bench(options: BenchOptions, out: Path | None = None) -> dict[str, Any]:
    """Run the benchmark; writes JSON to `out` (default bench/results/<gpu>_<date>.json)."""
    import torch

    from engines.base import EngineError

    if not torch.cuda.is_available():
        raise EngineError("`lipstream bench` measures the GPU path and needs a CUDA GPU")
    check_backends(options)
    if out is None:
        gpu = torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-")
        out = Path("bench/results") / f"bench_{gpu}_{time.strftime('%Y-%m-%d_%H%M')}.json"
    res = Bench(options, out).run()
    print_table(res, sys.stdout)
    return res


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.runner`: the options' defaults are BenchOptions' own."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    d = BenchOptions()
    ap = argparse.ArgumentParser(prog="python -m bench.runner")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--sessions", default=",".join(map(str, d.sessions)))
    ap.add_argument("--long-s", type=float, default=d.long_s)
    ap.add_argument("--sweep-s", type=float, default=d.sweep_s)
    ap.add_argument("--gather-ms", type=float, default=d.gather_s * 1e3)
    ap.add_argument("--phase-spread-ms", type=float, default=d.phase_spread_s * 1e3)
    ap.add_argument("--sections", default=",".join(d.sections))
    ap.add_argument("--backends", default=",".join(d.backends))
    ap.add_argument("--stream-backends", default=",".join(d.stream_backends))
    ap.add_argument("--clip-s", type=float, default=d.clip_s)
    ap.add_argument("--rounds", type=int, default=d.rounds)
    ap.add_argument(
        "--buckets",
        default=",".join(map(str, d.buckets)),
        help="the pipelines' batch buckets (offline only needs the largest)",
    )
    a = ap.parse_args(argv)
    options = BenchOptions(
        sessions=_ints(a.sessions),
        long_s=a.long_s,
        sweep_s=a.sweep_s,
        gather_s=a.gather_ms / 1e3,
        phase_spread_s=a.phase_spread_ms / 1e3,
        sections=_names(a.sections),
        backends=_names(a.backends),
        stream_backends=_names(a.stream_backends),
        buckets=_ints(a.buckets),
        clip_s=a.clip_s,
        rounds=a.rounds,
    )
    run_bench(options, a.out)


if __name__ == "__main__":
    main()
