"""Choose and build the engine: `auto`, `musetalk` or `preview`.

`auto` takes MuseTalk where a CUDA GPU and its weights exist, else the preview engine, and says
why in words. Asking for `musetalk` where the weights are missing is an `EngineError` with the
same words: it never silently becomes preview.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from engines.base import Engine, EngineError
from engines.preview import PreviewEngine

log = logging.getLogger(__name__)

EngineKind = Literal["auto", "musetalk", "preview"]
ENGINE_KINDS: tuple[str, ...] = ("auto", "musetalk", "preview")

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
    if batch_size is None:
        return MuseTalkEngine(models_dir, device=device, backend=backend)
    return MuseTalkEngine(models_dir, device=device, backend=backend, batch_size=batch_size)


def _download(root: Path) -> str | None:
    """Fetch the weights into `root`; None when they are complete, else why not."""
    from engines.musetalk.weights import download

    log.info("a CUDA GPU but no weights: downloading MuseTalk v1.5 weights into %s", root)
    try:
        download(root)
    except EngineError as exc:
        log.warning("weights download failed: %s", exc)
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
    """Build the engine asked for; returns it with the reason it was chosen, in words.
    `batch_size`: most frames per model call (MuseTalk; None: the engine's default).
    `download_missing`: with `auto` on a CUDA GPU, fetch missing weights first (progress bars);
    when that fails (offline), say so and fall back to preview."""
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
        return _musetalk(root, dev, backend, batch_size), f"musetalk asked for ({dev}, {backend})"
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
            return _musetalk(
                root, dev, backend, batch_size
            ), f"musetalk: CUDA GPU and weights at {root}"
        reason = f"preview: {problem}"
    log.warning("engine auto chose preview: %s", reason)
    return PreviewEngine(), reason


def build_backends(
    models_dir: str | None, backend: str = "auto", buckets: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """`lipstream engines build`: compile (and capture) or build the TensorRT engines for the
    weights in `models_dir`, then check them against the eager fp16 step (max uint8 diff)."""
    import torch

    from engines.base import EngineError
    from engines.musetalk.engine import MuseTalkEngine
    from engines.pipeline.compiled import MuseTalkStep
    from engines.pipeline.gpu import GpuPipeline, PipelineOptions
    from engines.tensorrt.engine import select_backend
    from lipstream.paths import models_dir as resolve_models_dir

    if not torch.cuda.is_available():
        raise EngineError("`lipstream engines build` needs a CUDA GPU")
    name = select_backend(backend)
    if name == "torch":
        raise EngineError("nothing to build for the torch backend")
    engine = MuseTalkEngine(resolve_models_dir(models_dir), device="cuda")
    t0 = time.perf_counter()
    opts = PipelineOptions(
        backend=name, buckets=buckets or (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48)
    )
    pipe = GpuPipeline(engine, opts)
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
