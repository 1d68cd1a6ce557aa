"""The GPU pipeline (features -> UNet+VAE -> paste-back -> host) against the engine's own
CPU-paste path, the compiled backend against eager, the scheduler on the GPU, and the
backend selection rules. GPU tests use the tiny random weights in fp16."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.base import EngineError, FrameJob, ready_horizon

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# process-wide GPU state these tests create on purpose and keep: cuFFT plans, cuDNN workspaces,
# the positional-encoding cache, compiled kernels and CUDA graph pools, inductor's compile workers
caches = pytest.mark.allow_leaks("CUDA caches, graph pools and compile workers persist by design")


def test_backend_selection_without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from engines.backends import select_backend

    real_import = builtins.__import__

    def no_trt(name: str, *a, **k):  # type: ignore[no-untyped-def]
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_trt)
    with pytest.raises(EngineError, match="tensorrt"):
        select_backend("tensorrt")
    want = "compiled" if torch.cuda.is_available() else "torch"
    assert select_backend("auto") == want
    with pytest.raises(EngineError):
        select_backend("bogus")


def test_one_bucket_policy_for_every_pipeline() -> None:
    """Buckets: every rung of the ladder below the largest batch, then the largest itself;
    the server's, the render's and `engines build`'s pipelines all take theirs from it."""
    from engines.backends import BUCKET_LADDER, batch_buckets, pipeline_options

    assert batch_buckets(16) == (1, 2, 4, 6, 8, 12, 16)
    assert batch_buckets(10) == (1, 2, 4, 6, 8, 10)
    assert batch_buckets(1) == (1,)
    assert batch_buckets(48) == BUCKET_LADDER
    assert batch_buckets(64) == (*BUCKET_LADDER, 64)
    with pytest.raises(EngineError, match="max_batch"):
        batch_buckets(0)
    opts = pipeline_options("compiled", 8, output="rgb", in_flight=3)
    assert (opts.backend, opts.buckets, opts.output, opts.host_slots) == (
        "compiled",
        (1, 2, 4, 6, 8),
        "rgb",
        4,
    )
    assert opts.fold_upsample and opts.nhwc_norm and opts.compile_encoder  # server defaults
    with pytest.raises(ValueError, match="buckets must be"):
        type(opts)(backend="torch", buckets=(4, 2))


@pytest.fixture(scope="module")
def gpu_engine(tiny_models_dir: Path):  # type: ignore[no-untyped-def]
    from bench.gpu.measure import synthetic_avatar
    from engines.musetalk.engine import MuseTalkEngine

    eng = MuseTalkEngine(tiny_models_dir, device="cuda")
    av = synthetic_avatar(4, 240, 320)
    av.latents = None
    eng.load_avatar(av)
    return eng, av


def _speech(n: int) -> np.ndarray:
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)


@pytest.mark.gpu
@cuda
@caches
def test_pipeline_matches_engine_render(gpu_engine) -> None:  # type: ignore[no-untyped-def]
    from engines.pipeline.gpu import GpuPipeline, PipelineOptions

    eng, av = gpu_engine
    pipe = GpuPipeline(eng, PipelineOptions(backend="torch", output="rgb", buckets=(1, 2, 4, 8)))
    pipe.warm_up()
    audio = _speech(16000)
    feats = eng.offline_features(audio)
    positions = list(range(len(feats)))
    got = np.stack(pipe.render(av.id, positions, feats))
    want = eng.render(av.id, positions, feats)
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    assert (
        np.abs(got.astype(int) - av.frames[[av.loop_frame(p) for p in positions]].astype(int)).max()
        > 10
    )


@pytest.mark.gpu
@cuda
@caches
def test_gpu_stream_features_match_engine(gpu_engine) -> None:  # type: ignore[no-untyped-def]
    from engines.pipeline.features import GpuFeaturizer

    eng, _ = gpu_engine
    audio = _speech(ready_horizon(30))
    jobs = [FrameJob(i, ready_horizon(i), i) for i in (0, 5, 17, 30)]
    want = eng.stream_features(audio, jobs).float()
    got = GpuFeaturizer(eng.features).stream_many([(audio, jobs[:2]), (audio, jobs[2:])]).float()
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.gpu
@cuda
@caches
def test_compiled_encoder_with_the_log_mel_in_its_graph(gpu_engine) -> None:  # type: ignore[no-untyped-def]
    """`log_mel_in_graph`: the encoder's CUDA graph takes the windows and computes the log-mel
    itself; the features match the eager featurizer's, and repeat bit for bit."""
    from engines.pipeline.compiled import CompiledEncoder
    from engines.pipeline.features import GpuFeaturizer

    eng, _ = gpu_engine
    audio = _speech(ready_horizon(30))
    jobs = [FrameJob(i, ready_horizon(i), i) for i in (0, 5, 17, 30)]
    eager = GpuFeaturizer(eng.features, encoder_batch=2)
    want = eager.stream_many([(audio, jobs)]).float()
    graphed = GpuFeaturizer(eng.features, encoder_batch=2)
    enc = CompiledEncoder(
        graphed.encoder,
        2,
        int(graphed.mel_filters.shape[1]),
        2 * graphed.window_steps,
        log_mel=graphed.log_mel,
        samples=graphed.window_samples,
    )
    assert enc.takes_wave and enc.shape == (2, graphed.window_samples)
    enc.warm_up()
    graphed.run_windows = enc
    got = graphed.stream_many([(audio, jobs)]).float()
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    assert torch.equal(got, graphed.stream_many([(audio, jobs)]).float())
    with pytest.raises(ValueError, match="samples"):
        CompiledEncoder(graphed.encoder, 2, 80, 3000, log_mel=graphed.log_mel)


@pytest.mark.gpu
@cuda
@caches
def test_compiled_encoder_with_a_graph_per_batch(gpu_engine) -> None:  # type: ignore[no-untyped-def]
    """`encoder_batches`: a CUDA graph per batch size, each timed at warm-up; the featurizer
    splits a step's windows over them by those times; the features match the eager
    featurizer's and repeat bit for bit."""
    import functools

    from engines.pipeline.compiled import CompiledEncoder
    from engines.pipeline.encoder_calls import plan_calls
    from engines.pipeline.features import GpuFeaturizer

    eng, _ = gpu_engine
    audio = _speech(ready_horizon(30))
    jobs = [FrameJob(i, ready_horizon(i), i) for i in (0, 3, 5, 11, 17, 23, 30)]
    want = GpuFeaturizer(eng.features, encoder_batch=2).stream_many([(audio, jobs)]).float()
    graphed = GpuFeaturizer(eng.features)
    enc = CompiledEncoder(
        graphed.encoder,
        (1, 2, 4),
        int(graphed.mel_filters.shape[1]),
        2 * graphed.window_steps,
        log_mel=graphed.log_mel,
        samples=graphed.window_samples,
    )
    enc.warm_up()
    assert set(enc.costs) == {1, 2, 4} and all(ms > 0 for ms in enc.costs.values())
    graphed.run_windows = enc
    graphed.plan = functools.partial(plan_calls, costs=enc.costs)
    got = graphed.stream_many([(audio, jobs)]).float()
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    assert torch.equal(got, graphed.stream_many([(audio, jobs)]).float())


def test_one_bucket_over_one_compiles_static() -> None:
    """A dynamic batch axis only pays where several buckets > 1 share the compile; a lone
    one (an offline bench's `--buckets 48`) compiles static, which is quicker. Checked on
    the warm-up's own rule, without a GPU (CompiledStep itself needs one)."""
    from types import SimpleNamespace

    from engines.pipeline.compiled import CompiledOptions, CompiledStep

    def dynamic(buckets: tuple[int, ...], b: int, **kw: bool) -> bool:
        fake = SimpleNamespace(options=CompiledOptions(buckets=buckets, **kw))
        return CompiledStep.dynamic_for(fake, b)  # type: ignore[arg-type]

    assert dynamic((1, 2, 4, 48), 48) and dynamic((1, 2, 4, 48), 2)
    assert not dynamic((1, 2, 4, 48), 1)
    assert not dynamic((48,), 48) and not dynamic((1, 48), 48)
    assert not dynamic((2, 4), 4, dynamic_batch=False)
    assert not dynamic((2, 4), 4, compile=False)


@pytest.mark.gpu
@cuda
@caches
@pytest.mark.parametrize("nhwc_norm", [False, True])
def test_compiled_matches_eager(gpu_engine, nhwc_norm: bool) -> None:  # type: ignore[no-untyped-def]
    from engines.pipeline.compiled import CompiledOptions, CompiledStep, MuseTalkStep

    eng, _ = gpu_engine
    step = MuseTalkStep(eng.unet, eng.vae).to(eng.device)
    # nhwc_norm: channels-last GroupNorms in the compiled copy, the eager step stays stock
    compiled_step = MuseTalkStep(eng.unet, eng.vae, nhwc_norm=nhwc_norm).to(eng.device)
    comp = CompiledStep(compiled_step, CompiledOptions(buckets=(2, 4)))
    comp.warm_up()
    g = torch.Generator(device=eng.device).manual_seed(0)
    with torch.inference_mode():
        for b in (1, 3, 4, 6):
            lat = torch.randn((b, 8, 32, 32), device=eng.device, generator=g, dtype=eng.dtype)
            aud = torch.randn((b, 50, 384), device=eng.device, generator=g, dtype=eng.dtype)
            diff = (comp(lat, aud).int() - step(lat, aud).int()).abs()
            # fp16: inductor keeps fused intermediates in fp32 where eager rounds to fp16, so
            # a few pixels in a million differ by more than 2 (the bench measures the rate)
            assert float((diff > 2).float().mean()) < 1e-3
            assert int(diff.max()) <= 8


@pytest.mark.gpu
@cuda
@caches
def test_scheduler_on_gpu_delivers_pipeline_frames(gpu_engine) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import dataclass, field

    from engines.backends import create_scheduler
    from engines.pipeline.gpu import Row
    from engines.pipeline.scheduler import SchedulerOptions

    eng, av = gpu_engine
    sched = create_scheduler(eng, SchedulerOptions(max_batch=8, output="rgb"), backend="torch")
    assert sched.pipeline is not None
    got: dict[str, list] = {}

    @dataclass
    class Item:
        key: str
        avatar_id: str
        audio: np.ndarray
        jobs: list
        deadline: float
        done: object
        seq: int = field(default=0)

    def done(item, frames, exc):  # type: ignore[no-untyped-def]
        assert exc is None
        got[item.key] = frames

    audio = _speech(ready_horizon(6))
    sched.start()
    try:
        for k in range(3):
            jobs = [FrameJob(i, ready_horizon(i), i + k) for i in range(2 * k, 2 * k + 2)]
            sched.submit(Item(f"s{k}", av.id, audio, jobs, time.monotonic(), done))
        t0 = time.perf_counter()
        while len(got) < 3 and time.perf_counter() - t0 < 30:
            time.sleep(0.01)
    finally:
        sched.stop()
    assert len(got) == 3
    for k in range(3):
        jobs = [FrameJob(i, ready_horizon(i), i + k) for i in range(2 * k, 2 * k + 2)]
        ref = sched.pipeline.launch(
            [Row(av.id, j.loop_position) for j in jobs], [(audio, jobs)]
        ).result()
        for a, b in zip(got[f"s{k}"], ref, strict=True):
            assert a.shape == (240, 320, 3)
            d = np.abs(a.astype(int) - b.astype(int))  # batch size differs: fp16 kernels too
            assert d.max() <= 8 and d.mean() < 0.05


@pytest.mark.gpu
@cuda
@caches
def test_graph_families_have_their_own_capture_streams(gpu_engine) -> None:  # type: ignore[no-untyped-def]
    """The encoder's graph (stream A) and the UNet+VAE graphs (stream B) replay at the same
    time: captured on one stream they would share one cuBLAS workspace (see
    `engines.pipeline.compiled.warm_and_capture`)."""
    from engines.pipeline.gpu import GpuPipeline, PipelineOptions

    eng, _ = gpu_engine
    pipe = GpuPipeline(eng, PipelineOptions(backend="compiled", buckets=(1, 2)))
    assert pipe.encoder is not None
    streams = {pipe.encoder.capture_stream, pipe.step.capture_stream, *pipe.streams.values()}
    assert len(streams) == 5


@pytest.mark.gpu
@cuda
@caches
def test_prepared_pipeline_memory_stays_flat(gpu_engine) -> None:  # type: ignore[no-untyped-def]
    """After prepare_avatar (its peak batches), streaming batches of any size up to the
    largest bucket, at and away from 30 s window boundaries, reserve no more GPU memory."""
    from engines.pipeline.gpu import GpuPipeline, PipelineOptions, Row

    eng, av = gpu_engine
    pipe = GpuPipeline(eng, PipelineOptions(backend="torch", buckets=(1, 2, 4, 8)))
    pipe.warm_up()
    pipe.prepare_avatar(av.id)
    torch.cuda.synchronize()
    reserved = _reserved_by_pool()
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(1, 9))
        first = int(rng.choice([0, 100, 740, 746]))
        jobs = [FrameJob(first + k, ready_horizon(first + k), k) for k in range(n)]
        audio = _speech(jobs[-1].horizon)
        pipe.launch([Row(av.id, k) for k in range(n)], [(audio, jobs)]).result()
    torch.cuda.synchronize()
    large, small = _reserved_by_pool()
    assert large == reserved[0]  # the frames' tensors: not one more block
    # small tensors (< 1 MiB) share 2 MiB segments with whatever earlier tests in this
    # process left cached, so one more segment may appear (seen once on an H200)
    assert small - reserved[1] <= 2 << 20


def _reserved_by_pool() -> tuple[int, int]:
    """Bytes torch's caching allocator holds in its large and small pools."""
    stats = torch.cuda.memory_stats()
    return (
        int(stats.get("reserved_bytes.large_pool.current", 0)),
        int(stats.get("reserved_bytes.small_pool.current", 0)),
    )
