"""Nearest-neighbour 2x upsampling followed by a 3x3 convolution, folded into one 2x2
convolution on the low-resolution map ("sub-pixel" form).

After nearest 2x upsampling, output pixel (2i + a, 2j + b) of a 3x3 convolution (padding 1)
reads only low-resolution rows i - 1 + a .. i + a and columns j - 1 + b .. j + b: the taps
that land on the same source pixel can be summed beforehand. Each of the four phases (a, b)
is then a 2x2 convolution, and all four are one convolution with 4 x C_out output channels
over the input padded by one pixel; the phases are interleaved afterwards. Same arithmetic
up to the rounding of the summed weights, 16 instead of 36 multiply-adds per output pixel
and channel pair, and no upsampled copy of the input in memory.

In the MuseTalk VAE decoder the three upsampling convolutions are about 28% of its work
(the largest, 256 channels at 256 x 256). `fold_upsamplers` swaps every eligible diffusers
`Upsample2D` inside a module for `FoldedUpsample`; the eager reference model is left alone
(callers fold a copy).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

# rows (or columns) of the 3x3 kernel that fall on low-res offset 0 and 1 of the 2x2 kernel,
# for output phase 0 (reads i - 1, i) and phase 1 (reads i, i + 1)
_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))


def folded_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (4 C_out, C_in, 2, 2), phase-major (a, b) = (0,0), (0,1), (1,0),
    (1,1); the sums are taken in float32 and rounded once to the weight's dtype."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"expected a 3x3 convolution weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    phases = []
    for a in (0, 1):
        for b in (0, 1):
            rows = []
            for r in (0, 1):
                cols = []
                for c in (0, 1):
                    taps = w[:, :, list(_TAPS[a][r]), :][:, :, :, list(_TAPS[b][c])]
                    cols.append(taps.sum(dim=(2, 3)))
                rows.append(torch.stack(cols, dim=-1))
            phases.append(torch.stack(rows, dim=-2))
    return torch.cat(phases, dim=0).to(weight.dtype)


def _conv_of(up: nn.Module) -> nn.Conv2d | None:
    conv = getattr(up, "conv", None) if getattr(up, "name", "conv") == "conv" else None
    if conv is None:
        conv = getattr(up, "Conv2d_0", None)
    return conv if isinstance(conv, nn.Conv2d) else None


def can_fold(up: nn.Module) -> bool:
    """A diffusers Upsample2D doing nearest 2x then a plain 3x3 / padding 1 convolution."""
    conv = _conv_of(up)
    return (
        type(up).__name__ == "Upsample2D"
        and bool(getattr(up, "use_conv", False))
        and not getattr(up, "use_conv_transpose", False)
        and bool(getattr(up, "interpolate", False))
        and getattr(up, "norm", None) is None
        and conv is not None
        and conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


class FoldedUpsample(nn.Module):
    """Drop-in for an eligible `Upsample2D`: (B, C_in, H, W) -> (B, C_out, 2H, 2W)."""

    def __init__(self, up: nn.Module) -> None:
        super().__init__()
        if not can_fold(up):
            raise ValueError(f"cannot fold {type(up).__name__}: not nearest 2x + 3x3 conv")
        conv = _conv_of(up)
        assert conv is not None
        self.out_channels = int(conv.out_channels)
        self.original = up  # for an explicit output_size other than 2x
        self.weight = nn.Parameter(folded_weight(conv.weight), requires_grad=False)
        bias = conv.bias.detach() if conv.bias is not None else None
        self.bias = nn.Parameter(bias.repeat(4), requires_grad=False) if bias is not None else None

    def forward(
        self, x: torch.Tensor, output_size: tuple[int, int] | None = None, *args, **kwargs
    ) -> torch.Tensor:
        b, _, h, w = x.shape
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            return self.original(x, output_size, *args, **kwargs)
        c = self.out_channels
        out = F.conv2d(x, self.weight, self.bias, padding=1)  # (B, 4C, H+1, W+1)
        p = out.view(b, 2, 2, c, h + 1, w + 1)
        rows = [
            torch.stack([p[:, a, bb, :, a : a + h, bb : bb + w] for bb in (0, 1)], dim=-1)
            for a in (0, 1)
        ]  # each (B, C, H, W, 2)
        y = torch.stack(rows, dim=-3)  # (B, C, H, 2, W, 2)
        y = y.reshape(b, c, 2 * h, 2 * w)
        if x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)
        return y


def fold_upsamplers(module: nn.Module) -> int:
    """Swap every eligible Upsample2D inside `module` for a FoldedUpsample (in place; fold a
    copy to keep the original). Returns how many were swapped."""
    targets = [
        (parent, name, child)
        for parent in module.modules()
        if not isinstance(parent, FoldedUpsample)
        for name, child in parent.named_children()
        if can_fold(child)
    ]
    for parent, name, child in targets:
        setattr(parent, name, FoldedUpsample(child))
    log.info("folded %d upsampling convolutions", len(targets))
    return len(targets)
