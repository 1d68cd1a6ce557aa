# mypy: disable-error-code="misc, operator"
"""GPU environment probe and first measurements (one device call):

    python -m bench.gpu.probe OUT.json

Environment (torch, GPU, imports), MuseTalk-way eager fp16 UNet+VAE (batch 20 and 1),
compiled + CUDA graphs per bucket with its compile time and max difference from eager,
GPU paste-back + I420 (+ pinned copy) against the CPU PIL paste-back, aiortc encoder cost.
Each section is written to the JSON as soon as it is done, so a timeout keeps the rest.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def _env() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
    }
    for mod in (
        "diffusers",
        "transformers",
        "av",
        "aiortc",
        "onnx",
        "onnxruntime",
        "tensorrt",
        "platformdirs",
        "cv2",
    ):
        try:
            m = importlib.import_module(mod)
            info[mod] = getattr(m, "__version__", "ok")
        except Exception as exc:
            info[mod] = f"FAILED: {type(exc).__name__}: {exc}"[:200]
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception as exc:
        info["onnxruntime_providers"] = str(exc)
    try:
        info["nvidia_smi"] = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,driver_version,clocks.sm",
                "--format=csv",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except Exception as exc:
        info["nvidia_smi"] = str(exc)
    return info


class _Probe:
    """The models on the GPU (full size, random, fp16), the eager step and, once built, the
    compiled one; random inputs by batch size."""

    def __init__(self) -> None:
        self.dev = torch.device("cuda")
        self.g = torch.Generator(device=self.dev).manual_seed(1)
        self.unet: Any = None
        self.vae: Any = None
        self.whisper: Any = None
        self.step: Any = None
        self.compiled: Any = None

    def inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.randn((b, 8, 32, 32), device=self.dev, generator=self.g, dtype=torch.float16),
            torch.randn((b, 50, 384), device=self.dev, generator=self.g, dtype=torch.float16),
        )


def models(pr: _Probe) -> dict[str, Any]:
    from bench.gpu import measure
    from engines.pipeline.compiled import MuseTalkStep

    t0 = time.perf_counter()
    pr.unet, pr.vae, pr.whisper = measure.build_models("full", pr.dev, torch.float16)
    pr.step = MuseTalkStep(pr.unet, pr.vae).to(pr.dev)
    return {
        "build_s": time.perf_counter() - t0,
        "unet_params_M": sum(p.numel() for p in pr.unet.parameters()) / 1e6,
        "vae_decoder_params_M": sum(p.numel() for p in pr.vae.decoder.parameters()) / 1e6,
    }


def eager(pr: _Probe) -> dict[str, Any]:
    """MuseTalk's way: the eager fp16 step at batches 1, 20, 48; UNet and VAE per frame."""
    from bench.gpu import measure

    step = pr.step
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for b in (1, 20, 48):
            lat, aud = pr.inputs(b)
            t = measure.gpu_time_ms(
                lambda lat=lat, aud=aud: step(lat, aud), reps=10 if b > 1 else 20
            )
            out[f"batch{b}"] = {**t, "fps": b * 1e3 / t["median_ms"]}
        lat, aud = pr.inputs(48)
        cond = aud + step.pe.half()
        t_unet = measure.gpu_time_ms(
            lambda: step.unet(lat, step.timestep, encoder_hidden_states=cond).sample, reps=10
        )
        z = torch.randn((48, 4, 32, 32), device=pr.dev, dtype=torch.float16)
        t_vae = measure.gpu_time_ms(lambda: step.vae.decode(z).sample, reps=10)
        out["batch48_unet_ms_per_frame"] = t_unet["median_ms"] / 48
        out["batch48_vae_ms_per_frame"] = t_vae["median_ms"] / 48
        faces = step(*pr.inputs(4))
        out["nan_or_saturated_fraction"] = float(((faces == 0) | (faces == 255)).float().mean())
    return out


def compiled(pr: _Probe) -> dict[str, Any]:
    """The compiled step per bucket, its compile time and its distance from eager."""
    from bench.gpu import measure
    from engines.pipeline.compiled import CompiledOptions, CompiledStep

    buckets = (1, 4, 16, 48)
    cs = CompiledStep(pr.step, CompiledOptions(buckets=buckets))
    out: dict[str, Any] = {"warmup_s": cs.warm_up()}
    with torch.inference_mode():
        for b in buckets:
            lat, aud = pr.inputs(b)
            t = measure.gpu_time_ms(lambda lat=lat, aud=aud: cs(lat, aud), reps=20)
            out[f"batch{b}"] = {**t, "fps": b * 1e3 / t["median_ms"]}
        diffs = []
        for b in (1, 3, 16):
            lat, aud = pr.inputs(b)
            diffs.append(int((pr.step(lat, aud).int() - cs(lat, aud).int()).abs().max()))
        out["max_abs_diff_vs_eager_uint8"] = max(diffs)
        out["diffs"] = diffs
    pr.compiled = cs
    return out


def whisper(pr: _Probe) -> dict[str, Any]:
    from bench.gpu import measure

    enc = pr.whisper
    mel = torch.randn((1, 80, 3000), device=pr.dev, dtype=torch.float16)
    with torch.inference_mode():
        t = measure.gpu_time_ms(lambda: enc(mel, output_hidden_states=True), reps=20)
        mel8 = torch.randn((8, 80, 3000), device=pr.dev, dtype=torch.float16)
        t8 = measure.gpu_time_ms(lambda: enc(mel8, output_hidden_states=True), reps=10)
    return {"window30s_batch1": t, "window30s_batch8_ms_per_window": t8["median_ms"] / 8}


def pasteback(pr: _Probe) -> dict[str, Any]:
    """GPU paste-back + I420 (+ the pinned copy) against the CPU (PIL, MuseTalk's way) and
    cv2's colour conversion, 720p."""
    import cv2

    from bench.gpu import measure
    from engines.pipeline import paste

    av = measure.synthetic_avatar(8, 720, 1280)
    gav = paste.upload_avatar(av, pr.dev)
    out: dict[str, Any] = {"avatar_gpu_bytes": gav.nbytes, "region": gav.region}
    rng = np.random.default_rng(2)
    faces_np = rng.integers(0, 255, (48, 256, 256, 3), dtype=np.uint8)
    faces = torch.from_numpy(faces_np).to(pr.dev).permute(0, 3, 1, 2).contiguous()
    idx = torch.arange(48, device=pr.dev) % 8

    def pil(i: int) -> np.ndarray:
        return measure.pil_paste_back(
            av.frames[i], faces_np[i], av.face_boxes[i], av.crop_boxes[i], av.masks[i]
        )

    # correctness against the CPU (PIL, MuseTalk's way) on the 8 distinct frames
    got = paste.paste_back(gav, idx[:8], faces[:8]).cpu().numpy()
    out["max_abs_diff_vs_pil"] = max(
        int(np.abs(got[i].astype(int) - pil(i).astype(int)).max()) for i in range(8)
    )
    i420 = paste.rgb_to_i420(torch.from_numpy(got).to(pr.dev)).cpu().numpy()
    ref = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2YUV_I420).reshape(-1) for f in got])
    out["i420_max_abs_diff_vs_cv2"] = int(np.abs(ref.astype(int) - i420.astype(int)).max())
    for b in (1, 8, 48):
        t = measure.gpu_time_ms(
            lambda b=b: paste.rgb_to_i420(paste.paste_back(gav, idx[:b], faces[:b])), reps=20
        )
        out[f"paste_i420_batch{b}_ms_per_frame"] = t["median_ms"] / b
    host = torch.empty((48, paste.i420_size(720, 1280)), dtype=torch.uint8, pin_memory=True)

    def with_copy() -> None:
        host.copy_(paste.rgb_to_i420(paste.paste_back(gav, idx, faces)), non_blocking=True)

    t = measure.gpu_time_ms(with_copy, reps=20)
    out["paste_i420_pinned_copy_batch48_ms_per_frame"] = t["median_ms"] / 48
    out["pil_paste_ms_per_frame_1core"] = measure.cpu_time_ms(lambda: pil(0), reps=20)
    out["cv2_rgb_to_i420_ms"] = measure.cpu_time_ms(
        lambda: cv2.cvtColor(av.frames[0], cv2.COLOR_RGB2YUV_I420), reps=20
    )
    return out


def full_offline(pr: _Probe) -> dict[str, Any]:
    """The audio-encoder-free core: step -> GPU paste -> I420 -> pinned host, batch 48."""
    from bench.gpu import measure
    from engines.pipeline import paste

    av = measure.synthetic_avatar(8, 720, 1280)
    gav = paste.upload_avatar(av, pr.dev)
    lat_all = torch.from_numpy(av.latents).to(pr.dev, torch.float16)
    idx = torch.arange(48, device=pr.dev) % 8
    lat = lat_all[idx]
    aud = torch.randn((48, 50, 384), device=pr.dev, dtype=torch.float16)
    host = torch.empty((48, paste.i420_size(720, 1280)), dtype=torch.uint8, pin_memory=True)
    out: dict[str, Any] = {}

    def run(fn: Any) -> None:
        faces = fn(lat, aud)
        host.copy_(paste.rgb_to_i420(paste.paste_back(gav, idx, faces)), non_blocking=True)

    if pr.compiled is not None:
        t = measure.gpu_time_ms(lambda: run(pr.compiled), reps=10)
        out["compiled_b48_fps"] = 48e3 / t["median_ms"]
    with torch.inference_mode():
        t = measure.gpu_time_ms(lambda: run(pr.step), reps=5)
    out["eager_b48_fps"] = 48e3 / t["median_ms"]
    return out


def main(path: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from bench.gpu import measure

    res: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save() -> None:
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1, default=str)

    def section(name: str, fn: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:
            out = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        if isinstance(out, dict):
            out["section_s"] = round(time.perf_counter() - t0, 1)
        res[name] = out
        save()
        print(
            f"[probe] {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True
        )

    section("env", _env)
    pr = _Probe()
    section("models", lambda: models(pr))
    for name, fn in (
        ("eager_fp16", eager),
        ("compiled", compiled),
        ("whisper", whisper),
        ("paste", pasteback),
        ("full_offline_no_audio", full_offline),
    ):
        section(name, lambda fn=fn: fn(pr))  # type: ignore[misc]
    section(
        "encoders_720p", lambda: measure.encoder_cost(720, 1280, frames=40, threads=(1, 4, 8, 16))
    )
    section("encoders_512", lambda: measure.encoder_cost(512, 512, frames=40, threads=(8, 16)))
    res["gpu_mem_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    save()
    _print_summary(res)


def _print_summary(res: dict[str, Any]) -> None:
    """A short line per section, last."""
    for k, v in res.items():
        if isinstance(v, dict):
            flat = {
                kk: (round(vv, 3) if isinstance(vv, float) else vv)
                for kk, vv in v.items()
                if kk not in ("trace", "nvidia_smi")
            }
            print(k, json.dumps(flat, default=str)[:900])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "probe.json")
