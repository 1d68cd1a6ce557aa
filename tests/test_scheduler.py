"""GpuScheduler on the CPU (preview engine): deadline order, adaptive batches, lookahead,
drop-in compatibility with the frame worker's work items, cancel and stop."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from engines.base import SAMPLES_PER_FRAME, FrameJob, ready_horizon
from engines.pipeline.scheduler import (
    LAUNCH_PHASES,
    GpuScheduler,
    SchedulerOptions,
    SchedulerStopped,
)


@dataclass
class Item:
    key: str
    avatar_id: str
    audio: np.ndarray
    jobs: list[FrameJob]
    deadline: float
    done: Any
    seq: int = field(default=0)


def make_item(key: str, avatar_id: str, first: int, n: int, deadline: float, sink: list) -> Item:
    jobs = [FrameJob(i, ready_horizon(i), i) for i in range(first, first + n)]
    rng = np.random.default_rng(first)
    audio = (0.3 * rng.standard_normal(ready_horizon(first + n - 1))).astype(np.float32)

    def done(item: Item, frames: list[np.ndarray] | None, exc: BaseException | None) -> None:
        sink.append((item.key, [j.index for j in item.jobs], frames, exc, time.perf_counter()))

    return Item(key, avatar_id, audio, jobs, deadline, done)


@pytest.fixture
def engine(preview_avatar):  # type: ignore[no-untyped-def]
    from engines.preview import PreviewEngine

    eng = PreviewEngine()
    eng.load_avatar(preview_avatar)
    return eng


def test_pick_is_earliest_deadline_first_across_sessions(engine, preview_avatar) -> None:  # type: ignore[no-untyped-def]
    s = GpuScheduler(engine, SchedulerOptions(max_batch=4, lookahead_s=10))
    sink: list = []
    aid = preview_avatar.id
    s.submit(make_item("a", aid, 0, 1, deadline=3.0, sink=sink))
    s.submit(make_item("b", aid, 0, 1, deadline=1.0, sink=sink))
    s.submit(make_item("a", aid, 1, 1, deadline=4.0, sink=sink))
    s.submit(make_item("c", aid, 0, 2, deadline=2.0, sink=sink))
    with s._cond:
        batch = s.pick()
    # b (1.0), c (2.0, 2 frames), a (3.0): 4 frames = max_batch; a's second item waits
    assert [(i.key, i.deadline) for i in batch] == [("b", 1.0), ("c", 2.0), ("a", 3.0)]
    assert s.queued() == 1 and s.queued("a") == 1


def test_pick_lookahead_keeps_far_future_frames_back(engine, preview_avatar) -> None:  # type: ignore[no-untyped-def]
    s = GpuScheduler(engine, SchedulerOptions(max_batch=48, lookahead_s=0.5))
    aid = preview_avatar.id
    for k in range(10):  # a burst: frames due 40 ms apart over 0.4 s, then more at 2 s
        s.submit(make_item("burst", aid, k, 1, deadline=k * 0.04, sink=[]))
    s.submit(make_item("later", aid, 0, 1, deadline=2.0, sink=[]))
    with s._cond:
        batch = s.pick()
    assert len(batch) == 10 and all(i.key == "burst" for i in batch)
    with s._cond:
        assert [i.key for i in s.pick()] == ["later"]


def test_lone_session_runs_at_batch_one_and_frames_match_engine(engine, preview_avatar) -> None:  # type: ignore[no-untyped-def]
    s = GpuScheduler(engine, SchedulerOptions(max_batch=16))
    sink: list = []
    s.start()
    try:
        items = []
        for i in range(5):
            it = make_item("solo", preview_avatar.id, i, 1, deadline=time.monotonic(), sink=sink)
            items.append(it)
            s.submit(it)
            t0 = time.perf_counter()
            while len(sink) <= i and time.perf_counter() - t0 < 10:
                time.sleep(0.002)
        assert len(sink) == 5
        assert all(h.frames == 1 for h in s.history)  # batch 1 every step
        for (_, idx, frames, exc, _), it in zip(sink, items, strict=True):
            assert exc is None and idx == [it.jobs[0].index]
            want = engine.render(
                preview_avatar.id,
                [it.jobs[0].loop_position],
                engine.stream_features(it.audio, it.jobs),
            )
            np.testing.assert_array_equal(frames[0], want[0])
    finally:
        s.stop()


def test_load_makes_batches_grow(engine, preview_avatar) -> None:  # type: ignore[no-untyped-def]
    gate = threading.Event()
    s = GpuScheduler(engine, SchedulerOptions(max_batch=32, max_in_flight=1))
    sink: list = []
    s.start()
    try:
        # block the scheduler thread with a call while 12 sessions queue one frame each
        blocked = threading.Event()

        def hold() -> None:
            blocked.set()
            gate.wait(5)

        s.call(hold)
        assert blocked.wait(5)  # the thread is inside the call: nothing can be picked early
        for k in range(12):
            s.submit(
                make_item(
                    f"s{k}",
                    preview_avatar.id,
                    0,
                    1,
                    deadline=time.monotonic() + k * 1e-3,
                    sink=sink,
                )
            )
        gate.set()
        t0 = time.perf_counter()
        while len(sink) < 12 and time.perf_counter() - t0 < 10:
            time.sleep(0.005)
        assert len(sink) == 12
        assert max(h.frames for h in s.history) == 12  # one batch for all sessions
        assert max(h.sessions for h in s.history) == 12
    finally:
        s.stop()


def test_cancel_and_stop(engine, preview_avatar) -> None:  # type: ignore[no-untyped-def]
    s = GpuScheduler(engine)
    sink: list = []
    s.submit(make_item("x", preview_avatar.id, 0, 3, deadline=0.0, sink=sink))
    s.submit(make_item("x", preview_avatar.id, 3, 3, deadline=0.1, sink=sink))
    assert s.queued("x") == 6
    assert s.cancel("x") == 2 and s.queued() == 0
    s.start()
    s.stop()
    assert not s.alive
    with pytest.raises(SchedulerStopped):
        s.submit(make_item("x", preview_avatar.id, 0, 1, deadline=0.0, sink=sink))


def test_engine_errors_reach_the_item(engine, preview_avatar) -> None:  # type: ignore[no-untyped-def]
    s = GpuScheduler(engine)
    sink: list = []
    bad = make_item("bad", "no-such-avatar", 0, 1, deadline=0.0, sink=sink)
    s.start()
    try:
        s.submit(bad)
        t0 = time.perf_counter()
        while not sink and time.perf_counter() - t0 < 5:
            time.sleep(0.005)
        assert sink and sink[0][2] is None and sink[0][3] is not None
    finally:
        s.stop()


def test_options_validate() -> None:
    with pytest.raises(ValueError):
        SchedulerOptions(max_batch=0)
    with pytest.raises(ValueError):
        SchedulerOptions(output="yuv")
    assert SAMPLES_PER_FRAME == 640


def test_load_and_unload_avatar_run_on_the_scheduler_thread(preview_avatar) -> None:  # type: ignore[no-untyped-def]
    from engines.preview import PreviewEngine

    eng = PreviewEngine()
    s = GpuScheduler(eng)
    s.start()
    try:
        s.load_avatar(preview_avatar).result(timeout=10)
        frames = eng.render(
            preview_avatar.id,
            [0],
            eng.stream_features(np.zeros(1920, np.float32), [FrameJob(0, 1920, 0)]),
        )
        assert frames.shape[0] == 1
        s.unload_avatar(preview_avatar.id).result(timeout=10)
        with pytest.raises(Exception):  # noqa: B017 (the preview engine's own error type)
            eng.render(
                preview_avatar.id,
                [0],
                eng.stream_features(np.zeros(1920, np.float32), [FrameJob(0, 1920, 0)]),
            )
    finally:
        s.stop()


class FailingPipeline:
    """Stands in for the GPU pipeline (no GPU here): its launches raise `error` while
    `failing`, else hand back the engine-independent frames of a `_Done` batch."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.failing = True
        self.launches = 0

    def launch(self, rows: list, parts: list) -> Any:
        self.launches += 1
        if self.failing:
            raise self.error
        return _Done([np.full((4,), len(rows), np.uint8) for _ in rows])


@dataclass
class _Done:
    frames: list[np.ndarray]

    def result(self) -> list[np.ndarray]:
        return self.frames


def _wait(pred: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_a_failed_batch_fails_only_itself(engine, preview_avatar) -> None:  # type: ignore[no-untyped-def]
    pipe = FailingPipeline(ValueError("bad batch"))
    s = GpuScheduler(engine, SchedulerOptions(max_batch=4), pipeline=pipe)
    sink: list = []
    s.start()
    try:
        s.submit(make_item("a", preview_avatar.id, 0, 2, deadline=0.0, sink=sink))
        assert _wait(lambda: len(sink) == 1)
        assert isinstance(sink[0][3], ValueError) and sink[0][2] is None
        pipe.failing = False
        s.submit(make_item("a", preview_avatar.id, 2, 2, deadline=1.0, sink=sink))
        assert _wait(lambda: len(sink) == 2)
        assert sink[1][3] is None and len(sink[1][2]) == 2
        assert s.alive and s.failure is None
    finally:
        s.stop()


def test_a_cuda_error_stops_the_scheduler_and_is_reported(engine, preview_avatar) -> None:  # type: ignore[no-untyped-def]
    """A CUDA error leaves the GPU context unusable: the scheduler records it and stops (the
    server's /readyz then answers 503 engine_failed) instead of failing batch after batch."""
    err = RuntimeError("CUDA error: operation not supported on global/shared address space")
    pipe = FailingPipeline(err)
    s = GpuScheduler(engine, SchedulerOptions(max_batch=4), pipeline=pipe)
    sink: list = []
    s.start()
    try:
        s.submit(make_item("a", preview_avatar.id, 0, 1, deadline=0.0, sink=sink))
        assert _wait(lambda: not s.alive)
        assert s.failure is err and sink and sink[0][3] is err
        assert pipe.launches == 1
        with pytest.raises(SchedulerStopped):
            s.submit(make_item("a", preview_avatar.id, 1, 1, deadline=1.0, sink=sink))
    finally:
        s.stop()


class TimedPipeline(FailingPipeline):
    """A stand-in pipeline (no GPU here) that reports host time per launch phase, as
    `engines.pipeline.gpu.GpuPipeline.launch_s` does."""

    def __init__(self) -> None:
        super().__init__(ValueError("unused"))
        self.failing = False
        self.launch_s = dict.fromkeys(LAUNCH_PHASES, 0.0)

    def launch(self, rows: list, parts: list) -> Any:
        for k, phase in enumerate(self.launch_s):
            self.launch_s[phase] += 0.001 * (k + 1)
        return super().launch(rows, parts)


def test_launch_phases_reach_the_metrics(engine, preview_avatar) -> None:  # type: ignore[no-untyped-def]
    from server.metrics import ServerMetrics

    pipe = TimedPipeline()
    assert tuple(pipe.launch_s) == LAUNCH_PHASES
    metrics = ServerMetrics()
    s = GpuScheduler(engine, SchedulerOptions(max_batch=4), pipeline=pipe, metrics=metrics)
    sink: list = []
    s.start()
    try:
        for n in range(3):
            s.submit(make_item("a", preview_avatar.id, 2 * n, 2, deadline=float(n), sink=sink))
            assert _wait(lambda n=n: len(sink) == n + 1)  # type: ignore[misc]
    finally:
        s.stop()
    launches = pipe.launches
    assert launches >= 3
    for k, phase in enumerate(LAUNCH_PHASES):
        got = metrics.registry.get_sample_value(
            "lipstream_worker_launch_phase_seconds_total", {"phase": phase}
        )
        assert got == pytest.approx(0.001 * (k + 1) * launches)


def test_bind_device_sets_only_an_indexed_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler's threads make their own GPU current; `cuda` without an index (the engine's
    default) and CPU devices leave the thread as it is (torch refuses an index-less device)."""
    import torch

    from engines.pipeline.scheduler import bind_device

    calls: list[Any] = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    owners = [
        SimpleNamespace(device=torch.device("cpu")),
        SimpleNamespace(device=torch.device("cuda")),
        SimpleNamespace(device="cuda"),
        SimpleNamespace(),
    ]
    for owner in owners:
        bind_device(owner)
    assert calls == []
    bind_device(SimpleNamespace(), SimpleNamespace(device=torch.device("cuda:1")))
    bind_device(SimpleNamespace(device="cuda:0"))
    assert calls == [torch.device("cuda:1"), torch.device("cuda:0")]
