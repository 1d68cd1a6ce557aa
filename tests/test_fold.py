"""Folded upsampling (engines.pipeline.fold): nearest 2x + 3x3 conv as one 2x2 conv on the
low-resolution map must give the same output as diffusers' Upsample2D (CPU, float32)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.upsampling import Upsample2D

from engines.pipeline.compiled import MuseTalkStep
from engines.pipeline.fold import FoldedUpsample, can_fold, fold_upsamplers, folded_weight


@pytest.mark.parametrize("shape", [(1, 6, 4, 4), (3, 6, 5, 9), (2, 6, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_upsample_equals_upsample2d(shape: tuple[int, ...], channels_last: bool) -> None:
    torch.manual_seed(1)
    up = Upsample2D(6, use_conv=True, out_channels=5).eval()
    folded = FoldedUpsample(up)
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want, got = up(x), folded(x)
    assert got.shape == want.shape == (shape[0], 5, 2 * shape[2], 2 * shape[3])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    if shape[2] > 1 and shape[3] > 1:  # a 1x1 map is contiguous in both layouts
        assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_folded_upsample_other_output_size_uses_the_original() -> None:
    up = Upsample2D(4, use_conv=True).eval()
    x = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        assert torch.equal(FoldedUpsample(up)(x, (7, 5)), up(x, (7, 5)))


def test_folded_weight_keeps_the_sum_of_taps() -> None:
    w = torch.randn(3, 2, 3, 3)
    f = folded_weight(w)
    assert f.shape == (12, 2, 2, 2)
    # every phase spreads all nine taps over its four: the sums agree
    for p in range(4):
        assert torch.allclose(f[3 * p : 3 * p + 3].sum((2, 3)), w.sum((2, 3)), atol=1e-6)
    with pytest.raises(ValueError, match="3x3"):
        folded_weight(torch.randn(3, 2, 5, 5))


def test_only_nearest_conv_upsamplers_fold() -> None:
    assert can_fold(Upsample2D(4, use_conv=True))
    assert not can_fold(Upsample2D(4, use_conv=False))
    assert not can_fold(Upsample2D(4, use_conv_transpose=True))
    assert not can_fold(torch.nn.Conv2d(4, 4, 3, padding=1))
    with pytest.raises(ValueError, match="cannot fold"):
        FoldedUpsample(Upsample2D(4, use_conv=False))


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=4,
    ).eval()


def test_fold_a_vae_decoder_same_images() -> None:
    vae = _tiny_vae()
    z = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        want = vae.decode(z).sample
        assert fold_upsamplers(vae) == 2
        assert fold_upsamplers(vae) == 0  # already folded: the originals inside stay put
        got = vae.decode(z).sample
    assert got.shape == (2, 3, 32, 32)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


class _Unet(torch.nn.Module):
    """Stands in for the UNet (returns the latents): the test is about the VAE copy."""

    def forward(self, latents, timestep, encoder_hidden_states):  # type: ignore[no-untyped-def]
        class Out:
            sample = latents

        return Out()


def test_musetalk_step_folds_a_copy_and_keeps_the_eager_vae() -> None:
    vae = _tiny_vae()
    plain = MuseTalkStep(_Unet(), vae).eval()
    folded = MuseTalkStep(_Unet(), vae, fold_upsample=True).eval()
    assert folded.vae is not vae
    assert not any(isinstance(m, FoldedUpsample) for m in vae.modules())
    assert sum(isinstance(m, FoldedUpsample) for m in folded.vae.modules()) == 2
    lat, aud = torch.randn(2, 8, 8, 8), torch.randn(2, 50, 384)
    with torch.no_grad():
        a, b = plain(lat, aud), folded(lat, aud)
    assert a.dtype == torch.uint8 and a.shape == b.shape
    assert (a.int() - b.int()).abs().max() <= 1
