"""BiSeNet face parsing on ResNet-18, the network behind MuseTalk v1.5's jaw-mode blend mask.

The model of zllrunning/face-parsing.PyTorch as MuseTalk ships it (`musetalk/utils/face_parsing/`):
a ResNet-18 context path (features at 1/8, 1/16, 1/32), attention refinement modules on the
1/16 and 1/32 features plus a global-average branch, a feature fusion module joining the 1/8
ResNet features (standing in for the spatial path, which this model drops) with the refined
context, and three heads (the main one and two auxiliary ones) giving 19 classes, upsampled
bilinearly (align_corners=True) to the input size.

Parameter names and shapes are those of `79999_iter.pth`, so it loads with
`load_state_dict(strict=True)`; the ResNet-18 backbone's names are torchvision's, so
`resnet18-5c106cde.pth` loads into `BiSeNet().cp.resnet` (its `fc.*` classifier dropped), as
MuseTalk does before `79999_iter.pth` overwrites every weight.

`parse_faces` is MuseTalk's `FaceParsing.__call__` up to the class map: the RGB crop resized
to 512x512 with PIL's bilinear filter, scaled to [0, 1], normalised with ImageNet's mean and
std, the main head's argmax.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

logger = logging.getLogger(__name__)

N_CLASSES = 19
INPUT_SIZE = 512
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
WIDTHS = {"full": 64, "tiny": 8}  # ResNet-18's stem width; every other width follows from it


class ConvBNReLU(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU, parameters named `conv.*` and `bn.*`."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=pad, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet's basic block (two 3x3 convs) with a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Sequential | None = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _layer(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))


class ResNet18(nn.Module):
    """ResNet-18 without its classifier: returns the 1/8, 1/16 and 1/32 feature maps."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _layer(w, w, 1)
        self.layer2 = _layer(w, 2 * w, 2)
        self.layer3 = _layer(2 * w, 4 * w, 2)
        self.layer4 = _layer(4 * w, 8 * w, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


def _global_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, x.shape[2:])


class AttentionRefinement(nn.Module):
    """ConvBNReLU, then a channel attention from the global average (1x1 conv, BN, sigmoid)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(_global_pool(feat))))


class ContextPath(nn.Module):
    """ResNet-18 plus attention refinement on 1/32 and 1/16 with a global context branch;
    returns (ResNet 1/8 features, refined context at 1/8, refined context at 1/16)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        w = width
        self.resnet = ResNet18(w)
        self.arm16 = AttentionRefinement(4 * w, 2 * w)
        self.arm32 = AttentionRefinement(8 * w, 2 * w)
        self.conv_head32 = ConvBNReLU(2 * w, 2 * w)
        self.conv_head16 = ConvBNReLU(2 * w, 2 * w)
        self.conv_avg = ConvBNReLU(8 * w, 2 * w, k=1, pad=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = F.interpolate(self.conv_avg(_global_pool(feat32)), feat32.shape[2:], mode="nearest")
        up32 = F.interpolate(self.arm32(feat32) + avg, feat16.shape[2:], mode="nearest")
        up32 = self.conv_head32(up32)
        up16 = F.interpolate(self.arm16(feat16) + up32, feat8.shape[2:], mode="nearest")
        return feat8, self.conv_head16(up16), up32


class FeatureFusion(nn.Module):
    """Concatenate, ConvBNReLU 1x1, then add a squeeze-excitation-weighted copy of itself."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, k=1, pad=0)
        self.conv1 = nn.Conv2d(cout, cout // 4, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, kernel_size=1, bias=False)

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(_global_pool(feat)))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    """ConvBNReLU 3x3 then a 1x1 classifier (no bias)."""

    def __init__(self, cin: int, mid: int, n_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, n_classes, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet face parsing; `width` 64 is the published model, smaller widths are test
    stand-ins. `forward` returns (main, aux16, aux32) logits at the input size."""

    def __init__(self, width: int = 64, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        w = width
        self.cp = ContextPath(w)
        self.ffm = FeatureFusion(4 * w, 4 * w)
        self.conv_out = BiSeNetOutput(4 * w, 4 * w, n_classes)
        self.conv_out16 = BiSeNetOutput(2 * w, w, n_classes)
        self.conv_out32 = BiSeNetOutput(2 * w, w, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = x.shape[2:]
        feat8, cp8, cp16 = self.cp(x)
        outs = (
            self.conv_out(self.ffm(feat8, cp8)),
            self.conv_out16(cp8),
            self.conv_out32(cp16),
        )
        up = [F.interpolate(o, size, mode="bilinear", align_corners=True) for o in outs]
        return up[0], up[1], up[2]


def build_bisenet(size: str = "full") -> BiSeNet:
    """A BiSeNet with random weights: `full` has the published shapes, `tiny` (width 8) is for
    fast CPU tests. Load real weights with `load_state_dict(..., strict=True)`."""
    if size not in WIDTHS:
        raise ValueError(f"BiSeNet size must be 'full' or 'tiny', got {size!r}")
    return BiSeNet(WIDTHS[size])


def resnet18_file_state(backbone: ResNet18, n_classes: int = 1000) -> dict[str, torch.Tensor]:
    """The state dict of a torchvision-style ResNet-18 file for `backbone`: its weights plus a
    random `fc` classifier, without `num_batches_tracked` (as `resnet18-5c106cde.pth`)."""
    state = {k: v for k, v in backbone.state_dict().items() if "num_batches_tracked" not in k}
    fc = nn.Linear(backbone.bn1.num_features * 8, n_classes)  # layer4's width
    state["fc.weight"], state["fc.bias"] = fc.weight.detach(), fc.bias.detach()
    return state


def load_resnet18(backbone: ResNet18, state: Mapping[str, torch.Tensor]) -> None:
    """Load a torchvision ResNet-18 file's weights into `backbone`, strictly apart from the
    `fc.*` classifier, which the context path has no use for."""
    backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})


def load_bisenet(
    path: str | Path, size: str = "full", device: str | torch.device = "cpu"
) -> BiSeNet:
    """`build_bisenet(size)` with `79999_iter.pth` loaded strictly (tensors only), in eval mode."""
    model = build_bisenet(size)
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


def preprocess(crop: np.ndarray) -> torch.Tensor:
    """One RGB crop (h, w, 3) uint8 -> (3, 512, 512) float32 as MuseTalk's FaceParsing makes it:
    PIL bilinear resize, ToTensor's /255, then ImageNet normalisation."""
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
        raise ValueError(f"crops must be (h, w, 3) uint8 RGB, got {crop.shape} {crop.dtype}")
    img = Image.fromarray(crop).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return x.sub(mean).div(std)


@torch.no_grad()
def parse_faces(
    model: BiSeNet,
    crops: list[np.ndarray],
    device: str | torch.device = "cpu",
    batch: int = 16,
) -> np.ndarray:
    """Class maps (N, 512, 512) uint8 (19 classes: 1 skin, 10 nose, 11-13 mouth and lips, ...)
    of RGB crops of any sizes, as MuseTalk's `FaceParsing` computes before its mode masks."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    out = np.zeros((len(crops), INPUT_SIZE, INPUT_SIZE), np.uint8)
    dtype = next(model.parameters()).dtype
    for start in range(0, len(crops), batch):
        x = torch.stack([preprocess(c) for c in crops[start : start + batch]])
        logits = model(x.to(device=device, dtype=dtype))[0]
        labels = logits.float().argmax(1).to(torch.uint8).cpu().numpy()
        out[start : start + len(labels)] = labels
    return out
