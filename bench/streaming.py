"""The bench's streaming section: for each streaming variant, sessions pushing speech in real
time through the real `GpuScheduler` on that variant's pipeline (no network), swept over
session counts (`bench.simulation.simulate`), with one session's first-frame latency and the
most sessions each measure holds.
"""

from __future__ import annotations

import sys
from typing import Any

from bench.context import BenchContext
from bench.options import split_gather, stream_runs
from bench.simulation import (
    latency_runs,
    max_sessions_by_lead,
    max_sessions_streaming_bar,
    simulate,
)


def streaming(ctx: BenchContext) -> dict[str, Any]:
    """{variant: its sweep}; the first variant gets the long run too."""
    return {
        name: _variant(ctx, name, long_run=k == 0) for k, name in enumerate(ctx.o.stream_backends)
    }


def _variant(ctx: BenchContext, name: str, long_run: bool) -> dict[str, Any]:
    from engines.pipeline.scheduler import GpuScheduler, SchedulerOptions

    base, gather_s = split_gather(name)
    p = ctx.pipeline(base)  # "compiled-gather20" streams through "compiled"'s pipeline
    # as the server's load_avatar does: one silent frame through every stage and the peak
    # batch, so the first utterance pays no lazy set-up
    p.prepare_avatar(ctx.avatar.id)
    opts = SchedulerOptions(
        max_batch=max(ctx.o.buckets),
        output="i420",
        gather_s=ctx.o.gather_s if gather_s is None else gather_s,
    )
    sched = GpuScheduler(ctx.engine, opts, pipeline=p)
    sched.start()
    out: dict[str, Any] = {}
    try:
        out["latency_1_session"] = latency_runs(sched, ctx.avatar.id, 10)
        for n, secs in stream_runs(ctx.o, long_run):
            print(f"[bench] streaming {n} sessions for {secs:.0f}s", file=sys.stderr, flush=True)
            out[str(n)] = simulate(sched, ctx.avatar.id, n, secs, ctx.torch, ctx.o.phase_spread_s)
            ctx.res[f"{name}_partial"] = out
            ctx.save()
    finally:
        sched.stop()
    ok = [int(k) for k, v in out.items() if k.isdigit() and v["holds_realtime"]]
    out["max_sessions_realtime"] = max(ok) if ok else 0
    out["max_sessions_by_lead"] = max_sessions_by_lead(out)
    out["max_sessions_by_held_lead"] = max_sessions_by_lead(out, "held_frames_by_lead")
    out["max_sessions_streaming_bar"] = max_sessions_streaming_bar(out)
    return out
