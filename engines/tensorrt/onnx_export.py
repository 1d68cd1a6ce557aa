"""ONNX export of the three networks the GPU runs per frame, with a dynamic batch axis:

    whisper encoder  mel (B, 80, 2*steps)            -> hidden (B, steps, 5, 384)
    UNet (t = 0)     latents (B, 8, 32, 32), cond (B, 50, 384) -> pred (B, 4, 32, 32)
    VAE decoder      latents (B, 4, H/8, W/8) (already / 0.18215) -> image (B, 3, H, W)

`cond` is the audio features with MuseTalk's positional encoding already added (the PE and
the scaling stay in torch, outside the graphs). These graphs feed TensorRT
(`engines.tensorrt.engine`); on machines without TensorRT they are checked with onnxruntime.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

OPSET = 17


class UNetGraph(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("timestep", torch.zeros(1, dtype=torch.long), persistent=False)

    def forward(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(latents, self.timestep, encoder_hidden_states=cond).sample


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


class WhisperEncoderGraph(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(mel, output_hidden_states=True).hidden_states
        return torch.stack(hidden, dim=2)


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    opset: int,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {name: {0: "batch"} for name in (*inputs, *outputs)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    log.info("exported onnx: path=%s bytes=%d", path, path.stat().st_size)
    return path


def _like(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def export_unet(unet: nn.Module, path: str | Path, batch: int = 2, opset: int = OPSET) -> Path:
    dev, dt = _like(unet)
    cfg: Any = unet.config
    size = int(cfg.sample_size) if int(cfg.sample_size) <= 32 else 32
    args = (
        torch.randn((batch, int(cfg.in_channels), size, size), device=dev, dtype=dt),
        torch.randn((batch, 50, int(cfg.cross_attention_dim)), device=dev, dtype=dt),
    )
    return _export(UNetGraph(unet), args, Path(path), ["latents", "cond"], ["pred"], opset)


def export_vae_decoder(
    vae: Any,
    path: str | Path,
    batch: int = 2,
    latent_hw: tuple[int, int] = (32, 32),
    opset: int = OPSET,
) -> Path:
    dev, dt = _like(vae)
    args = (
        torch.randn((batch, int(vae.config.latent_channels), *latent_hw), device=dev, dtype=dt),
    )
    return _export(VaeDecoderGraph(vae), args, Path(path), ["latents"], ["image"], opset)


def export_whisper_encoder(
    encoder: nn.Module, path: str | Path, batch: int = 2, opset: int = OPSET
) -> Path:
    dev, dt = _like(encoder)
    cfg: Any = encoder.config
    args = (
        torch.randn(
            (batch, int(cfg.num_mel_bins), 2 * int(cfg.max_source_positions)), device=dev, dtype=dt
        ),
    )
    return _export(WhisperEncoderGraph(encoder), args, Path(path), ["mel"], ["hidden"], opset)


def export_all(
    unet: nn.Module, vae: Any, encoder: nn.Module, folder: str | Path
) -> dict[str, Path]:
    """The three graphs into `folder` (unet.onnx, vae_decoder.onnx, whisper_encoder.onnx)."""
    root = Path(folder)
    return {
        "unet": export_unet(unet, root / "unet.onnx"),
        "vae_decoder": export_vae_decoder(vae, root / "vae_decoder.onnx"),
        "whisper_encoder": export_whisper_encoder(encoder, root / "whisper_encoder.onnx"),
    }
