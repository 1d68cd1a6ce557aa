"""ONNX export (CPU): onnxruntime runs each exported graph at batch sizes other than the
export's, and matches torch on the tiny config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def tiny_models(tiny_models_dir: Path):  # type: ignore[no-untyped-def]
    from engines.musetalk.weights import load_unet, load_vae, load_whisper

    unet = load_unet(tiny_models_dir, "cpu", torch.float32)
    vae = load_vae(tiny_models_dir, "cpu", torch.float32)
    encoder, _ = load_whisper(tiny_models_dir, "cpu", torch.float32)
    return unet, vae, encoder


def _run(path: Path, **inputs: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def _close(got: np.ndarray, want: torch.Tensor) -> None:
    want_np = want.numpy()
    assert got.shape == want_np.shape
    err = np.abs(got - want_np).max() / (np.abs(want_np).max() + 1e-6)
    assert err < 1e-3, f"relative max error {err}"


def test_unet_onnx_matches_torch(tiny_models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from engines.tensorrt.onnx_export import UNetGraph, export_unet

    unet, _, _ = tiny_models
    path = export_unet(unet, tmp_path / "unet.onnx", batch=2)
    for b in (1, 3):
        lat, cond = torch.randn(b, 8, 32, 32), torch.randn(b, 50, 384)
        with torch.no_grad():
            want = UNetGraph(unet)(lat, cond)
        _close(_run(path, latents=lat, cond=cond), want)


def test_vae_decoder_onnx_matches_torch(tiny_models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from engines.tensorrt.onnx_export import VaeDecoderGraph, export_vae_decoder

    _, vae, _ = tiny_models
    path = export_vae_decoder(vae, tmp_path / "vae.onnx", batch=2)
    z = torch.randn(3, 4, 32, 32)
    with torch.no_grad():
        want = VaeDecoderGraph(vae)(z)
    assert want.shape == (3, 3, 256, 256)
    _close(_run(path, latents=z), want)


def test_whisper_encoder_onnx_matches_torch(tiny_models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from engines.tensorrt.onnx_export import WhisperEncoderGraph, export_whisper_encoder

    _, _, encoder = tiny_models
    path = export_whisper_encoder(encoder, tmp_path / "enc.onnx", batch=2)
    steps = int(encoder.config.max_source_positions)
    mel = torch.randn(1, 80, 2 * steps)
    with torch.no_grad():
        want = WhisperEncoderGraph(encoder)(mel)
    assert want.shape == (1, steps, 5, 384)
    _close(_run(path, mel=mel), want)
