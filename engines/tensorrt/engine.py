"""Backend `tensorrt`: FP16 TensorRT engines for the whisper encoder, the UNet and the VAE
decoder, built from our ONNX export with one optimisation profile over the batch buckets,
cached on disk and run on torch-allocated buffers on the current torch CUDA stream (no
pycuda: TensorRT only sees device pointers and a stream handle).

Engines are cached under `<cache>/tensorrt/<key>/` with key = hash(weights, GPU name,
TensorRT version, graph, profile); one timing cache per GPU + TensorRT version speeds up
rebuilds. `tensorrt_problem` says whether the backend can run here: where `import tensorrt`
fails, asking for it raises `EngineError` and `engines.backends.select_backend("auto")` picks
`compiled`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engines.base import EngineError
from engines.pipeline.compiled import (
    AUDIO_DIM,
    AUDIO_TOKENS,
    VAE_SCALING,
    cache_dir,
    positional_encoding,
    to_faces,
)

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install NVIDIA TensorRT for your CUDA (e.g. `pip install tensorrt-cu12` from NVIDIA's index, "
    "https://pypi.nvidia.com) or use --backend compiled"
)


def tensorrt_problem() -> str | None:
    """Why the tensorrt backend cannot run here, in words (None: it can)."""
    if not torch.cuda.is_available():
        return "the tensorrt backend needs a CUDA GPU"
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:
        return f"`import tensorrt` failed ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    return None


_TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "INT64": torch.int64,
    "INT32": torch.int32,
}


@dataclass(frozen=True)
class Profile:
    """Batch range of one optimisation profile (all inputs share the batch axis)."""

    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 48


class TrtModule:
    """One deserialised engine; `__call__(**inputs)` -> {output name: tensor}, on the current
    torch stream, with outputs allocated by torch."""

    def __init__(self, engine_bytes: bytes) -> None:
        import tensorrt as trt

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise EngineError(
                "TensorRT could not deserialise the engine (built for another GPU or version?)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def dtype(self, name: str) -> torch.dtype:
        return _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        ctx = self.context
        keep = []
        for name in self.inputs:
            t = inputs[name].to(self.dtype(name)).contiguous()
            keep.append(t)
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        outs = {}
        dev = keep[0].device
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self.dtype(name), device=dev)
            ctx.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream(dev)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT execution failed")
        for t in keep:
            t.record_stream(stream)
        return outs


def engine_key(weights: str, graph: str, profile: Profile, extra: str = "") -> str:
    import tensorrt as trt

    gpu = torch.cuda.get_device_name(0)
    text = f"{weights}|{graph}|{gpu}|{trt.__version__}|{profile}|{extra}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    shapes: Callable[[int], dict[str, tuple[int, ...]]],
    profile: Profile,
    timing_cache: Path,
    workspace_gib: int = 8,
) -> bytes:
    """Build an FP16 engine from `onnx_path`; `shapes(batch)` gives each input's shape."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    opt = builder.create_optimization_profile()
    lo, mid, hi = shapes(profile.min_batch), shapes(profile.opt_batch), shapes(profile.max_batch)
    for name in lo:
        opt.set_shape(name, lo[name], mid[name], hi[name])
    config.add_optimization_profile(opt)
    t0 = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path}")
    data = bytes(blob)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(data)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    log.info("built tensorrt engine: path=%s seconds=%.1f", engine_path, time.perf_counter() - t0)
    return data


class TrtStep:
    """UNet + VAE decode on TensorRT, called like `CompiledStep`: (latents, audio) -> uint8 faces."""

    def __init__(
        self, unet: TrtModule, vae: TrtModule, device: torch.device, max_batch: int
    ) -> None:
        self.unet, self.vae = unet, vae
        self.pe = positional_encoding().to(device)
        self.max_batch = max_batch

    def warm_up(self) -> dict[int, float]:
        return {}

    def __call__(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        n = int(latents.shape[0])
        if n > self.max_batch:
            return torch.cat(
                [
                    self(latents[i : i + self.max_batch], audio[i : i + self.max_batch])
                    for i in range(0, n, self.max_batch)
                ]
            )
        cond = audio + self.pe.to(audio.dtype)
        pred = self.unet(latents=latents, cond=cond)["pred"]
        image = self.vae(latents=(1 / VAE_SCALING) * pred)["image"]
        return to_faces(image)


class TrtEncoder:
    """The whisper encoder on TensorRT: mel (B, 80, 3000) -> hidden (B, 1500, 5, 384)."""

    def __init__(self, module: TrtModule) -> None:
        self.module = module

    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        return self.module(mel=mel)["hidden"]


def load_or_build(
    engine: Any, profile: Profile | None = None, root: Path | None = None
) -> tuple[TrtStep, TrtEncoder, dict[str, Any]]:
    """TensorRT engines for a `MuseTalkEngine`'s models: from the cache, or exported and
    built now (minutes on first use). Returns (step, encoder, report)."""
    problem = tensorrt_problem()
    if problem is not None:
        raise EngineError(f"backend tensorrt unavailable: {problem}")
    from engines.musetalk.weights import weights_key
    from engines.tensorrt import onnx_export

    profile = profile or Profile()
    root = root or cache_dir() / "tensorrt"
    import tensorrt as trt

    gpu = torch.cuda.get_device_name(0).replace(" ", "_")
    timing = root / f"timing_{gpu}_{trt.__version__}.cache"
    files = engine.files
    enc_cfg = engine.features.encoder.config
    steps = int(enc_cfg.max_source_positions)
    graphs: dict[
        str, tuple[str, Callable[[Path], Path], Callable[[int], dict[str, tuple[int, ...]]]]
    ] = {
        "unet": (
            weights_key(files.unet_weights),
            lambda p: onnx_export.export_unet(engine.unet, p),
            lambda b: {"latents": (b, 8, 32, 32), "cond": (b, AUDIO_TOKENS, AUDIO_DIM)},
        ),
        "vae_decoder": (
            weights_key(files.vae_weights),
            lambda p: onnx_export.export_vae_decoder(engine.vae, p),
            lambda b: {"latents": (b, 4, 32, 32)},
        ),
        "whisper_encoder": (
            weights_key(files.whisper_weights),
            lambda p: onnx_export.export_whisper_encoder(engine.features.encoder, p),
            lambda b: {"mel": (b, int(enc_cfg.num_mel_bins), 2 * steps)},
        ),
    }
    modules: dict[str, TrtModule] = {}
    report: dict[str, Any] = {"tensorrt": trt.__version__, "gpu": gpu}
    for name, (wkey, export, shapes) in graphs.items():
        prof = profile if name != "whisper_encoder" else Profile(1, 8, 16)
        key = engine_key(wkey, name, prof)
        path = root / key / f"{name}.engine"
        t0 = time.perf_counter()
        if path.is_file():
            data = path.read_bytes()
            report[name] = {"cached": True, "path": str(path)}
        else:
            onnx_path = export(root / key / f"{name}.onnx")
            data = build_engine(onnx_path, path, shapes, prof, timing)
            report[name] = {"cached": False, "path": str(path), "build_s": time.perf_counter() - t0}
        modules[name] = TrtModule(data)
    step = TrtStep(modules["unet"], modules["vae_decoder"], engine.device, profile.max_batch)
    return step, TrtEncoder(modules["whisper_encoder"]), report
