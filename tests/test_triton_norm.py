"""The Triton GroupNorm (+ SiLU) kernels against torch's GroupNorm, and inside the tiny VAE
decoder. Without a GPU the kernels run in Triton's interpreter (`TRITON_INTERPRET=1`, set
by conftest.py before triton is imported): the same kernel code, executed with numpy.
The GPU's speed is the bench's business (`lipstream bench`, `kernel_profile --nhwc-norm
triton`); what these tests show is that the kernels compute the right thing."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from bench.gpu import measure
from engines.pipeline import triton_norm
from engines.pipeline.triton_norm import (
    TritonGroupNorm,
    group_norm_nhwc,
    swap_norm_silu_pairs,
    tile_shape,
)

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "no GPU, and Triton's interpreter is off (conftest.py sets it)", allow_module_level=True
    )

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Grows by one each time the kernels run (`group_norm_nhwc`, wrapped)."""
    calls: list[int] = []
    real = triton_norm.group_norm_nhwc
    monkeypatch.setattr(triton_norm, "group_norm_nhwc", lambda *a: calls.append(1) or real(*a))
    return calls


def _norm(groups: int, channels: int, affine: bool, seed: int) -> nn.GroupNorm:
    g = torch.Generator().manual_seed(seed)
    norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(channels, generator=g))
            norm.bias.copy_(torch.randn(channels, generator=g))
    return norm.to(DEV)


def _input(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Channels with their own offsets (up to ~20) and spreads: a variance taken as
    E[x^2] - E[x]^2, or per-channel statistics combined wrongly, would show."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g) * (0.1 + torch.rand(c, 1, 1, generator=g))
    x = x + 20 * torch.randn(c, 1, 1, generator=g)
    return x.to(DEV, dtype).contiguous(memory_format=torch.channels_last)


def _reference(norm: nn.GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
    y = norm.float()(x.float())
    return nn.functional.silu(y) if silu else y


@pytest.mark.parametrize(
    ("shape", "groups"),
    [
        ((2, 32, 8, 8), 8),  # one tile per image
        ((3, 128, 9, 9), 32),  # 81 positions in tiles of 64: a short last tile
        ((1, 256, 12, 11), 32),  # two channel blocks of 128
        ((2, 20, 5, 3), 4),  # channels not a power of two (masked lanes)
    ],
)
@pytest.mark.parametrize("silu", [False, True])
def test_matches_torchs_group_norm(shape: tuple[int, ...], groups: int, silu: bool) -> None:
    norm = _norm(groups, shape[1], affine=True, seed=shape[1])
    x = _input(shape, seed=shape[2])
    got = group_norm_nhwc(x, groups, norm.weight, norm.bias, norm.eps, silu)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(got, _reference(norm, x, silu), rtol=1e-4, atol=1e-4)


def test_without_affine_parameters() -> None:
    norm = _norm(4, 16, affine=False, seed=3)
    x = _input((2, 16, 6, 6), seed=4)
    got = group_norm_nhwc(x, 4, None, None, norm.eps, silu=False)
    torch.testing.assert_close(got, norm(x), rtol=1e-4, atol=1e-4)


def test_combine_loops_over_chunks_of_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a chunk of 8 partial statistics a group of 4 channels reads its 2-tile chunks
    in turn (the full-size decoder's 256x256 maps have 1024 tiles per image)."""
    monkeypatch.setattr(triton_norm, "GROUP_CHUNK_ELEMENTS", 8)
    shape = (2, 128, 24, 24)  # 576 positions: 9 tiles of 64, 5 loop steps of 2 tiles
    assert tile_shape(128, 576) == (64, 128)
    norm = _norm(32, 128, affine=True, seed=5)
    x = _input(shape, seed=6)
    got = group_norm_nhwc(x, 32, norm.weight, norm.bias, norm.eps, silu=True)
    with torch.no_grad():
        torch.testing.assert_close(got, _reference(norm, x, True), rtol=1e-4, atol=1e-4)


def test_half_precision() -> None:
    norm = _norm(8, 64, affine=True, seed=7)
    x = _input((2, 64, 10, 10), seed=8, dtype=torch.float16)
    got = group_norm_nhwc(x, 8, norm.weight, norm.bias, norm.eps, silu=True)
    assert got.dtype == torch.float16
    with torch.no_grad():
        want = _reference(norm, x, True)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=8e-3)


def test_tile_shapes() -> None:
    assert tile_shape(128, 65536) == (64, 128)
    assert tile_shape(512, 1024) == (64, 128)
    assert tile_shape(20, 15) == (16, 32)
    assert tile_shape(4, 100) == (128, 4)


def test_refuses_what_the_kernels_cannot_take() -> None:
    x = _input((2, 16, 4, 4), seed=9)
    with pytest.raises(ValueError, match="channels-last 4-D"):
        group_norm_nhwc(x.contiguous(), 4, None, None, 1e-6)  # NCHW memory
    with pytest.raises(ValueError, match="do not split into 5 groups"):
        group_norm_nhwc(x, 5, None, None, 1e-6)
    with pytest.raises(ValueError, match="expected \\(N, 8"):
        TritonGroupNorm(nn.GroupNorm(2, 8))(x)


def test_module_falls_back_to_torch_ops_off_the_kernels_layout() -> None:
    """NCHW or 3-D input takes the torch path, with the same result."""
    norm = _norm(4, 16, affine=True, seed=10)
    ours = TritonGroupNorm(norm, silu=True)
    for x in (_input((2, 16, 5, 5), seed=11).contiguous(), torch.randn(2, 16, 9, device=DEV)):
        with torch.no_grad():
            torch.testing.assert_close(ours(x), _reference(norm, x, True), rtol=1e-5, atol=1e-5)


def test_swapped_decoder_decodes_the_same(kernel_calls: list[int]) -> None:
    """The tiny VAE decoder with its norm + SiLU pairs on the kernels (the SiLU modules
    become identities) decodes what the stock decoder does; the kernels really ran."""
    _, vae, _ = measure.build_models("tiny", "cpu", torch.float32)
    vae = vae.to(DEV)
    swapped = copy.deepcopy(vae)
    resnets = [m for m in vae.decoder.modules() if hasattr(m, "norm1") and hasattr(m, "norm2")]
    assert resnets
    n = swap_norm_silu_pairs(swapped.decoder)
    assert n == 2 * len(resnets) + 1  # norm1, norm2 of each resnet, and conv_norm_out
    assert isinstance(swapped.decoder.conv_act, nn.Identity)
    assert swapped.state_dict().keys() == vae.state_dict().keys()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEV)
    with torch.inference_mode():
        want = vae.decode(z).sample
        got = swapped.to(memory_format=torch.channels_last).decode(z).sample
    assert len(kernel_calls) == n
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compiles_around_the_kernels() -> None:
    """torch.compile sees the kernels as one opaque op (its fake output is channels-last,
    as the real one is) and compiles the rest around it."""
    norm = _norm(4, 16, affine=True, seed=12)
    conv = nn.Conv2d(16, 16, 3, padding=1).to(DEV)
    model = nn.Sequential(TritonGroupNorm(norm, silu=True), conv).to(
        memory_format=torch.channels_last
    )
    x = _input((2, 16, 6, 6), seed=13)
    with torch.no_grad():
        want = conv(_reference(norm, x, True))
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_norm_bench_smoke(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`python -m bench.gpu.norm_bench` end to end on a small shape (on the CPU the times
    mean nothing; the JSON's structure and the kernels' accuracy do)."""
    import json

    from bench.gpu import norm_bench

    out = tmp_path / "nb.json"
    args = [str(out), "--shapes", "64:8:8:3", "--tiles", "1024", "--warps", "4"]
    args += ["--reps", "1", "--no-compile", "--batch", "2"]
    if not torch.cuda.is_available():
        args += ["--device", "cpu"]
    norm_bench.main(args)
    res = json.loads(out.read_text())
    row = res["shapes"]["64x8x8"]
    assert row["count"] == 3 and row["best_triton"] == "triton_t1024_w4"
    assert row["triton_t1024_w4"]["max_diff"] < 1e-3
    assert res["decoder_totals"]["best_ms_per_frame"] > 0
    assert triton_norm.TILE_ELEMENTS == 8192  # the sweep's setting is put back


def test_the_op_copies_an_nchw_input_rather_than_fail() -> None:
    """Should torch.compile hand the op an NCHW tensor, it works on a channels-last copy."""
    norm = _norm(4, 16, affine=True, seed=14)
    x = _input((2, 16, 5, 5), seed=15).contiguous()
    assert not x.is_contiguous(memory_format=torch.channels_last)
    got = torch.ops.lipstream.group_norm_nhwc(x, 4, norm.weight, norm.bias, norm.eps, True)
    assert got.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(got, _reference(norm, x, True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fold", [False, True])
def test_musetalk_step_with_triton_norms(fold: bool, kernel_calls: list[int]) -> None:
    """`MuseTalkStep(nhwc_norm="triton")`: the decoder's norm + SiLU pairs on the kernels,
    its other norm (the attention's) in the channels-last torch form; the eager VAE
    untouched; the faces within 1/255 of the stock step's."""
    from engines.pipeline.compiled import MuseTalkStep
    from engines.pipeline.nhwc_norm import ChannelsLastGroupNorm

    class Unet(nn.Module):  # stands in for the UNet (returns the latents)
        def forward(self, latents, timestep, encoder_hidden_states):  # type: ignore[no-untyped-def]
            class Out:
                sample = latents

            return Out()

    _, vae, _ = measure.build_models("tiny", "cpu", torch.float32)
    vae = vae.to(DEV)
    plain = MuseTalkStep(Unet(), vae).eval().to(DEV)
    step = MuseTalkStep(Unet(), vae, fold_upsample=fold, nhwc_norm="triton").eval().to(DEV)
    assert not any(isinstance(m, TritonGroupNorm) for m in vae.modules())
    decoder = list(step.vae.decoder.modules())
    assert any(isinstance(m, TritonGroupNorm) for m in decoder)
    assert any(isinstance(m, ChannelsLastGroupNorm) for m in decoder)  # the attention's norm
    assert not any(type(m) is nn.GroupNorm for m in decoder)
    step = step.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(2)
    lat = torch.randn(2, 4, 8, 8, generator=g).to(DEV)
    aud = torch.randn(2, 50, 384, generator=g).to(DEV)
    with torch.no_grad():
        a = plain(lat, aud)
        b = step(lat.contiguous(memory_format=torch.channels_last), aud)
    assert kernel_calls
    assert a.dtype == torch.uint8 and a.shape == b.shape
    assert (a.int() - b.int()).abs().max() <= 1


def test_swapped_unet_predicts_the_same(kernel_calls: list[int]) -> None:
    """The tiny UNet with its resnets' norm + SiLU pairs on the kernels: the resnets'
    `nonlinearity` still applies the SiLU to the time embedding (2-D) and nothing else; the
    transformer blocks' norms stay; the prediction matches the stock UNet's."""
    from engines.pipeline.nhwc_norm import shared_copy

    unet, _, _ = measure.build_models("tiny", "cpu", torch.float32)
    unet = unet.to(DEV)
    twin = shared_copy(unet)
    resnets = [m for m in unet.modules() if hasattr(m, "norm1") and hasattr(m, "time_emb_proj")]
    assert resnets
    n = swap_norm_silu_pairs(twin)
    assert n == 2 * len(resnets) + 1
    assert any(type(m) is nn.GroupNorm for m in twin.modules())  # the transformers' norms
    assert not any(isinstance(m, TritonGroupNorm) for m in unet.modules())  # original intact
    act = next(m.nonlinearity for m in twin.modules() if hasattr(m, "time_emb_proj"))
    v, fmap = torch.randn(2, 8), torch.randn(2, 4, 3, 3)
    assert torch.equal(act(v), nn.functional.silu(v)) and act(fmap) is fmap
    g = torch.Generator().manual_seed(4)
    lat = torch.randn(2, 8, 8, 8, generator=g).to(DEV)
    cond = torch.randn(2, 50, 384, generator=g).to(DEV)
    t0 = torch.zeros(1, dtype=torch.long, device=DEV)
    with torch.inference_mode():
        want = unet(lat, t0, encoder_hidden_states=cond).sample
        twin = twin.to(memory_format=torch.channels_last)
        got = twin(
            lat.contiguous(memory_format=torch.channels_last), t0, encoder_hidden_states=cond
        ).sample
    assert len(kernel_calls) == n
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
