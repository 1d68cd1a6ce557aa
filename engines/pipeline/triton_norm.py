"""GroupNorm (+ SiLU) over channels-last activations as two hand-written Triton kernels.

Why: under torch.compile the VAE decoder's GroupNorms and the SiLUs after them take 0.45 of
1.38 ms per frame on an H200 even in their channels-last form (`engines.pipeline.nhwc_norm`,
`bench/results/vae_profile_H200_2026-12-01_nhwcnorm-channel.json`), about twice what their
memory traffic needs (~0.2 ms: 219 MB of activations per frame read twice and written once).

How, for x of shape (N, C, H, W) stored channels-last (memory (N, H*W, C)):
1. `_group_norm_tile_stats`: each program reads a (BLOCK_P positions x BLOCK_C channels) tile, rows
   contiguous in memory, and writes per channel the tile's mean and sum of squared
   deviations (float32; two passes over the tile in registers, so no E[x^2] - E[x]^2
   cancellation).
2. `_group_norm_combine`, one program per (n, group): combines the tiles' partial statistics
   of the group's channels exactly (Chan's parallel formula: tiles of equal counts, the last
   one shorter; 1/16 of the input's bytes at most), then folds mean, 1/std, weight and bias
   into one float32 scale and one shift per channel.
3. `_group_norm_apply`: each program reads a tile, applies y = x * scale + shift (and y * sigmoid(y)
   where the SiLU is fused) and writes it in x's dtype and layout.

So the input is read twice and the output written once, in memory order. `swap_norm_silu_pairs`
puts `TritonGroupNorm` into a VAE decoder or a UNet, absorbing the SiLU that follows a norm
where the module structure says so (resnet blocks, and the output norm). Off CUDA
(or without Triton) the module computes the same math with torch ops, which is what the CPU
tests compare against `nn.GroupNorm`; the kernels themselves are tested on the CPU through
Triton's interpreter (`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import functools
import logging
import os
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

try:  # the kernels need Triton; the module falls back to torch ops without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

# launch shape, read at each call (bench.gpu.norm_bench sweeps them on the GPU)
TILE_ELEMENTS = 8192  # elements per program of the tile kernels (BLOCK_P x BLOCK_C)
NUM_WARPS = 4  # warps per program of the tile kernels
MAX_BLOCK_C = 128
GROUP_CHUNK_ELEMENTS = 4096  # partial statistics a group's program reads per loop step


def tile_shape(channels: int, positions: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): channels in blocks of at most 128 (a power of two), positions
    filling the rest of `TILE_ELEMENTS` (at least 16, at most the positions rounded up)."""
    block_c = min(MAX_BLOCK_C, 1 << max(0, channels - 1).bit_length())
    block_p = max(16, TILE_ELEMENTS // block_c)
    block_p = min(block_p, max(16, 1 << max(0, positions - 1).bit_length()))
    return block_p, block_c


if triton is not None:

    @triton.jit
    def _tile(positions, channels, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's tile of a (N, positions, channels) tensor: image n, tile blk, the
        channels c (valid where c_ok), the elements' offsets and the mask of valid ones."""
        n = tl.program_id(0)
        blk = tl.program_id(1)
        p = blk * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        mask = (p[:, None] < positions) & c_ok[None, :]
        offs = n.to(tl.int64) * positions * channels + p[:, None].to(tl.int64) * channels
        return n, blk, c, c_ok, offs + c[None, :], mask


@functools.cache
def _kernels() -> Any:
    """The three kernels, defined on first use (no JIT work at import). Whether they run
    compiled or in Triton's interpreter is fixed when triton is imported (`TRITON_INTERPRET`;
    tests/conftest.py sets it where there is no GPU)."""
    if triton is None:
        raise RuntimeError("the Triton GroupNorm kernels need the triton package")

    @triton.jit
    def _group_norm_tile_stats(
        x_ptr,
        mean_ptr,
        m2_ptr,
        positions,
        channels,
        n_blocks,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        n, blk, c, c_ok, offs, mask = _tile(positions, channels, BLOCK_P, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        count = tl.minimum(positions - blk * BLOCK_P, BLOCK_P).to(tl.float32)
        mean = tl.sum(x, axis=0) / count
        dev = tl.where(mask, x - mean[None, :], 0.0)
        m2 = tl.sum(dev * dev, axis=0)
        out = (n.to(tl.int64) * n_blocks + blk) * channels + c
        tl.store(mean_ptr + out, mean, mask=c_ok)
        tl.store(m2_ptr + out, m2, mask=c_ok)

    @triton.jit
    def _group_norm_combine(
        mean_ptr,
        m2_ptr,
        weight_ptr,
        bias_ptr,
        scale_ptr,
        shift_ptr,
        positions,
        channels,
        n_blocks,
        groups,
        eps,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        # one program per (n, group): the tiles' partial statistics of the group's channels,
        # combined exactly (Chan), then one scale and one shift per channel of the group
        n = tl.program_id(0)
        g = tl.program_id(1)
        per = channels // groups
        j = tl.arange(0, BLOCK_G)
        j_ok = j < per
        c = g * per + j
        row = n.to(tl.int64) * n_blocks
        total = (positions * per).to(tl.float32)
        acc = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.float32)
        for t0 in range(0, n_blocks, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = (t[:, None] < n_blocks) & j_ok[None, :]
            cnt = tl.minimum(positions - t * BLOCK_P, BLOCK_P).to(tl.float32)
            m = tl.load(mean_ptr + (row + t[:, None]) * channels + c[None, :], mask=ok, other=0.0)
            acc += tl.where(ok, m * cnt[:, None], 0.0)
        g_mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
        acc = tl.zeros((BLOCK_T, BLOCK_G), dtype=tl.float32)
        for t0 in range(0, n_blocks, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = (t[:, None] < n_blocks) & j_ok[None, :]
            cnt = tl.minimum(positions - t * BLOCK_P, BLOCK_P).to(tl.float32)
            offs = (row + t[:, None]) * channels + c[None, :]
            m = tl.load(mean_ptr + offs, mask=ok, other=0.0)
            q = tl.load(m2_ptr + offs, mask=ok, other=0.0)
            d = m - g_mean
            acc += tl.where(ok, q + d * d * cnt[:, None], 0.0)
        var = tl.sum(tl.sum(acc, axis=1), axis=0) / total
        scale = tl.zeros((BLOCK_G,), dtype=tl.float32) + 1.0 / tl.sqrt(var + eps)
        if HAS_WEIGHT:
            scale = scale * tl.load(weight_ptr + c, mask=j_ok, other=0.0).to(tl.float32)
        shift = -g_mean * scale
        if HAS_BIAS:
            shift = shift + tl.load(bias_ptr + c, mask=j_ok, other=0.0).to(tl.float32)
        tl.store(scale_ptr + n * channels + c, scale, mask=j_ok)
        tl.store(shift_ptr + n * channels + c, shift, mask=j_ok)

    @triton.jit
    def _group_norm_apply(
        x_ptr,
        scale_ptr,
        shift_ptr,
        y_ptr,
        positions,
        channels,
        SILU: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        n, _, c, c_ok, offs, mask = _tile(positions, channels, BLOCK_P, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(scale_ptr + n * channels + c, mask=c_ok, other=0.0)
        b = tl.load(shift_ptr + n * channels + c, mask=c_ok, other=0.0)
        y = x * a[None, :] + b[None, :]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    return SimpleNamespace(
        tile_stats=_group_norm_tile_stats, combine=_group_norm_combine, apply=_group_norm_apply
    )


def _kernels_apply(x: torch.Tensor) -> bool:
    """The Triton path runs for a channels-last 4-D tensor on a device Triton drives (CUDA;
    or any device under the interpreter)."""
    if triton is None or x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def group_norm_nhwc(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool = False,
) -> torch.Tensor:
    """GroupNorm of a channels-last (N, C, H, W) tensor with the Triton kernels (then SiLU if
    `silu`); the result is channels-last in x's dtype."""
    if not _kernels_apply(x):
        raise ValueError("group_norm_nhwc needs a channels-last 4-D tensor on a Triton device")
    n, c, h, w = x.shape
    if c % groups:
        raise ValueError(f"{c} channels do not split into {groups} groups")
    positions = h * w
    block_p, block_c = tile_shape(c, positions)
    tiles = -(-positions // block_p)
    grid = (n, tiles, -(-c // block_c))
    mean = torch.empty((n, tiles, c), dtype=torch.float32, device=x.device)
    m2 = torch.empty_like(mean)
    k = _kernels()
    k.tile_stats[grid](
        x, mean, m2, positions, c, tiles, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=NUM_WARPS
    )
    scale = torch.empty((n, c), dtype=torch.float32, device=x.device)
    shift = torch.empty_like(scale)
    per = c // groups
    block_g = 1 << max(0, per - 1).bit_length()
    block_t = max(1, min(1 << max(0, tiles - 1).bit_length(), GROUP_CHUNK_ELEMENTS // block_g))
    k.combine[(n, groups)](
        mean,
        m2,
        weight if weight is not None else scale,  # a placeholder pointer, never read
        bias if bias is not None else scale,
        scale,
        shift,
        positions,
        c,
        tiles,
        groups,
        eps,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_P=block_p,
        BLOCK_T=block_t,
        BLOCK_G=block_g,
    )
    y = torch.empty_like(x, memory_format=torch.channels_last)
    k.apply[grid](
        x,
        scale,
        shift,
        y,
        positions,
        c,
        SILU=silu,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=NUM_WARPS,
    )
    return y


def group_norm_reference(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool = False,
) -> torch.Tensor:
    """The same result with torch ops (float32 statistics): the path off Triton devices."""
    y = nn.functional.group_norm(x.float(), groups, None, None, eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.float().view(shape)
    if bias is not None:
        y = y + bias.float().view(shape)
    if silu:
        y = nn.functional.silu(y)
    return y.to(x.dtype)


class TritonGroupNorm(nn.Module):
    """`nn.GroupNorm` (then SiLU when `silu`) with the Triton kernels for channels-last 4-D
    input on a Triton device, torch ops otherwise. Shares the norm's parameters."""

    def __init__(self, norm: nn.GroupNorm, silu: bool = False) -> None:
        super().__init__()
        self.num_groups = norm.num_groups
        self.num_channels = norm.num_channels
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected (N, {self.num_channels}, ...), got shape {tuple(x.shape)}")
        args = (x, self.num_groups, self.weight, self.bias, self.eps, self.silu)
        if _kernels_apply(x):
            return _group_norm_op(*args)
        return group_norm_reference(*args)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, silu={self.silu}"


def _group_norm_op(*args: Any) -> torch.Tensor:
    """The kernels as one opaque op for torch.compile (inductor does not trace into them)."""
    return torch.ops.lipstream.group_norm_nhwc(*args)


# inductor hands a custom op its inputs with the strides eager had (channels-last here) by
# default since torch 2.4; should it not, the op makes a channels-last copy rather than fail
@torch.library.custom_op("lipstream::group_norm_nhwc", mutates_args=())
def _group_norm_custom(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
) -> torch.Tensor:
    if not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return group_norm_nhwc(x, groups, weight, bias, eps, silu)


@_group_norm_custom.register_fake
def _group_norm_fake(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)


class _SiLUOnVectors(nn.Module):
    """A resnet block's `nonlinearity` once its norms carry the SiLU themselves: still SiLU
    for the time embedding (2-D), the identity for the feature maps that already had it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(x) if x.dim() == 2 else x


def swap_norm_silu_pairs(module: nn.Module) -> int:
    """Swap the GroupNorms inside a diffusers VAE decoder or UNet that a SiLU follows for
    `TritonGroupNorm(silu=True)` (in place), the SiLU moving into the norm: `norm1` and
    `norm2` of resnet blocks (unless their time embedding modulates between norm2 and the
    SiLU, "scale_shift"), whose `nonlinearity` then only acts on the time embedding (or
    becomes an identity without one), and the output norm (`conv_norm_out`, whose `conv_act`
    becomes an identity). Other norms (attention and transformer inputs) are left as they
    are. Returns how many norms were swapped."""
    if triton is None:
        raise RuntimeError("the Triton GroupNorm kernels need the triton package")
    count = 0
    for block in list(module.modules()):
        fuse = (
            type(getattr(block, "norm1", None)) is nn.GroupNorm
            and type(getattr(block, "norm2", None)) is nn.GroupNorm
            and type(getattr(block, "nonlinearity", None)) is nn.SiLU
            # "scale_shift" puts a modulation between norm2 and the SiLU; "default" (UNet,
            # VAE mid block) and "group" (VAE up blocks) do not
            and getattr(block, "time_embedding_norm", "default") != "scale_shift"
        )
        if fuse:
            for name in ("norm1", "norm2"):
                setattr(block, name, TritonGroupNorm(getattr(block, name), silu=True))
            has_temb = getattr(block, "time_emb_proj", None) is not None
            block.nonlinearity = _SiLUOnVectors() if has_temb else nn.Identity()
            count += 2
    out_norm = getattr(module, "conv_norm_out", None)
    if type(out_norm) is nn.GroupNorm and type(getattr(module, "conv_act", None)) is nn.SiLU:
        module.conv_norm_out = TritonGroupNorm(out_norm, silu=True)
        module.conv_act = nn.Identity()
        count += 1
    log.info("swapped %d group norms (+ SiLU) for the Triton kernels", count)
    return count
