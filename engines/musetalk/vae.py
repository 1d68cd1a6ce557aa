"""VAE encode of avatar face crops and decode of generated faces, as MuseTalk v1.5 does.

MuseTalk (`musetalk/models/vae.py`) works on BGR frames and flips to RGB before the VAE and
back after; lipstream works in RGB throughout, so no flips appear here.

Encode (`get_latents_for_unet`): crop pixels / 255 -> the LOWER half (rows 128..255) set to 0
(MuseTalk's mask keeps rows [0, 128)) -> normalised (x - 0.5) / 0.5, so masked pixels are -1;
the full crop is normalised the same way; latent = scaling_factor (0.18215) x the VAE
posterior; UNet input = cat([masked latent, full latent], dim=1) -> (8, 32, 32). MuseTalk
draws a sample from the posterior; we take its mode (the mean), so latents are deterministic.

Decode (`decode_latents`): (1 / 0.18215) x latents -> VAE decode -> (x / 2 + 0.5).clamp(0, 1)
in the VAE's dtype -> float32 -> x 255 -> round (half to even, numpy's .round()) -> uint8.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engines.musetalk.weights import VAE_SCALING_FACTOR

CROP = 256
HALF = CROP // 2


def crops_to_tensor(crops: np.ndarray, half_mask: bool) -> torch.Tensor:
    """(n, 256, 256, 3) uint8 RGB -> (n, 3, 256, 256) float32 in [-1, 1] (MuseTalk's
    preprocess_img: /255 in float64, to float32, mask, Normalize(0.5, 0.5))."""
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[1:] != (CROP, CROP, 3) or crops.dtype != np.uint8:
        raise ValueError(
            f"expected (n, {CROP}, {CROP}, 3) uint8 crops, got {crops.shape} {crops.dtype}"
        )
    x = torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2)) / 255.0).float()
    if half_mask:
        x[:, :, HALF:, :] = 0.0
    return (x - 0.5) / 0.5


@torch.no_grad()
def encode_crops(vae: Any, crops: np.ndarray, batch_size: int = 16) -> torch.Tensor:
    """Face crops (n, 256, 256, 3) uint8 RGB -> UNet input latents (n, 8, 32, 32) float32 on
    the VAE's device: cat([latent(crop, lower half zeroed), latent(crop)], dim=1)."""
    param = next(vae.parameters())
    out = []
    for start in range(0, len(crops), batch_size):
        part = crops[start : start + batch_size]
        masked = crops_to_tensor(part, half_mask=True)
        full = crops_to_tensor(part, half_mask=False)
        both = torch.cat([masked, full], dim=0).to(device=param.device, dtype=param.dtype)
        mode = vae.encode(both).latent_dist.mode()
        lat = (VAE_SCALING_FACTOR * mode).float()
        n = part.shape[0]
        out.append(torch.cat([lat[:n], lat[n:]], dim=1))
    if not out:
        return torch.zeros((0, 8, CROP // 8, CROP // 8), device=param.device)
    return torch.cat(out, dim=0)


@torch.no_grad()
def decode_latents_torch(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Predicted latents (n, 4, 32, 32) -> faces (n, 256, 256, 3) uint8 RGB on the VAE's device."""
    param = next(vae.parameters())
    z = (1 / VAE_SCALING_FACTOR) * latents.to(device=param.device, dtype=param.dtype)
    image = vae.decode(z).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    image = image.permute(0, 2, 3, 1).float()
    return (image * 255).round().to(torch.uint8)


def decode_latents(vae: Any, latents: torch.Tensor) -> np.ndarray:
    """Predicted latents (n, 4, 32, 32) -> faces (n, 256, 256, 3) uint8 RGB numpy (MuseTalk's
    decode_latents, which returns BGR for its BGR frames; ours stay RGB)."""
    return decode_latents_torch(vae, latents).cpu().numpy()
