"""The channels-last GroupNorm against torch's own, and inside the MuseTalk VAE decoder (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bench.gpu import measure
from engines.pipeline.nhwc_norm import ChannelsLastGroupNorm, shared_copy, swap_group_norms


@pytest.mark.parametrize("shape", [(2, 32, 7, 5), (3, 64, 9), (2, 16, 4, 4, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torchs_group_norm(shape: tuple[int, ...], affine: bool) -> None:
    g = torch.Generator().manual_seed(len(shape))
    ref = nn.GroupNorm(8, shape[1], eps=1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.randn(shape[1], generator=g))
            ref.bias.copy_(torch.randn(shape[1], generator=g))
    ours = ChannelsLastGroupNorm(ref)
    # channels with their own offsets and spreads: the per-channel statistics must combine
    x = torch.randn(shape, generator=g) * torch.rand(shape[1], *[1] * (len(shape) - 2), generator=g)
    x = 3 * x + torch.randn(shape[1], *[1] * (len(shape) - 2), generator=g)
    inputs = [x]
    if len(shape) == 4:
        inputs.append(x.contiguous(memory_format=torch.channels_last))
    for inp in inputs:
        got = ours(inp)
        assert got.shape == inp.shape and got.dtype == inp.dtype
        torch.testing.assert_close(got, ref(inp), rtol=1e-5, atol=1e-5)


def test_keeps_channels_last_and_half_precision() -> None:
    ref = nn.GroupNorm(4, 16)
    x = torch.randn(2, 16, 6, 6).half().contiguous(memory_format=torch.channels_last)
    got = ChannelsLastGroupNorm(ref)(x)
    assert got.dtype == torch.float16
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), ref(x.float()), rtol=0, atol=2e-3)


def test_refuses_the_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match="expected \\(N, 16"):
        ChannelsLastGroupNorm(nn.GroupNorm(4, 16))(torch.randn(2, 8, 3, 3))


def test_swapped_vae_decoder_decodes_the_same() -> None:
    _, vae, _ = measure.build_models("tiny", "cpu", torch.float32)
    swapped = copy.deepcopy(vae)
    n_norms = sum(type(m) is nn.GroupNorm for m in vae.decoder.modules())
    assert swap_group_norms(swapped.decoder) == n_norms > 0
    assert not any(type(m) is nn.GroupNorm for m in swapped.decoder.modules())
    assert swapped.state_dict().keys() == vae.state_dict().keys()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = vae.decode(z).sample
        got = swapped.to(memory_format=torch.channels_last).decode(z).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compiles_as_one_graph_with_the_same_result() -> None:
    ref = nn.GroupNorm(4, 16)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    fn = torch.compile(ChannelsLastGroupNorm(ref), fullgraph=True)
    torch.testing.assert_close(fn(x), ref(x), rtol=1e-5, atol=1e-5)


class _Unet(nn.Module):
    """Stands in for the UNet (returns the latents): the test is about the VAE copy."""

    def forward(self, latents, timestep, encoder_hidden_states):  # type: ignore[no-untyped-def]
        class Out:
            sample = latents

        return Out()


@pytest.mark.parametrize("fold", [False, True])
def test_musetalk_step_swaps_a_copy_and_keeps_the_eager_vae(fold: bool) -> None:
    from engines.pipeline.compiled import MuseTalkStep

    _, vae, _ = measure.build_models("tiny", "cpu", torch.float32)
    plain = MuseTalkStep(_Unet(), vae).eval()
    swapped = MuseTalkStep(_Unet(), vae, fold_upsample=fold, nhwc_norm=True).eval()
    assert swapped.vae is not vae
    assert not any(isinstance(m, ChannelsLastGroupNorm) for m in vae.modules())
    assert any(isinstance(m, ChannelsLastGroupNorm) for m in swapped.vae.decoder.modules())
    assert swapped.unet is not plain.unet  # a twin sharing the UNet's weights
    g = torch.Generator().manual_seed(2)
    lat, aud = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 50, 384, generator=g)
    with torch.no_grad():
        a, b = plain(lat, aud), swapped(lat, aud)
    assert a.dtype == torch.uint8 and a.shape == b.shape
    assert (a.int() - b.int()).abs().max() <= 1


def test_a_swapped_shared_copy_shares_the_weights_and_leaves_the_original() -> None:
    unet, _, _ = measure.build_models("tiny", "cpu", torch.float32)
    twin = shared_copy(unet)
    assert swap_group_norms(twin) > 0
    assert any(isinstance(m, ChannelsLastGroupNorm) for m in twin.modules())
    assert not any(isinstance(m, ChannelsLastGroupNorm) for m in unet.modules())
    mine, theirs = dict(unet.named_parameters()), dict(twin.named_parameters())
    assert mine.keys() == theirs.keys()
    assert all(mine[k] is theirs[k] for k in mine)  # no second copy of the weights
    g = torch.Generator().manual_seed(4)
    lat, cond = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 50, 384, generator=g)
    t0 = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        want = unet(lat, t0, encoder_hidden_states=cond).sample
        got = twin(lat, t0, encoder_hidden_states=cond).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
