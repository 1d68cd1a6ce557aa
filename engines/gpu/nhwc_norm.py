"""GroupNorm written for channels-last activations, so that torch.compile keeps it in their
memory order.

The VAE decoder runs channels-last (NHWC in memory: cuDNN's fast convolution layout). Its
30 GroupNorms (and the activations around them) are 39 % of its GPU time on an H200 under torch.compile (0.55 of 1.40 ms per
frame, batch 16, `bench/results/vae_profile_H200_2026-12-01_*.json`), several times what
their memory traffic needs: the stock decomposition views the input as (N, groups, rest),
which an NHWC tensor is not, so the generated kernels copy it to NCHW order ("clone" in
their names) and read it across the grain.

`ChannelsLastGroupNorm` computes the same thing in the input's own order: channels moved
last (a view of an NHWC tensor), split as (N, positions, groups, channels per group), mean
and variance over positions and channels per group in float32, then scale and shift per
channel. Output has the input's dtype and, for an NHWC input, is NHWC again. Same arithmetic
as `torch.nn.GroupNorm` up to the order of float32 summation. `swap_group_norms` swaps every
GroupNorm inside a module (in place; `swapped_copy` swaps in a copy that shares the
original's weights); the parameters are the same tensors, so state dicts are unchanged.
"""

from __future__ import annotations

import copy
import itertools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class ChannelsLastGroupNorm(nn.Module):
    """`nn.GroupNorm` over (N, C, *) computed with channels last (see the module notes)."""

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
        last = x.movedim(1, -1)  # (N, *, C): a view, contiguous when x is channels-last
        rows = last.reshape(n, -1, self.num_groups, c // self.num_groups).float()
        var, mean = torch.var_mean(rows, dim=(1, 3), keepdim=True, correction=0)
        y = ((rows - mean) * torch.rsqrt(var + self.eps)).reshape(last.shape)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight.float() + self.bias.float()
        return y.to(x.dtype).movedim(-1, 1)

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
    log.info("swapped %d group norms for their channels-last form", len(targets))
    return len(targets)


def swapped_copy(module: nn.Module) -> nn.Module:
    """A copy of `module`'s structure with its GroupNorms swapped; parameters and buffers are
    the same tensors as the original's (no memory), whose own modules are left alone."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    twin = copy.deepcopy(module, memo=shared)
    swap_group_norms(twin)
    return twin
