"""GroupNorm written for channels-last activations, so that torch.compile keeps it in their
memory order.

The VAE decoder runs channels-last (NHWC in memory: cuDNN's fast convolution layout). Its
30 GroupNorms (and the activations around them) are 39 % of its GPU time on an H200 under
torch.compile (0.55 of 1.40 ms per frame, batch 16), several times what their memory traffic
needs: the stock decomposition views the input as (N, groups, rest), which an NHWC tensor is
not, so the generated kernels copy it to NCHW order ("clone" in their names) and read it
across the grain.

`ChannelsLastGroupNorm` computes the same thing in the input's own order: channels moved
last (a view of an NHWC tensor) as (N, positions, C), statistics in float32 per channel, then
combined per group, then one scale and shift per channel: one read for the statistics, one
read and one write for the output. Output has the input's dtype and, for an NHWC input, is
NHWC again. Same arithmetic as `torch.nn.GroupNorm` up to the order of float32 summation.
`swap_group_norms` swaps every GroupNorm inside a module (in place; a `shared_copy` shares
the original's weights); the parameters are the same tensors, so state dicts are unchanged.
"""

from __future__ import annotations

import copy
import itertools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class ChannelsLastGroupNorm(nn.Module):
    """`nn.GroupNorm` over (N, C, *) computed with channels last (see the module notes).

    Mean and variance per channel over the positions (a reduction along the memory's slow
    axis, the channels side by side), then combined per group (the mean of the means; the
    mean of the variances plus the variance of the means: exact for equal counts), then one
    scale and shift per channel."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups = norm.num_groups
        self.num_channels = norm.num_channels
        self.eps = norm.eps
        self.affine = norm.affine
        self.weight = norm.weight  # the same Parameters (None when not affine)
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected (N, {self.num_channels}, ...), got shape {tuple(x.shape)}")
        n, c = x.shape[:2]
        g = self.num_groups
        last = x.movedim(1, -1)  # (N, *, C): a view, contiguous when x is channels-last
        flat = last.reshape(n, -1, c).float()
        var_c, mean_c = torch.var_mean(flat, dim=1, correction=0)  # (N, C)
        mean_c, var_c = mean_c.view(n, g, c // g), var_c.view(n, g, c // g)
        mean = mean_c.mean(dim=2, keepdim=True)
        var = var_c.mean(dim=2, keepdim=True) + (mean_c - mean).square().mean(dim=2, keepdim=True)
        scale = torch.rsqrt(var + self.eps).expand(n, g, c // g)  # (N, G, C/G)
        if self.weight is not None:
            scale = scale * self.weight.float().view(g, c // g)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.float().view(g, c // g)
        y = flat * scale.reshape(n, 1, c) + shift.reshape(n, 1, c)
        return y.to(x.dtype).reshape(last.shape).movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


def swap_group_norms(module: nn.Module) -> int:
    """Swap every `nn.GroupNorm` inside `module` for a `ChannelsLastGroupNorm` (in place).
    Returns how many were swapped."""
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is nn.GroupNorm
    ]
    for parent, name, child in targets:
        setattr(parent, name, ChannelsLastGroupNorm(child))
    log.info("swapped group norms for their channels-last form: count=%d", len(targets))
    return len(targets)


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of `module`'s structure whose parameters and buffers are the original's own
    tensors (no memory): modules can be swapped in it without touching the original."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo=shared)
