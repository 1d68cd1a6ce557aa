"""One MuseTalk UNet step: masked+reference latents and audio features in, face latents out.

MuseTalk (`musetalk/models/unet.py`, `scripts/inference.py`): the audio features (n, 50, 384)
get a standard sinusoidal positional encoding added along the 50-token axis (d_model 384,
sin on even dims, cos on odd, frequencies 10000^(-2k/384)), computed in float32 and cast to
the model dtype before the add; then the UNet runs once at timestep 0 with them as
`encoder_hidden_states`. Its output is the generated face latent (n, 4, 32, 32).
"""

from __future__ import annotations

import math
from typing import Any

import torch

D_MODEL = 384


def positional_encoding(length: int, d_model: int = D_MODEL) -> torch.Tensor:
    """(length, d_model) float32: pe[p, 2k] = sin(p w_k), pe[p, 2k+1] = cos(p w_k),
    w_k = exp(-2k ln(10000) / d_model), as MuseTalk's PositionalEncoding."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )
    pe = torch.zeros(length, d_model, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


class PositionalEncoding(torch.nn.Module):
    """Adds `positional_encoding` to (batch, tokens, d_model) input."""

    def __init__(self, d_model: int = D_MODEL, max_len: int = 64) -> None:
        super().__init__()
        self.register_buffer("pe", positional_encoding(max_len, d_model), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pe: torch.Tensor = self.pe  # type: ignore[assignment]
        return x + pe[: x.shape[1]].to(device=x.device, dtype=x.dtype)


_PE_CACHE: dict[tuple[torch.device, torch.dtype, int, int], torch.Tensor] = {}


def add_positional_encoding(audio_feats: torch.Tensor) -> torch.Tensor:
    """audio_feats (n, tokens, d) + the positional encoding, in audio_feats' dtype."""
    _, tokens, d = audio_feats.shape
    key = (audio_feats.device, audio_feats.dtype, tokens, d)
    pe = _PE_CACHE.get(key)
    if pe is None:
        pe = positional_encoding(tokens, d).to(device=audio_feats.device, dtype=audio_feats.dtype)
        _PE_CACHE[key] = pe
    return audio_feats + pe


@torch.no_grad()
def unet_forward(unet: Any, latents: torch.Tensor, audio_feats: torch.Tensor) -> torch.Tensor:
    """latents (n, 8, 32, 32), audio_feats (n, 50, 384) without positional encoding ->
    predicted latents (n, 4, 32, 32), in the UNet's dtype."""
    if latents.shape[0] != audio_feats.shape[0]:
        raise ValueError(
            f"batch mismatch: {latents.shape[0]} latents, {audio_feats.shape[0]} features"
        )
    dtype = unet.dtype
    cond = add_positional_encoding(audio_feats.to(device=latents.device, dtype=dtype))
    timesteps = torch.zeros(1, dtype=torch.long, device=latents.device)
    return unet(latents.to(dtype), timesteps, encoder_hidden_states=cond).sample
