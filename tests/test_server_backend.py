"""Which frame worker the server runs: FrameWorker on CPU and for the preview engine; the GPU
scheduler only for MuseTalk on CUDA; compiled / tensorrt where they cannot run are clear
errors (CPU: at engine construction and at worker selection alike)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from engines.backends import pipeline_backend, select_backend
from engines.base import EngineError
from engines.musetalk.engine import MuseTalkEngine
from engines.preview import PreviewEngine
from server.app import create_app
from server.session.gpu_worker import GpuWorker, create_worker
from server.session.worker import FrameWorker
from server.settings import Settings


@pytest.fixture(scope="module")
def cpu_engine(tiny_models_dir: Path) -> MuseTalkEngine:
    return MuseTalkEngine(tiny_models_dir, device="cpu")


def test_cpu_musetalk_gets_the_frame_worker(cpu_engine: MuseTalkEngine) -> None:
    for backend in ("torch", "auto"):
        worker = create_worker(cpu_engine, Settings(engine="musetalk", backend=backend))
        assert type(worker) is FrameWorker
        assert worker.max_batch == Settings().max_batch
    assert pipeline_backend(cpu_engine, "auto") is None


def test_compiled_and_tensorrt_on_cpu_are_clear_errors(
    cpu_engine: MuseTalkEngine, tiny_models_dir: Path
) -> None:
    for backend in ("compiled", "tensorrt"):
        with pytest.raises(EngineError, match=f"backend {backend} needs the musetalk engine on a"):
            create_worker(cpu_engine, Settings(engine="musetalk", backend=backend))
        with pytest.raises(EngineError, match=f"backend {backend} needs a CUDA GPU"):
            MuseTalkEngine(tiny_models_dir, device="cpu", backend=backend)
        with pytest.raises(EngineError, match="needs a CUDA GPU"):
            select_backend(backend, "cpu")
    with pytest.raises(EngineError, match="unknown backend 'onnx'"):
        create_worker(cpu_engine, Settings(engine="musetalk", backend="onnx"))
    assert select_backend("auto", "cpu") == "torch"
    assert cpu_engine.backend == "torch"


def test_preview_engine_keeps_the_frame_worker_whatever_the_backend() -> None:
    # `auto` may choose preview on a machine without a GPU; the backend then does not apply
    for backend in ("torch", "compiled", "tensorrt", "auto"):
        worker = create_worker(PreviewEngine(), Settings(engine="auto", backend=backend))
        assert type(worker) is FrameWorker


def test_server_starts_with_the_frame_worker_on_cpu(tmp_path: Path) -> None:
    from bench.loopback import ServerThread

    settings = Settings(engine="preview", avatars_dir=tmp_path / "avatars")
    app = create_app(settings, engine=PreviewEngine(), reason="backend test")
    with ServerThread(app) as srv:
        assert httpx.get(srv.base_url + "/readyz").status_code == 200
        assert type(app.state.devices.primary.worker) is FrameWorker


def test_server_refuses_compiled_for_musetalk_on_cpu(
    cpu_engine: MuseTalkEngine, tmp_path: Path
) -> None:
    from server.app import _start

    settings = Settings(engine="musetalk", backend="compiled", avatars_dir=tmp_path / "a")
    app = create_app(settings, engine=cpu_engine)
    with pytest.raises(EngineError, match="backend compiled needs the musetalk engine on a"):
        asyncio.run(_start(app, settings, cpu_engine, "test"))
    assert not app.state.ready


@pytest.mark.gpu
@pytest.mark.allow_leaks(
    "CUDA's device files and torch.compile's worker pipes live as long as the process"
)
def test_musetalk_on_cuda_gets_the_gpu_scheduler(tiny_models_dir: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    engine = MuseTalkEngine(tiny_models_dir, device="cuda")
    worker = create_worker(engine, Settings(engine="musetalk", backend="torch"))
    assert isinstance(worker, GpuWorker) and worker.pipeline is not None
    assert worker.pipeline.options.backend == "torch"
    # frames leave the GPU as I420, the layout the video track sends (no CPU conversion)
    assert worker.options.output == "i420" and worker.pipeline.options.output == "i420"


def test_gpu_worker_serves_work_items_without_a_pipeline(preview_avatar: Any) -> None:
    """The GpuWorker's server extras on its synchronous path: frames come back, step time is
    tracked, avatars load through it, and a stopped one raises WorkerStopped."""
    import threading

    import numpy as np

    from engines.base import FrameJob, ready_horizon
    from server.metrics import ServerMetrics
    from server.session.worker import WorkerStopped, WorkItem

    engine = PreviewEngine()
    avatar = preview_avatar
    metrics = ServerMetrics()
    worker = GpuWorker(engine, metrics=metrics)
    worker.start()
    try:
        worker.load_avatar(avatar).result(timeout=30)
        got: list[tuple[list[np.ndarray] | None, BaseException | None]] = []
        done = threading.Event()

        def on_done(
            item: WorkItem, frames: list[np.ndarray] | None, exc: BaseException | None
        ) -> None:
            got.append((frames, exc))
            done.set()

        jobs = [FrameJob(i, ready_horizon(i), i) for i in range(3)]
        audio = np.zeros(ready_horizon(2), np.float32)
        worker.submit(WorkItem("s1", avatar.id, 0, audio, jobs, [], 0.0, on_done))
        assert done.wait(30)
        frames, exc = got[0]
        assert exc is None and frames is not None and len(frames) == 3
        assert frames[0].shape == (*avatar.size, 3)
        assert worker.step_ema > 0
    finally:
        worker.stop()
    with pytest.raises(WorkerStopped):
        worker.submit(WorkItem("s1", avatar.id, 0, audio, jobs, [], 0.0, on_done))
