"""MuseTalk engine: positional encoding, VAE half mask / concat order / mode, decode rounding,
and whole-frame renders on the tiny random weights with the astronaut avatar."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from avatars.avatar import Avatar
from engines.base import EngineError, FrameJob, ready_horizon
from engines.musetalk.engine import MuseTalkEngine, MuseTalkOptions
from engines.musetalk.unet_step import PositionalEncoding, positional_encoding, unet_forward
from engines.musetalk.vae import crops_to_tensor, decode_latents, encode_crops
from engines.musetalk.weights import load_vae
from engines.stream import SpeechStream

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def engine(tiny_models_dir: Path) -> MuseTalkEngine:
    return MuseTalkEngine(tiny_models_dir, device="cpu")


@pytest.fixture(scope="module")
def vae(tiny_models_dir: Path) -> Any:
    return load_vae(tiny_models_dir, "cpu", torch.float32)


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    from skimage.data import astronaut

    from avatars.boxes import face_crop

    img = astronaut()[..., :3]
    return np.stack(
        [face_crop(img, (177, 66, 272, 181)), face_crop(img[::-1].copy(), (177, 66, 272, 181))]
    )


# -- positional encoding -------------------------------------------------------------------
def test_positional_encoding_values() -> None:
    pe = positional_encoding(50, 384).double().numpy()
    p = np.arange(50)[:, None]
    k = np.arange(192)[None, :]
    angle = p / np.power(10000.0, 2 * k / 384)
    np.testing.assert_allclose(pe[:, 0::2], np.sin(angle), atol=2e-5)
    np.testing.assert_allclose(pe[:, 1::2], np.cos(angle), atol=2e-5)
    assert pe[0, 0] == 0 and pe[0, 1] == 1  # position 0: sin 0, cos 0
    x = torch.zeros(2, 50, 384)
    assert torch.equal(PositionalEncoding()(x)[1], positional_encoding(50))


def test_unet_gets_features_plus_positional_encoding_at_timestep_0(engine: MuseTalkEngine) -> None:
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 8, 32, 32, generator=g)
    feats = torch.randn(2, 50, 384, generator=g)
    seen: dict[str, Any] = {}
    unet = engine.unet
    hook = unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.update(t=args[1], cond=kwargs["encoder_hidden_states"]),
        with_kwargs=True,
    )
    try:
        out = unet_forward(unet, lat, feats)
    finally:
        hook.remove()
    assert torch.equal(seen["cond"], feats + positional_encoding(50))
    assert torch.equal(torch.as_tensor(seen["t"]), torch.tensor([0]))
    with torch.no_grad():
        ref = unet(lat, 0, encoder_hidden_states=feats + positional_encoding(50)).sample
    assert out.shape == (2, 4, 32, 32) and torch.equal(out, ref)


# -- VAE: half mask, concat order, mode, decode --------------------------------------------
def test_half_mask_zeroes_the_lower_rows(crops: np.ndarray) -> None:
    full = crops_to_tensor(crops, half_mask=False)
    masked = crops_to_tensor(crops, half_mask=True)
    assert full.shape == (2, 3, 256, 256)
    assert (masked[:, :, 128:, :] == -1).all()  # pixel 0 -> -1 after normalising
    assert torch.equal(masked[:, :, :128, :], full[:, :, :128, :])
    assert full.min() >= -1 and full.max() <= 1
    expected = torch.from_numpy(crops[0, 10, 20].astype(np.float32)) / 255 * 2 - 1
    torch.testing.assert_close(full[0, :, 10, 20], expected)  # RGB order kept


def test_latents_are_masked_then_full_from_the_mode(vae: Any, crops: np.ndarray) -> None:
    lat = encode_crops(vae, crops)
    assert lat.shape == (2, 8, 32, 32) and lat.dtype == torch.float32
    with torch.no_grad():
        dist_m = vae.encode(crops_to_tensor(crops, half_mask=True)).latent_dist
        dist_f = vae.encode(crops_to_tensor(crops, half_mask=False)).latent_dist
    torch.testing.assert_close(lat[:, :4], 0.18215 * dist_m.mode(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lat[:, 4:], 0.18215 * dist_f.mode(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lat[:, :4], lat[:, 4:], atol=1e-3)  # the mask mattered
    torch.manual_seed(0)
    assert not torch.allclose(lat[:, 4:], 0.18215 * dist_f.sample(), atol=1e-4)  # not a sample
    assert torch.equal(encode_crops(vae, crops), lat)  # deterministic


def test_decode_rounds_like_musetalk_and_stays_rgb(vae: Any) -> None:
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    faces = decode_latents(vae, z)
    assert faces.shape == (2, 256, 256, 3) and faces.dtype == np.uint8
    with torch.no_grad():
        img = vae.decode(z / 0.18215).sample
    x = ((img / 2 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy()
    assert np.abs(faces.astype(np.float64) - np.round(x)).max() <= 1  # 1/0.18215 vs divide
    frac = x - np.floor(x)
    upper = frac > 0.6  # there truncation and rounding disagree
    assert upper.any()
    assert (faces[upper] == np.floor(x[upper]) + 1).mean() > 0.99  # rounded, not truncated


# -- engine construction ------------------------------------------------------------------
def test_unavailable_backends_are_clear_errors(tiny_models_dir: Path) -> None:
    with pytest.raises(EngineError, match="backend tensorrt needs a CUDA GPU"):
        MuseTalkEngine(tiny_models_dir, backend="tensorrt")
    with pytest.raises(EngineError, match="backend compiled needs a CUDA GPU"):
        MuseTalkEngine(tiny_models_dir, backend="compiled")
    with pytest.raises(EngineError, match="unknown backend 'onnx'"):
        MuseTalkEngine(tiny_models_dir, backend="onnx")
    # the engine takes a backend already chosen: `auto` is resolved where engines are built
    with pytest.raises(EngineError, match="select_backend resolves auto"):
        MuseTalkEngine(tiny_models_dir, backend="auto")
    from engines.backends import create_engine

    engine, reason = create_engine("musetalk", tiny_models_dir, "cpu", "auto")
    assert getattr(engine, "backend", None) == "torch" and "torch" in reason  # auto on CPU
    with pytest.raises(EngineError, match="missing"):
        MuseTalkEngine(tiny_models_dir / "nope")
    assert MuseTalkOptions().torch_dtype == torch.float32


# -- rendering ------------------------------------------------------------------------------
def _avatar_without_latents(avatar: Avatar, no_face: int | None = None) -> Avatar:
    boxes, crops_ = avatar.face_boxes.copy(), avatar.crop_boxes.copy()
    masks = list(avatar.masks)
    if no_face is not None:
        boxes[no_face] = -1
        crops_[no_face] = -1
        masks[no_face] = np.zeros((0, 0), np.uint8)
    return dataclasses.replace(
        avatar,
        id=f"{avatar.id}-copy{no_face}",
        face_boxes=boxes,
        crop_boxes=crops_,
        masks=masks,
        latents=None,
        latents_key=None,
    )


def test_load_avatar_computes_latents_once(
    engine: MuseTalkEngine, astronaut_avatar: Avatar
) -> None:
    av = _avatar_without_latents(astronaut_avatar, no_face=1)
    engine.load_avatar(av)
    assert av.latents is not None and av.latents_key == engine.latents_key
    assert av.latents.shape == (3, 8, 32, 32)
    assert (av.latents[1] == 0).all() and (av.latents[0] != 0).any()
    assert astronaut_avatar.latents is not None
    np.testing.assert_allclose(av.latents[0], astronaut_avatar.latents[0], rtol=1e-5, atol=1e-5)
    before = av.latents
    engine.load_avatar(av)
    assert av.latents is before  # idempotent, nothing recomputed
    engine.unload_avatar(av.id)
    with pytest.raises(EngineError, match="not loaded"):
        engine.render(av.id, [0], engine.offline_features(np.zeros(640, np.float32)))


def test_render_pastes_the_face_and_keeps_the_rest(
    engine: MuseTalkEngine, astronaut_avatar: Avatar, speech_pcm: np.ndarray
) -> None:
    av = _avatar_without_latents(astronaut_avatar, no_face=1)
    engine.load_avatar(av)
    feats = engine.offline_features(speech_pcm[:16_000])
    assert feats.shape == (25, 50, 384)
    positions = [0, 1, 2, 3, 4, 5, 7, 12]  # loop: 0 1 2 2 1 0 ...
    engine.render(av.id, [0], feats[:1])  # warm-up
    t0 = time.perf_counter()
    out = engine.render(av.id, positions, feats[: len(positions)])
    per_frame = (time.perf_counter() - t0) / len(positions)
    log.warning("tiny musetalk render on CPU: %.3f s per frame", per_frame)
    assert out.shape == (8, *av.frames.shape[1:]) and out.dtype == np.uint8
    for j, p in enumerate(positions):
        f = av.loop_frame(p)
        if f == 1:  # no face: unchanged
            assert np.array_equal(out[j], av.frames[1])
            continue
        x1, y1, x2, y2 = av.crop_boxes[f]
        outside = np.ones(out[j].shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(out[j][outside], av.frames[f][outside])
        mask = av.masks[f] == 255
        assert (out[j][y1:y2, x1:x2][mask] != av.frames[f][y1:y2, x1:x2][mask]).any()
    # the same frames, batch by batch of 3, are the same pictures (within 1/255)
    small = MuseTalkEngine(engine.files.root, options=MuseTalkOptions(batch_size=3))
    small.load_avatar(av)
    out3 = small.render(av.id, positions, feats[: len(positions)])
    assert np.abs(out3.astype(int) - out.astype(int)).max() <= 1
    # different audio, different mouths
    assert not np.array_equal(out[0], engine.render(av.id, [0], feats[10:11])[0])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_streaming_frames_vs_offline_frames(
    engine: MuseTalkEngine, astronaut_avatar: Avatar, speech_pcm: np.ndarray
) -> None:
    """Streamed in 40 ms chunks: the final frames (horizon = the whole utterance, within one
    encoder window) equal offline ones exactly; the PSNR of the rest is reported."""
    audio = speech_pcm[:24_000]  # 1.5 s: within the tiny whisper's 2 s window
    engine.load_avatar(astronaut_avatar)
    offline_feats = engine.offline_features(audio)
    offline = engine.render(astronaut_avatar.id, list(range(len(offline_feats))), offline_feats)
    stream = SpeechStream()
    jobs: list[FrameJob] = []
    streamed = []
    for start in range(0, audio.size, 640):
        stream.push(audio[start : start + 640])
        new = stream.take()
        if new:
            streamed.append(
                engine.render(
                    astronaut_avatar.id,
                    [j.loop_position for j in new],
                    engine.stream_features(stream.audio, new),
                )
            )
            jobs += new
    stream.end()
    new = stream.take()
    streamed.append(
        engine.render(
            astronaut_avatar.id,
            [j.loop_position for j in new],
            engine.stream_features(stream.audio, new),
        )
    )
    jobs += new
    frames = np.concatenate(streamed)
    assert frames.shape == offline.shape
    exact = [j.index for j in jobs if j.horizon == audio.size]
    assert exact and all(ready_horizon(i) >= audio.size for i in exact)
    for i in exact:
        assert np.array_equal(frames[i], offline[i])
    psnr = [_psnr(frames[i], offline[i]) for i in range(len(frames)) if i not in exact]
    log.warning(
        "streaming vs offline frames (tiny random weights): PSNR mean %.1f dB, min %.1f dB "
        "over %d frames; %d final frames identical",
        np.mean(psnr),
        np.min(psnr),
        len(psnr),
        len(exact),
    )
    assert min(psnr) > 20


@pytest.mark.gpu
def test_cuda_fp16_render_is_close_to_cpu_fp32(
    engine: MuseTalkEngine, tiny_models_dir: Path, astronaut_avatar: Avatar, speech_pcm: np.ndarray
) -> None:
    gpu = MuseTalkEngine(tiny_models_dir, device="cuda")
    assert gpu.dtype == torch.float16 and next(gpu.unet.parameters()).is_cuda
    audio = speech_pcm[:16_000]
    feats_gpu = gpu.offline_features(audio)
    feats_cpu = engine.offline_features(audio)
    assert feats_gpu.dtype == torch.float16 and feats_gpu.is_cuda
    rel = (feats_gpu.float().cpu() - feats_cpu).norm() / feats_cpu.norm()
    assert rel < 1e-2
    gpu.load_avatar(astronaut_avatar)
    engine.load_avatar(astronaut_avatar)
    positions = list(range(6))
    a = gpu.render(astronaut_avatar.id, positions, feats_gpu[:6])
    b = engine.render(astronaut_avatar.id, positions, feats_cpu[:6])
    assert min(_psnr(x, y) for x, y in zip(a, b, strict=True)) > 35
