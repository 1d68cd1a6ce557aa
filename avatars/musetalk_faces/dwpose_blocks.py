"""The layers of DWPose's RTMPose-l whole-body model: a CSPNeXt backbone and an RTMCC head.

Module and parameter names follow the published checkpoint (`dw-ll_ucoco_384.pth`, an mmpose
model: mmdet's CSPNeXt with mmcv ConvModules, mmpose's RTMCCHead with its gated attention unit),
so its state dict loads strictly. Everything here is plain torch; `dwpose.py` builds the whole
model, crops frames and decodes the keypoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> SiLU: the checkpoint names them `conv` and `bn`."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        # The published config sets norm_cfg=dict(type="SyncBN"): BatchNorm's default eps.
        self.bn = nn.BatchNorm2d(cout, eps=1e-5)
        self.act: nn.Module = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    """A depthwise conv then a 1x1 pointwise conv, each with BN and SiLU."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvBN(cin, cin, kernel, groups=cin)
        self.pointwise_conv = ConvBN(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class CSPNeXtBlock(nn.Module):
    """3x3 conv, then a 5x5 depthwise-separable conv; a residual add where asked."""

    def __init__(self, channels: int, add_identity: bool) -> None:
        super().__init__()
        self.conv1 = ConvBN(channels, channels, 3)
        self.conv2 = DepthwiseSeparable(channels, channels, 5)
        self.add_identity = add_identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class ChannelAttention(nn.Module):
    """Global average pool -> 1x1 conv (with bias) -> hard sigmoid, multiplied back in."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = F.hardsigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))
        return x * weights


class CSPLayer(nn.Module):
    """Cross-stage partial layer: a main branch of blocks beside a 1x1 shortcut, concatenated."""

    def __init__(self, channels: int, num_blocks: int, add_identity: bool) -> None:
        super().__init__()
        mid = channels // 2
        self.main_conv = ConvBN(channels, mid, 1)
        self.short_conv = ConvBN(channels, mid, 1)
        self.final_conv = ConvBN(2 * mid, channels, 1)
        self.blocks = nn.Sequential(*[CSPNeXtBlock(mid, add_identity) for _ in range(num_blocks)])
        self.attention = ChannelAttention(2 * mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.blocks(self.main_conv(x))
        both = torch.cat((main, self.short_conv(x)), dim=1)
        return self.final_conv(self.attention(both))


class SPPBottleneck(nn.Module):
    """1x1 conv to half width, max pools of 5, 9 and 13 concatenated, 1x1 conv back."""

    KERNELS = (5, 9, 13)

    def __init__(self, channels: int) -> None:
        super().__init__()
        mid = channels // 2
        self.conv1 = ConvBN(channels, mid, 1)
        self.conv2 = ConvBN(mid * (len(self.KERNELS) + 1), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        pooled = [F.max_pool2d(x, k, stride=1, padding=k // 2) for k in self.KERNELS]
        return self.conv2(torch.cat([x, *pooled], dim=1))


# (in, out, blocks, residual, spp) per stage of the P5 architecture at widen/deepen 1.0.
P5_STAGES: tuple[tuple[int, int, int, bool, bool], ...] = (
    (64, 128, 3, True, False),
    (128, 256, 6, True, False),
    (256, 512, 6, True, False),
    (512, 1024, 3, False, True),
)


class CSPNeXt(nn.Module):
    """CSPNeXt P5 backbone; returns the last stage's feature map (stride 32)."""

    def __init__(self, widen: float = 1.0, deepen: float = 1.0) -> None:
        super().__init__()
        first = int(P5_STAGES[0][0] * widen)
        self.stem = nn.Sequential(
            ConvBN(3, first // 2, 3, stride=2),
            ConvBN(first // 2, first // 2, 3),
            ConvBN(first // 2, first, 3),
        )
        for i, (cin, cout, blocks, residual, spp) in enumerate(P5_STAGES):
            cin, cout = int(cin * widen), int(cout * widen)
            layers: list[nn.Module] = [ConvBN(cin, cout, 3, stride=2)]
            if spp:
                layers.append(SPPBottleneck(cout))
            layers.append(CSPLayer(cout, max(round(blocks * deepen), 1), residual))
            self.add_module(f"stage{i + 1}", nn.Sequential(*layers))
        self.out_channels = int(P5_STAGES[-1][1] * widen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(len(P5_STAGES)):
            x = getattr(self, f"stage{i + 1}")(x)
        return x


class ScaleNorm(nn.Module):
    """x / max(||x|| / sqrt(dim), eps) * g, with one learned scalar `g`."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class Scale(nn.Module):
    """Element-wise learned scale (the residual branch of the attention unit)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class GatedAttentionUnit(nn.Module):
    """RTMCC's self-attention GAU over keypoint tokens (no relative bias, no rotary encoding)."""

    def __init__(self, dims: int, s: int = 128, expansion: int = 2) -> None:
        super().__init__()
        self.s = s
        self.e = dims * expansion
        self.ln = ScaleNorm(dims)
        self.uv = nn.Linear(dims, 2 * self.e + s, bias=False)
        self.gamma = nn.Parameter(torch.rand(2, s))
        self.beta = nn.Parameter(torch.rand(2, s))
        self.o = nn.Linear(self.e, dims, bias=False)
        self.res_scale = Scale(dims)
        self.sqrt_s = math.sqrt(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        uv = F.silu(self.uv(self.ln(x)))
        u, v, base = torch.split(uv, [self.e, self.e, self.s], dim=2)
        qk_base = base.unsqueeze(2) * self.gamma[None, None] + self.beta
        q, k = torch.unbind(qk_base, dim=2)
        kernel = torch.square(F.relu(torch.bmm(q, k.transpose(1, 2)) / self.sqrt_s))
        return self.res_scale(x) + self.o(u * torch.bmm(kernel, v))


class RTMCCHead(nn.Module):
    """7x7 conv to one map per keypoint, flatten, MLP, GAU, then SimCC x and y classifiers."""

    def __init__(
        self,
        in_channels: int,
        keypoints: int,
        input_size: tuple[int, int],
        feature_size: tuple[int, int],
        split_ratio: float,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        self.final_layer = nn.Conv2d(in_channels, keypoints, 7, padding=3)
        flat = feature_size[0] * feature_size[1]
        self.mlp = nn.Sequential(ScaleNorm(flat), nn.Linear(flat, hidden, bias=False))
        self.gau = GatedAttentionUnit(hidden)
        self.cls_x = nn.Linear(hidden, int(input_size[0] * split_ratio), bias=False)
        self.cls_y = nn.Linear(hidden, int(input_size[1] * split_ratio), bias=False)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.gau(self.mlp(torch.flatten(self.final_layer(feats), 2)))
        return self.cls_x(tokens), self.cls_y(tokens)
