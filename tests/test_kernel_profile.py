"""The kernel profile's bookkeeping on the CPU (its kernel trace needs a GPU: the device runs it)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.gpu import measure
from bench.gpu.kernel_profile import conv_flops, kernel_kind, summarise


def test_conv_flops_match_torchs_own_flop_counter() -> None:
    _, vae, _ = measure.build_models("tiny", "cpu", torch.float32)
    z = torch.randn(1, 4, 8, 8)
    ours = conv_flops(lambda: vae.decode(z), vae)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        vae.decode(z)
    theirs = counter.get_flop_counts()["Global"].get(torch.ops.aten.convolution, 0)
    assert ours["convs"] > 5
    assert ours["total"] == theirs
    assert sum(ours["by_height"].values()) == ours["total"]
    assert max(ours["by_height"]) > 8  # the decoder upsamples past the latent's size


def test_kernels_are_sorted_into_kinds() -> None:
    assert kernel_kind("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_nhwckrsc_nhwc") == "conv_gemm"
    assert (
        kernel_kind("void at::native::(anonymous)::RowwiseMomentsCUDAKernel group_norm") == "norm"
    )
    assert kernel_kind("pytorch_flash::flash_fwd_kernel") == "attention"
    assert kernel_kind("triton_poi_fused_add_silu_3") == "other"
    table = [("cudnn_conv_a", 3000.0), ("triton_poi_fused_silu", 1000.0)]
    out = summarise(table, frames=2, flops_per_frame=3e9)
    assert out["ms_per_frame"] == {"conv_gemm": 1.5, "other": 0.5}
    assert out["total_ms_per_frame"] == 2.0
    assert out["conv_tflops"] == 3e9 / 1.5e-3 / 1e12


def _smoke(tmp_path, *flags: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
    import json

    from bench.gpu.kernel_profile import main

    out = tmp_path / "profile.json"
    main([str(out), "--device", "cpu", "--size", "tiny", "--batch", "2", "--reps", "1", *flags])
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_smoke_run_of_the_vae_on_the_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    res = _smoke(tmp_path, "--nhwc-norm", "--budget-s", "0")
    assert (
        res["model"] == "vae" and res["nhwc_norm"] is True and res["fold"] and res["gpu"] == "cpu"
    )
    eager = res["eager"]
    assert eager["ms_per_frame"]["conv_gemm"] > 0 and eager["ms_per_frame"]["norm"] > 0
    assert eager["max_diff_vs_stock"] <= 1  # swapped norms and folded upsampling, fp32
    assert res["compiled"] == {"skipped": "budget"}


def test_smoke_run_of_the_unet_compiled_on_the_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    res = _smoke(tmp_path, "--model", "unet", "--nhwc-norm")
    assert res["model"] == "unet" and not res["fold"] and res["nhwc_norm"] is True
    assert res["conv_flops"]["total"] > 0
    for section in ("eager", "compiled"):
        assert res[section]["max_diff_vs_stock"] < 1e-3  # raw UNet output, fp32
        assert res[section]["total_ms_per_frame"] > 0
