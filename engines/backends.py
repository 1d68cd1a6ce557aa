"""The one place where the engine and its backend are chosen and a GPU pipeline is built.

Engine (`create_engine`): `auto` takes MuseTalk where a CUDA GPU and its weights exist, else
the preview engine, and says why in words. Asking for `musetalk` where the weights are
missing is an `EngineError` with the same words: it never silently becomes preview.

Backend (`select_backend`): `torch` (eager), `compiled` (torch.compile + CUDA graphs),
`tensorrt`, or `auto`: tensorrt where it imports, else compiled where this host can build its
kernels, else torch; torch on a CPU. One that cannot run is an `EngineError` naming why.
`pipeline_backend` says which backend the server's GPU scheduler runs an engine on (None: the
engine runs on the CPU frame worker).

Pipeline (`build_pipeline`, `create_scheduler`, `render_pipeline`): a `GpuPipeline` over a
MuseTalk engine, its batch buckets from one policy, `batch_buckets`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from engines.base import Engine, EngineError
from engines.preview import PreviewEngine

if TYPE_CHECKING:
    from engines.pipeline.gpu import GpuPipeline, PipelineOptions
    from engines.pipeline.scheduler import GpuScheduler, SchedulerOptions

log = logging.getLogger(__name__)

EngineKind = Literal["auto", "musetalk", "preview"]
ENGINE_KINDS: tuple[str, ...] = ("auto", "musetalk", "preview")
BACKENDS: tuple[str, ...] = ("torch", "compiled", "tensorrt", "auto")

# The bucket policy. A GPU pipeline captures one batch size per bucket (compiled: a CUDA graph
# each; tensorrt: the range of one optimisation profile) and runs a batch of n frames on the
# smallest bucket >= n, padded. The ladder is dense where batches are small (one or a few
# sessions: little padding) and coarser towards the largest; `batch_buckets(max_batch)` is
# every rung below `max_batch`, then `max_batch` itself, so the largest batch the scheduler
# (or an offline render) makes is always a bucket of its own.
BUCKET_LADDER: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48)

# MuseTalk's own `models/` layout (download_weights.sh); each entry: any one of the names.
REQUIRED_WEIGHTS: tuple[tuple[str, ...], ...] = (
    ("musetalkV15/musetalk.json",),
    ("musetalkV15/unet.pth",),
    ("sd-vae/config.json",),
    ("sd-vae/diffusion_pytorch_model.safetensors", "sd-vae/diffusion_pytorch_model.bin"),
    ("whisper/config.json",),
    ("whisper/model.safetensors", "whisper/pytorch_model.bin"),
    ("whisper/preprocessor_config.json",),
)


def missing_weights(models_dir: str | Path) -> list[str]:
    """The weight files of MuseTalk's layout that `models_dir` lacks (empty: all present)."""
    root = Path(models_dir)
    return [
        " or ".join(names)
        for names in REQUIRED_WEIGHTS
        if not any((root / n).is_file() for n in names)
    ]


def weights_problem(models_dir: str | Path) -> str | None:
    """Why MuseTalk cannot load from `models_dir`, in words (None: it can)."""
    root = Path(models_dir)
    missing = missing_weights(root)
    if not missing:
        return None
    detail = "" if len(missing) == len(REQUIRED_WEIGHTS) else f" (missing {', '.join(missing)})"
    return f"no weights at {root}{detail}: run `lipstream models download`"


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise EngineError(f"unknown device {device!r}: use auto, cpu or cuda[:N]")
    if device.startswith("cuda") and not cuda_available():
        raise EngineError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return device


def _musetalk(models_dir: Path, device: str, backend: str, batch_size: int | None) -> Engine:
    try:
        from engines.musetalk.engine import MuseTalkEngine
    except ImportError as exc:
        raise EngineError(f"the musetalk engine cannot be imported: {exc}") from exc
    chosen = select_backend(backend, device)  # before the weights load: fails fast
    factory = render_pipeline if chosen != "torch" else None
    if batch_size is None:
        return MuseTalkEngine(models_dir, device, chosen, pipeline_factory=factory)
    return MuseTalkEngine(
        models_dir, device, chosen, batch_size=batch_size, pipeline_factory=factory
    )


def _download(root: Path) -> str | None:
    """Fetch the weights into `root`; None when they are complete, else why not."""
    from engines.musetalk.weights import download

    log.info("a CUDA GPU but no weights: downloading MuseTalk v1.5 weights: models_dir=%s", root)
    try:
        download(root)
    except EngineError as exc:
        log.warning("weights download failed: error=%s", exc)
        return f"weights could not be downloaded: {exc}"
    return weights_problem(root)


def create_engine(
    kind: str = "auto",
    models_dir: str | Path | None = None,
    device: str = "auto",
    backend: str = "torch",
    batch_size: int | None = None,
    download_missing: bool = False,
) -> tuple[Engine, str]:
    """Build the engine asked for; returns it with the reason it was chosen, in words (the
    caller logs it). `backend`: MuseTalk's (`select_backend`). `batch_size`: most frames per
    model call (MuseTalk; None: the engine's default). `download_missing`: with `auto` on a
    CUDA GPU, fetch missing weights first (progress bars); when that fails (offline), say so
    and fall back to preview."""
    from lipstream.paths import models_dir as default_models_dir

    if kind not in ENGINE_KINDS:
        raise EngineError(f"unknown engine {kind!r}: use one of {', '.join(ENGINE_KINDS)}")
    root = default_models_dir(models_dir)
    if kind == "preview":
        return PreviewEngine(), "preview engine asked for"
    if kind == "musetalk":
        problem = weights_problem(root)
        if problem:
            raise EngineError(problem)
        dev = _resolve_device(device)
        engine = _musetalk(root, dev, backend, batch_size)
        return engine, f"musetalk asked for ({dev}, {_backend_of(engine)})"
    # auto
    if device == "cpu":
        reason = "preview: device cpu asked for (auto picks musetalk only on a CUDA GPU)"
    elif not cuda_available():
        reason = "preview: no CUDA GPU"
    else:
        problem = weights_problem(root)
        if problem is not None and download_missing:
            problem = _download(root)
        if problem is None:
            dev = _resolve_device(device)
            engine = _musetalk(root, dev, backend, batch_size)
            return engine, f"musetalk: CUDA GPU and weights at {root} ({_backend_of(engine)})"
        reason = f"preview: {problem}"
    return PreviewEngine(), reason


def _backend_of(engine: Engine) -> str:
    return str(getattr(engine, "backend", "torch"))


# -- backends ---------------------------------------------------------------------------------
def select_backend(requested: str, device: str = "cuda") -> str:
    """The backend a MuseTalk model on `device` runs: `auto` -> tensorrt where it imports,
    else compiled where this host can build its kernels (`engines.pipeline.toolchain`), else
    torch; torch without a GPU. An explicit `compiled` or `tensorrt` where it cannot run, or
    an unknown name, is an EngineError naming the reason."""
    import torch

    from engines.pipeline import toolchain
    from engines.tensorrt import engine as tensorrt

    if requested not in BACKENDS:
        raise EngineError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested in ("torch", "auto") and not _gpu_device(device):
        return "torch"
    if torch.device(device).type != "cuda":
        raise EngineError(
            f"backend {requested} needs a CUDA GPU (device is {device}); "
            "use --backend torch (or auto)"
        )
    if not torch.cuda.is_available():
        raise EngineError(f"backend {requested} needs a CUDA GPU, and torch sees none")
    if requested == "torch":
        return "torch"
    trt_problem = tensorrt.tensorrt_problem()
    if requested == "tensorrt" and trt_problem is not None:
        raise EngineError(f"backend tensorrt unavailable: {trt_problem}")
    if requested == "tensorrt" or (requested == "auto" and trt_problem is None):
        return "tensorrt"
    compiled_problem = toolchain.compiled_problem()
    if requested == "compiled" and compiled_problem is not None:
        raise EngineError(f"backend compiled unavailable: {compiled_problem}")
    if requested == "compiled":
        return "compiled"
    if compiled_problem is not None:
        log.warning("backend auto chose torch (eager): compiled cannot run: %s", compiled_problem)
        return "torch"
    log.info("backend auto chose compiled: %s", trt_problem)
    return "compiled"


def _gpu_device(device: str) -> bool:
    """Whether `device` is a CUDA device that torch can use."""
    import torch

    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def on_gpu(engine: Engine) -> bool:
    """True where `engine` is MuseTalk on a CUDA device (the one a GPU pipeline runs)."""
    device = getattr(engine, "device", None)
    return engine.name == "musetalk" and getattr(device, "type", "") == "cuda"


def pipeline_backend(engine: Engine, requested: str) -> str | None:
    """The GPU pipeline backend the server runs `engine` on; None: no GPU pipeline (the
    engine runs on the CPU frame worker). `auto` keeps the backend the engine was built with
    (`create_engine` chose it). Raises EngineError for an unknown backend or one that cannot
    run here."""
    if requested not in BACKENDS:
        raise EngineError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if on_gpu(engine):
        if requested == "auto":
            return _backend_of(engine)
        return select_backend(requested, str(getattr(engine, "device", "cuda")))
    if engine.name == "musetalk" and requested in ("compiled", "tensorrt"):
        device = getattr(engine, "device", "cpu")
        raise EngineError(
            f"backend {requested} needs the musetalk engine on a CUDA GPU (it is on {device}); "
            "use --backend torch (or auto)"
        )
    if requested in ("compiled", "tensorrt"):
        log.warning(
            "backend does not apply to this engine: backend=%s engine=%s", requested, engine.name
        )
    return None


# -- pipelines --------------------------------------------------------------------------------
def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch buckets of a pipeline whose largest batch is `max_batch` (see BUCKET_LADDER)."""
    if max_batch < 1:
        raise EngineError(f"max_batch must be >= 1, got {max_batch}")
    return (*(b for b in BUCKET_LADDER if b < max_batch), max_batch)


def pipeline_options(
    backend: str, max_batch: int, output: str = "i420", in_flight: int = 2
) -> PipelineOptions:
    """The server's pipeline options for `backend`: buckets from `batch_buckets(max_batch)`,
    one pinned output slot more than the batches in flight, every other switch its default."""
    from engines.pipeline.gpu import PipelineOptions

    return PipelineOptions(
        backend=backend,
        buckets=batch_buckets(max_batch),
        output=output,
        host_slots=in_flight + 1,
    )


def build_pipeline(engine: Engine, options: PipelineOptions, warm_up: bool = True) -> GpuPipeline:
    """A `GpuPipeline` over `engine` (MuseTalk on a CUDA device): for tensorrt its engines
    loaded from the cache or built (minutes on first use); `warm_up`: compile / capture
    every bucket now (compiled: minutes on a cold cache)."""
    from engines.pipeline.gpu import BackendModels, GpuPipeline

    models = None
    if options.backend == "tensorrt":
        from engines.tensorrt.engine import Profile, load_or_build

        lo, hi = min(options.buckets), max(options.buckets)
        models = BackendModels(*load_or_build(engine, Profile(lo, min(16, hi), hi)))
    pipeline = GpuPipeline(engine, options, models)
    if warm_up:
        pipeline.warm_up()
    return pipeline


def create_scheduler(
    engine: Engine,
    options: SchedulerOptions | None = None,
    backend: str = "auto",
    metrics: Any | None = None,
    warm_up: bool = True,
) -> GpuScheduler:
    """The GPU scheduler for `engine`: with a pipeline of `pipeline_backend(engine, backend)`
    (buckets up to the scheduler's `max_batch`, its output, a host slot per batch in flight
    and one more), else (CPU, preview) running the engine synchronously."""
    from engines.pipeline.scheduler import GpuScheduler, SchedulerOptions

    options = options or SchedulerOptions()
    chosen = pipeline_backend(engine, backend)
    pipeline = None
    if chosen is not None:
        opts = pipeline_options(chosen, options.max_batch, options.output, options.max_in_flight)
        pipeline = build_pipeline(engine, opts, warm_up)
    return GpuScheduler(engine, options, pipeline=pipeline, metrics=metrics)


def render_pipeline(engine: Any) -> GpuPipeline:
    """The pipeline `MuseTalkEngine.render` runs through with the compiled / tensorrt backend:
    RGB out, buckets up to the engine's batch size, warmed up."""
    opts = pipeline_options(engine.backend, engine.options.batch_size, output="rgb")
    return build_pipeline(engine, opts)


def build_backends(
    models_dir: str | None, backend: str = "auto", max_batch: int = 16
) -> dict[str, Any]:
    """`lipstream engines build`: compile (and capture) or build the TensorRT engines for the
    weights in `models_dir`, the buckets of a server with `max_batch` (its default: 16), then
    check them against the eager fp16 step (max uint8 diff)."""
    import torch

    from engines.musetalk.engine import MuseTalkEngine
    from engines.pipeline.compiled import MuseTalkStep
    from lipstream.paths import models_dir as resolve_models_dir

    if not torch.cuda.is_available():
        raise EngineError("`lipstream engines build` needs a CUDA GPU")
    name = select_backend(backend)
    if name == "torch":
        raise EngineError("nothing to build for the torch backend")
    engine = MuseTalkEngine(resolve_models_dir(models_dir), device="cuda")
    t0 = time.perf_counter()
    pipe = build_pipeline(engine, pipeline_options(name, max_batch), warm_up=False)
    warm = pipe.warm_up()
    report: dict[str, Any] = {
        "backend": name,
        "build_s": time.perf_counter() - t0,
        "per_bucket_s": warm,
        **pipe.build_report,
    }
    eager = MuseTalkStep(engine.unet, engine.vae).to(engine.device)
    g = torch.Generator(device=engine.device).manual_seed(0)
    worst = 0
    with torch.inference_mode():
        for b in (1, 3, 16):
            lat = torch.randn((b, 8, 32, 32), device=engine.device, generator=g, dtype=engine.dtype)
            aud = torch.randn((b, 50, 384), device=engine.device, generator=g, dtype=engine.dtype)
            worst = max(worst, int((pipe.step(lat, aud).int() - eager(lat, aud).int()).abs().max()))
    report["max_abs_diff_vs_eager_uint8"] = worst
    return report
