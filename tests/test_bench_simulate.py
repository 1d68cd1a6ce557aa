"""The streaming bench's simulation (`bench.simulation.simulate`) through the real scheduler on
the CPU, with the preview engine standing in for the GPU pipeline (CI has no GPU): sessions
pushing speech in real time get every frame, and the playout figures add up."""

from __future__ import annotations

import itertools

import pytest

from bench.simulation import MAX_LEAD_FRAMES, playout_holds, playout_lateness_ms, simulate


def test_playout_lateness_counts_from_the_first_frames_arrival() -> None:
    # frames 1 and 3 arrive 10 ms and 50 ms after their slots; 2 is early (not negative)
    got = playout_lateness_ms([1.0, 1.05, 1.07, 1.17])
    assert got == pytest.approx([0.0, 10.0, 0.0, 50.0])
    assert playout_lateness_ms([]) == []


def test_playout_holds_counts_what_the_player_repeats() -> None:
    """One late start (every frame 45 ms behind the first one's grid): the late-frame count
    says every frame, the player holds once and plays the rest a tick later."""
    late_start = [1.0] + [1.0 + 0.045 + i / 25 for i in range(1, 50)]
    assert sum(1 for x in playout_lateness_ms(late_start) if x > 1.0) == 49
    assert playout_holds(late_start) == 2  # 45 ms: two ticks
    assert playout_holds(late_start, lead=1) == 1
    assert playout_holds(late_start, lead=2) == 0
    # a stall of 100 ms in the middle: held 3 ticks (ceil(100 / 40)), the rest on time after
    stall = [1.0 + i / 25 + (0.1 if i >= 10 else 0.0) for i in range(30)]
    assert playout_holds(stall) == 3
    # on time (within a millisecond): nothing held
    assert playout_holds([1.0 + i / 25 + 0.0005 for i in range(30)]) == 0
    assert playout_holds([]) == 0


def test_simulate_delivers_every_frame_through_the_scheduler(preview_avatar) -> None:  # type: ignore[no-untyped-def]
    from engines.backends import create_scheduler
    from engines.pipeline.scheduler import SchedulerOptions
    from engines.preview import PreviewEngine

    engine = PreviewEngine()
    engine.load_avatar(preview_avatar)
    sched = create_scheduler(engine, SchedulerOptions(max_batch=8, output="rgb"))
    sched.start()
    try:
        res = simulate(sched, preview_avatar.id, n=2, seconds=1.5, torch=None)
    finally:
        sched.stop()
    assert res["errors"] == 0
    assert res["frames_delivered"] == res["frames_expected"] > 2 * 30
    assert len(res["late_frames_by_lead"]) == MAX_LEAD_FRAMES + 1
    # more playout lead never makes more frames late
    lates = res["late_frames_by_lead"]
    assert all(a >= b for a, b in itertools.pairwise(lates))
    assert res["late_frames_40ms_buffer"] == lates[1]
    helds = res["held_frames_by_lead"]
    assert all(a >= b for a, b in itertools.pairwise(helds))
    assert res["frame_lateness_ms_max"] >= res["frame_lateness_ms_p99"] >= 0
    assert res["first_frame_ms_p50"] is not None and res["first_frame_ms_p50"] > 100  # lookahead


def test_max_sessions_by_lead() -> None:
    from bench.simulation import max_sessions_by_lead

    def run(late: list[int], fps: float = 25.0, missing: int = 0) -> dict:
        return {
            "frames_delivered": 100 - missing,
            "frames_expected": 100,
            "delivered_fps_min": fps,
            "late_frames_by_lead": late,
        }

    runs = {
        "1": run([0, 0, 0, 0]),
        "12": run([50, 0, 0, 0]),
        "16": run([400, 90, 0, 0]),
        "20": run([900, 500, 80, 0], fps=24.0),  # below 25 fps: never counts
        "latency_1_session": {"first_frame_ms_p50": 110.0},
        "24": run([0, 0, 0, 0], missing=3),  # frames missing: never counts
    }
    assert max_sessions_by_lead(runs) == [1, 12, 16, 16]
    # with held ticks instead: 16's late frames were one hold at one frame of lead
    runs["16"]["held_frames_by_lead"] = [3, 0, 0, 0]
    assert max_sessions_by_lead(runs, "held_frames_by_lead") == [1, 16, 16, 16]
    assert max_sessions_by_lead({}) == [0, 0, 0, 0]


def test_max_sessions_streaming_bar() -> None:
    """The streaming bar: all frames, >= 24.5 fps, p99 interval <= 60 ms (late frames aside)."""
    from bench.simulation import max_sessions_streaming_bar

    def run(p99: float, fps: float = 25.0, missing: int = 0) -> dict:
        return {
            "frames_delivered": 100 - missing,
            "frames_expected": 100,
            "delivered_fps_min": fps,
            "frame_interval_ms_p99": p99,
            "late_frames_by_lead": [297, 297, 0, 0],  # not part of this bar
        }

    runs = {"1": run(40.6), "16": run(41.6), "20": run(104.0, fps=24.6), "24": run(41.0, missing=1)}
    assert max_sessions_streaming_bar(runs) == 16
    runs["20"] = run(41.8, fps=24.9)
    assert max_sessions_streaming_bar(runs) == 20
    assert max_sessions_streaming_bar({"latency_1_session": {}}) == 0
