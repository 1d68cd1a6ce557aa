"""server.ops.stall_watch: the loop-lag monitor, collector pauses and trim times, measured on real
stalls (a blocked event loop, real collections, a slow trim function); and the soak's stall
summary from /metrics series."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import pytest
from prometheus_client import CollectorRegistry, Histogram

from bench.soak import _stalls
from server.ops import malloc_tuning, stall_watch


def _histogram(labels: tuple[str, ...] = ()) -> Histogram:
    return Histogram(
        "t_seconds",
        "test",
        list(labels),
        buckets=(0.05, 0.1, 0.25, 1.0),
        registry=CollectorRegistry(),
    )


def _count(h: Histogram, labels: tuple[str, ...] = ()) -> float:
    series = h.labels(*labels) if labels else h
    return sum(s.value for m in series.collect() for s in m.samples if s.name.endswith("_count"))


def test_a_blocked_loop_is_measured_and_logged_with_its_collector_pause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = _histogram()
    pauses = stall_watch.GcPauses().install()

    async def main() -> stall_watch.LoopLag:
        lag = stall_watch.LoopLag(h, pauses, interval_s=0.01, warn_s=0.15).start()
        await asyncio.sleep(0.1)
        gc.collect()  # a full collection just before the stall: named in its log line
        time.sleep(0.3)  # noqa: ASYNC251 (the stall under test: the loop blocked)
        await asyncio.sleep(0.1)
        await lag.stop()
        return lag

    try:
        with caplog.at_level(logging.WARNING, logger="server.ops.stall_watch"):
            lag = asyncio.run(main())
    finally:
        pauses.uninstall()
    assert lag.longest_s >= 0.25 and lag.stalls == 1
    assert _count(h) >= 10  # a sample every ~10 ms, not just the stall
    lines = [r.getMessage() for r in caplog.records if "event loop stalled" in r.getMessage()]
    assert len(lines) == 1 and "lag_ms=" in lines[0] and "gc_generation=2" in lines[0]


def test_a_quiet_loop_logs_no_stall(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> stall_watch.LoopLag:
        lag = stall_watch.LoopLag(interval_s=0.01, warn_s=0.15).start()
        await asyncio.sleep(0.3)
        await lag.stop()
        return lag

    with caplog.at_level(logging.WARNING, logger="server.ops.stall_watch"):
        lag = asyncio.run(main())
    assert lag.stalls == 0 and lag.longest_s < 0.15
    assert not [r for r in caplog.records if "stalled" in r.getMessage()]


def test_collector_pauses_are_timed_by_generation_and_uninstall_stops_them() -> None:
    h = _histogram(("generation",))
    pauses = stall_watch.GcPauses(h).install()
    pauses.install()  # twice: still one callback
    assert gc.callbacks.count(pauses._callback) == 1
    gc.collect()
    gc.collect(0)
    pauses.uninstall()
    assert pauses.collections[2] >= 1 and pauses.collections[0] >= 1
    assert _count(h, ("2",)) >= 1 and pauses.longest_s > 0
    assert pauses.last is not None and pauses.last[1] == 0  # the last one was generation 0
    n = pauses.collections[2]
    gc.collect()
    assert pauses.collections[2] == n  # uninstalled
    assert pauses._callback not in gc.callbacks


def test_freeze_heap_moves_the_live_heap_out_of_collections() -> None:
    try:
        frozen = stall_watch.freeze_heap()
        assert frozen > 1000 and gc.get_freeze_count() == frozen
        # a full collection now walks only what was made since: far fewer objects
        assert len(gc.get_objects(generation=2)) < frozen
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_lag_settings_must_be_positive() -> None:
    with pytest.raises(ValueError, match="> 0"):
        stall_watch.LoopLag(interval_s=0)


def test_every_slow_trim_is_logged_and_observed(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[float] = []

    def slow_trim(pad: int) -> int:
        time.sleep(malloc_tuning.SLOW_TRIM_S + 0.01)
        return 1

    trimmer = malloc_tuning.Trimmer(slow_trim, 60.0, observe=seen.append)
    with caplog.at_level(logging.WARNING, logger="server.ops.malloc_tuning"):
        trimmer.trim_now()
        trimmer.trim_now()  # no slower than the first: still logged
    assert len(seen) == 2 and min(seen) > malloc_tuning.SLOW_TRIM_S
    assert len([r for r in caplog.records if "trim was slow" in r.getMessage()]) == 2
    assert trimmer.last is not None and trimmer.last[1] == seen[-1]


def test_soak_stall_summary_counts_the_window_only() -> None:
    def sample(
        t: float, lag_n: float, le100: float, le250: float, gc2: float, trims: float
    ) -> dict[str, float]:
        return {
            "t": t,
            "lag_n": lag_n,
            "lag_le_100ms": le100,
            "lag_le_250ms": le250,
            "gc2_n": gc2,
            "gc2_s": 0.02 * gc2,
            "gc2_le_50ms": gc2,
            "trim_n": trims,
            "trim_s": 0.004 * trims,
            "trim_le_50ms": trims - 1 if trims else 0,
        }

    samples = [
        sample(0, 100, 90, 95, 5, 0),  # warm-up: its stalls are left out
        sample(10, 500, 480, 488, 6, 2),
        sample(20, 1000, 975, 987, 8, 4),
    ]
    out = _stalls(samples, warmup=10)["stalls"]
    assert out["loop_lags_over_100ms"] == 500 - 495 + 0  # (1000-500) - (975-480)
    assert out["loop_lags_over_250ms"] == 500 - 499
    assert out["gc_full_collections"] == 2 and out["gc_full_over_50ms"] == 0
    assert out["gc_full_ms_mean"] == pytest.approx(20.0)
    assert out["malloc_trims"] == 2 and out["malloc_trims_over_50ms"] == 0
    assert out["malloc_trim_ms_mean"] == pytest.approx(4.0)
    assert _stalls(samples[:1], warmup=0) == {}
