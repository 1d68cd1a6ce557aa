# mypy: disable-error-code="misc, operator"
"""Where the GPU time of one generated frame goes, and what each optimisation buys
(one device call; full-size random weights, fp16):

    python -m bench.gpu.variants OUT.json

- the UNet alone and the VAE decoder alone, compiled + one CUDA graph at batch B;
- VAE decoder variants: plain, folded upsampling (engines.pipeline.fold), folded + inductor's
  coordinate-descent tuning and 1x1-convolutions-as-matmul, folded with a dynamic batch;
  each with its distance (uint8 faces) from the eager fp16 and the eager fp32 decode;
- the whisper encoder at the featurizer's batch: eager vs `CompiledEncoder`.
Each section lands in the JSON as soon as it is done.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engines.pipeline.compiled import to_faces

B = 16


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a.int() - b.int()).abs()
    return {
        "max": int(d.max()),
        "over_1": float((d > 1).float().mean()),
        "over_2": float((d > 2).float().mean()),
    }


@dataclass
class _Inputs:
    """The models (full size, random, fp16) and one batch through them, with the eager
    fp16 and fp32 decodes of its UNet output as references."""

    unet: Any
    vae: Any
    whisper: Any
    lat: torch.Tensor
    cond: torch.Tensor
    t0: torch.Tensor
    z: torch.Tensor
    ref16: torch.Tensor
    ref32: torch.Tensor


def _inputs() -> _Inputs:
    from bench.gpu import measure

    dev = torch.device("cuda")
    unet, vae, whisper = measure.build_models("full", dev, torch.float16)
    g = torch.Generator(device=dev).manual_seed(3)
    lat = torch.randn((B, 8, 32, 32), device=dev, generator=g, dtype=torch.float16)
    cond = torch.randn((B, 50, 384), device=dev, generator=g, dtype=torch.float16)
    t0 = torch.zeros(1, dtype=torch.long, device=dev)
    with torch.inference_mode():
        z = unet(lat, t0, encoder_hidden_states=cond).sample / 0.18215
        ref16 = to_faces(vae.decode(z).sample)
        vae32 = copy.deepcopy(vae).float()
        ref32 = to_faces(vae32.decode(z.float()).sample)
        del vae32
    torch.cuda.empty_cache()
    return _Inputs(unet, vae, whisper, lat, cond, t0, z, ref16, ref32)


def unet_only(m: _Inputs) -> dict[str, Any]:
    """The UNet alone, compiled, channels-last, one CUDA graph at batch B."""
    from bench.gpu import measure
    from engines.pipeline.compiled import warm_and_capture

    u = m.unet.to(memory_format=torch.channels_last)
    fn = torch.compile(lambda x, c: u(x, m.t0, encoder_hidden_states=c).sample)
    t = time.perf_counter()
    with torch.inference_mode():
        graph, _ = warm_and_capture(fn, m.lat, m.cond)
    compile_s = time.perf_counter() - t
    ms = measure.gpu_time_ms(graph.replay, reps=30)
    return {"compile_s": compile_s, **ms, "ms_per_frame": ms["median_ms"] / B}


def vae_variant(
    m: _Inputs, fold: bool, tune: bool = False, dynamic: bool = False
) -> dict[str, Any]:
    """The VAE decoder compiled + one CUDA graph: `fold` its upsampling, `tune` with
    inductor's coordinate-descent tuning and 1x1 convolutions as matmuls, `dynamic` batch."""
    import torch._inductor.config as ic

    from bench.gpu import measure
    from engines.pipeline.compiled import warm_and_capture
    from engines.pipeline.fold import fold_upsamplers

    v = copy.deepcopy(m.vae)
    if fold:
        fold_upsamplers(v)
    v = v.to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    saved = (ic.coordinate_descent_tuning, ic.conv_1x1_as_mm)
    ic.coordinate_descent_tuning, ic.conv_1x1_as_mm = tune, tune
    try:
        fn = torch.compile(
            lambda x: to_faces(v.decode(x).sample), dynamic=False if not dynamic else None
        )
        x = m.z.clone()
        if dynamic:
            torch._dynamo.mark_dynamic(x, 0)
        t = time.perf_counter()
        with torch.inference_mode():
            graph, out = warm_and_capture(fn, x)
            graph.replay()
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t
    finally:
        ic.coordinate_descent_tuning, ic.conv_1x1_as_mm = saved
    ms = measure.gpu_time_ms(graph.replay, reps=30)
    return {
        "compile_s": compile_s,
        **ms,
        "ms_per_frame": ms["median_ms"] / B,
        "vs_eager_fp16": _diff(out, m.ref16),
        "vs_eager_fp32": _diff(out, m.ref32),
    }


def vae_eager(m: _Inputs) -> dict[str, Any]:
    """The eager VAE decoder, plain and with folded upsampling, and their distances."""
    from bench.gpu import measure
    from engines.pipeline.fold import fold_upsamplers

    with torch.inference_mode():
        ms = measure.gpu_time_ms(lambda: m.vae.decode(m.z).sample, reps=10)
        v = copy.deepcopy(m.vae)
        fold_upsamplers(v)
        folded = to_faces(v.decode(m.z).sample)
        msf = measure.gpu_time_ms(lambda: v.decode(m.z).sample, reps=10)
    return {
        "eager_ms_per_frame": ms["median_ms"] / B,
        "eager_folded_ms_per_frame": msf["median_ms"] / B,
        "eager16_vs_fp32": _diff(m.ref16, m.ref32),
        "eager_folded_vs_eager": _diff(folded, m.ref16),
        "eager_folded_vs_fp32": _diff(folded, m.ref32),
    }


def encoder(m: _Inputs) -> dict[str, Any]:
    """The whisper encoder on 8 windows: eager against `CompiledEncoder`."""
    from bench.gpu import measure
    from engines.pipeline.compiled import CompiledEncoder

    enc = m.whisper  # build_models gives the encoder itself
    mel = torch.randn((8, 80, 3000), device=m.lat.device, dtype=torch.float16)

    def eager_fn() -> torch.Tensor:
        return torch.stack(enc(mel, output_hidden_states=True).hidden_states, 2)

    with torch.inference_mode():
        want = eager_fn()
        ms_eager = measure.gpu_time_ms(eager_fn, reps=20)
        ce = CompiledEncoder(enc, 8, 80, 3000)
        warm = ce.warm_up()
        got = ce(mel).clone()
        ms_comp = measure.gpu_time_ms(lambda: ce(mel), reps=50)
    rel = float((got.float() - want.float()).norm() / want.float().norm())
    return {
        "eager_ms_per_window": ms_eager["median_ms"] / 8,
        "compiled_ms_per_window": ms_comp["median_ms"] / 8,
        "compile_s": warm,
        "relative_error_vs_eager": rel,
    }


def main(path: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from engines.pipeline.compiled import use_inductor_cache

    use_inductor_cache()
    res: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "batch": B}
    res["gpu"] = torch.cuda.get_device_name(0)
    res["torch"] = torch.__version__

    def section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:
            out = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
        out["section_s"] = round(time.perf_counter() - t0, 1)
        res[name] = out
        with open(path, "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"[variants] {name} {json.dumps(out)[:300]}", file=sys.stderr, flush=True)

    torch.backends.cudnn.benchmark = True
    m = _inputs()
    section("vae_eager", lambda: vae_eager(m))
    section("vae_plain", lambda: vae_variant(m, False))
    section("vae_fold", lambda: vae_variant(m, True))
    section("encoder", lambda: encoder(m))
    section("vae_fold_tuned", lambda: vae_variant(m, True, tune=True))
    section("vae_fold_dynamic", lambda: vae_variant(m, True, dynamic=True))
    section("unet", lambda: unet_only(m))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "variants.json")
