"""The frame worker: one engine thread, earliest deadline first, batches across sessions."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pytest

from avatars.avatar import Avatar
from engines.base import Engine, FrameJob
from engines.preview import PreviewEngine
from server.session.worker import FrameWorker, WorkerStopped, WorkItem, concat_features


class RecordingEngine(Engine):
    """Features = job index; render returns frames tagged with them; records every call."""

    name: ClassVar[str] = "recording"

    def __init__(self, fail_on: str | None = None) -> None:
        self.renders: list[tuple[str, list[int], list[float]]] = []
        self.threads: set[str] = set()
        self.feature_calls: list[tuple[int, list[int]]] = []
        self.fail_on = fail_on

    def load_avatar(self, avatar: Avatar) -> None:
        self.threads.add(threading.current_thread().name)

    def unload_avatar(self, avatar_id: str) -> None:
        self.threads.add(threading.current_thread().name)

    def offline_features(self, audio: np.ndarray) -> Any:
        raise NotImplementedError

    def stream_features(self, audio: np.ndarray, jobs: Sequence[FrameJob]) -> Any:
        self.threads.add(threading.current_thread().name)
        self.feature_calls.append((len(audio), [j.index for j in jobs]))
        return np.array([float(audio[0]) * 1000 + j.index for j in jobs], dtype=np.float32)

    def render(self, avatar_id: str, loop_positions: Sequence[int], features: Any) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        if avatar_id == self.fail_on:
            raise RuntimeError("boom")
        self.renders.append((avatar_id, list(loop_positions), [float(f) for f in features]))
        return np.stack([np.full((2, 2, 3), int(f) % 256, np.uint8) for f in features])


class Results:
    def __init__(self) -> None:
        self.got: list[tuple[str, list[int] | None, str | None]] = []
        self.done = threading.Event()
        self.expect = 0

    def __call__(
        self, item: WorkItem, frames: list[np.ndarray] | None, exc: BaseException | None
    ) -> None:
        self.got.append(
            (
                item.key,
                None if frames is None else [int(f[0, 0, 0]) for f in frames],
                None if exc is None else str(exc),
            )
        )
        if len(self.got) >= self.expect:
            self.done.set()


def item(
    key: str, avatar: str, tag: int, n: int, deadline: float, done: Results, start: int = 0
) -> WorkItem:
    jobs = [FrameJob(index=start + i, horizon=0, loop_position=start + i) for i in range(n)]
    audio = np.full(10, tag, np.float32)
    return WorkItem(key, avatar, 0, audio, jobs, [np.zeros(640, np.int16)] * n, deadline, done)


@pytest.fixture
def gate() -> threading.Event:
    return threading.Event()


def blocked(worker: FrameWorker, gate: threading.Event) -> None:
    """Keep the worker busy until `gate` is set, so items queue up."""
    started = threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(10)

    worker.call(hold)
    assert started.wait(5)


def test_batches_across_sessions_by_avatar_earliest_deadline_first(gate: threading.Event) -> None:
    engine = RecordingEngine()
    worker = FrameWorker(engine, max_batch=8)
    worker.start()
    try:
        res = Results()
        res.expect = 4
        blocked(worker, gate)
        worker.submit(item("late", "A", 1, 3, deadline=5.0, done=res))
        worker.submit(item("early", "A", 2, 3, deadline=1.0, done=res))
        worker.submit(item("other", "B", 3, 2, deadline=2.0, done=res))
        worker.submit(item("last", "A", 4, 3, deadline=9.0, done=res))
        gate.set()
        assert res.done.wait(5)
    finally:
        worker.stop()
    # step 1: deadlines 1, 2, 5 fit in 8 frames; avatar A's two items are one render call
    assert engine.renders[0] == ("A", [0, 1, 2, 0, 1, 2], [2000, 2001, 2002, 1000, 1001, 1002])
    assert engine.renders[1] == ("B", [0, 1], [3000, 3001])
    assert engine.renders[2] == ("A", [0, 1, 2], [4000, 4001, 4002])
    # each session got back its own frames, in order
    got = {key: frames for key, frames, _ in res.got}
    assert got["early"] == [2000 % 256, 2001 % 256, 2002 % 256]
    assert got["late"] == [1000 % 256, 1001 % 256, 1002 % 256]
    assert engine.threads == {"lipstream-frames"}
    assert worker.steps == 2 and worker.frames == 11


def test_items_of_one_utterance_share_one_features_call(gate: threading.Event) -> None:
    engine = RecordingEngine()
    worker = FrameWorker(engine, max_batch=16)
    worker.start()
    try:
        res = Results()
        res.expect = 3
        blocked(worker, gate)
        for k in range(3):  # as a session pumps them: each with the utterance so far
            it = item("s", "A", 7, 1, deadline=float(k), done=res, start=k)
            it.audio = np.full(10 + k, 7, np.float32)
            worker.submit(it)
        gate.set()
        assert res.done.wait(5)
    finally:
        worker.stop()
    assert engine.feature_calls == [(12, [0, 1, 2])]  # the newest (longest) audio, all jobs
    assert [frames for _, frames, _ in res.got] == [[7000 % 256], [7001 % 256], [7002 % 256]]


def test_cancel_drops_a_sessions_queued_items(gate: threading.Event) -> None:
    engine = RecordingEngine()
    worker = FrameWorker(engine, max_batch=4)
    worker.start()
    try:
        res = Results()
        res.expect = 1
        blocked(worker, gate)
        worker.submit(item("gone", "A", 1, 2, 0.0, res))
        worker.submit(item("gone", "A", 1, 2, 0.1, res, start=2))
        worker.submit(item("kept", "A", 2, 2, 1.0, res))
        assert worker.queued("gone") == 4
        assert worker.cancel("gone") == 2
        gate.set()
        assert res.done.wait(5)
    finally:
        worker.stop()
    assert [key for key, _, _ in res.got] == ["kept"]


def test_engine_errors_reach_the_item_and_the_worker_goes_on() -> None:
    engine = RecordingEngine(fail_on="bad")
    worker = FrameWorker(engine)
    worker.start()
    try:
        res = Results()
        res.expect = 2
        worker.submit(item("s1", "bad", 1, 2, 0.0, res))
        worker.submit(item("s2", "good", 2, 2, 1.0, res))
        assert res.done.wait(5)
    finally:
        worker.stop()
    by_key = {key: (frames, err) for key, frames, err in res.got}
    assert by_key["s1"] == (None, "boom")
    assert by_key["s2"][0] is not None and by_key["s2"][1] is None


def test_call_runs_on_the_worker_thread_and_returns_errors() -> None:
    worker = FrameWorker(PreviewEngine())
    worker.start()
    try:
        assert worker.call(lambda: threading.current_thread().name).result(5) == "lipstream-frames"
        with pytest.raises(ZeroDivisionError):
            worker.call(lambda: 1 / 0).result(5)
    finally:
        worker.stop()
    assert not worker.alive
    with pytest.raises(WorkerStopped):
        worker.submit(item("s", "A", 1, 1, 0.0, Results()))
    with pytest.raises(WorkerStopped):
        worker.call(lambda: None)


def test_concat_features() -> None:
    import torch

    a, b = np.zeros((2, 3)), np.ones((1, 3))
    joined = concat_features([a, b])
    assert joined is not None and joined.shape == (3, 3)
    t = concat_features([torch.zeros(2, 50, 384), torch.ones(3, 50, 384)])
    assert t is not None and tuple(t.shape) == (5, 50, 384)
    assert concat_features([a, [1, 2]]) is None
    assert concat_features([a]) is a
