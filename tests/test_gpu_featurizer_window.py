"""`GpuFeaturizer.encode` on the CPU: the padded windows built from one buffer of real samples
equal the old zero-padded host tensor bit for bit, whatever earlier calls left in the reused
buffers, and `stream_many` still follows `AudioFeaturizer.stream`.

Tiny random whisper: 2 s encoder windows (32,000 samples), encoder batch 8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engines.base import FrameJob, ready_horizon
from engines.musetalk.audio_features import AudioFeaturizer
from engines.musetalk.weights import load_whisper
from engines.pipeline.features import STAGING_SLOTS, GpuFeaturizer

W = 32_000  # tiny whisper's window in samples


@pytest.fixture(scope="module")
def base(tiny_models_dir: Path) -> AudioFeaturizer:
    encoder, extractor = load_whisper(tiny_models_dir, "cpu", torch.float32)
    return AudioFeaturizer(encoder, extractor)


@pytest.fixture
def gpu_feats(base: AudioFeaturizer) -> GpuFeaturizer:
    return GpuFeaturizer(base)


def old_wave(segments: list[np.ndarray], rows: int) -> torch.Tensor:
    """The previous host tensor: (rows, window) zeros, each segment copied into its row."""
    host = torch.zeros((rows, W), dtype=torch.float32)
    for i, s in enumerate(segments):
        host[i, : len(s)] = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32))
    return host


@torch.no_grad()
def old_encode(f: GpuFeaturizer, segments: list[np.ndarray]) -> torch.Tensor:
    """The previous `encode`: the zero-padded window uploaded whole, then log-mel + encoder."""
    n, b = len(segments), f.encoder_batch
    rows = -(-n // b) * b
    wave = old_wave(segments, rows).to(f.device)
    out = torch.empty((n, f.window_steps, 5, f.d_model), dtype=f.dtype, device=f.device)
    for start in range(0, rows, b):
        hidden = f.run_encoder(f.log_mel(wave[start : start + b]).to(f.dtype))
        stop = min(start + b, n)
        if stop > start:
            out[start:stop] = hidden[: stop - start]
    return out


def mixed_segments(count: int, seed: int) -> list[np.ndarray]:
    """Lengths cycling through empty, 1 sample, partial, a full window; random signs."""
    rng = np.random.default_rng(seed)
    lengths = [0, 1, int(rng.integers(2, W)), W]
    return [
        (0.3 * rng.standard_normal(lengths[(i + seed) % 4])).astype(np.float32)
        for i in range(count)
    ]


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)  # bitwise: -0.0 != 0.0 here


def test_window_wave_is_the_old_padded_tensor_bit_for_bit(gpu_feats: GpuFeaturizer) -> None:
    segments = mixed_segments(9, seed=3)
    segments[3][:5] = -0.0  # signed zeros must survive; the padding must be +0.0
    want = old_wave(segments, 16)
    got = gpu_feats.window_wave(segments, 16)
    assert got.shape == want.shape == (16, W) and got.dtype == torch.float32
    assert torch.equal(bits(got), bits(want))
    assert (bits(got[9:]) == 0).all()  # padding rows
    with pytest.raises(ValueError, match="segment 1"):
        gpu_feats.window_wave([np.zeros(3, np.float32), np.zeros(W + 1, np.float32)], 8)
    with pytest.raises(ValueError, match="rows"):
        gpu_feats.window_wave(segments, 8)
    with pytest.raises(ValueError, match="rows"):
        gpu_feats.window_wave([], 0)


@pytest.mark.parametrize("count", [1, 7, 9, 17])
def test_encode_equals_the_old_zero_padded_encode(gpu_feats: GpuFeaturizer, count: int) -> None:
    segments = mixed_segments(count, seed=count)
    if count >= 4:
        assert {0, 1, W} <= {len(s) for s in segments}
    got = gpu_feats.encode(segments)
    want = old_encode(gpu_feats, segments)
    assert got.shape == (count, 100, 5, 384)
    assert torch.equal(got, want)
    assert got.abs().sum() > 0


def test_encode_does_not_depend_on_earlier_calls(base: AudioFeaturizer) -> None:
    """Large then small inputs through both staging slots (stale samples lie beyond the new
    ones), then a call that grows the buffers: each equals the reference and a fresh
    featurizer's result."""
    f = GpuFeaturizer(base)
    calls = [
        [np.full(W, 0.5, np.float32) for _ in range(9)],
        [np.full(W, -0.25, np.float32)] * 3,
        mixed_segments(2, seed=11),
        [np.zeros(0, np.float32), np.full(10, 0.1, np.float32)],
        [np.full(W, 0.125, np.float32)] * 17,  # 2.2 MB: more than the first 1 MiB buffers
        mixed_segments(1, seed=4),
    ]
    assert len(calls) > 2 * STAGING_SLOTS
    for k, segments in enumerate(calls):
        got = f.encode(segments)
        assert torch.equal(got, old_encode(f, segments)), f"call {k}"
        assert torch.equal(got, GpuFeaturizer(base).encode(segments)), f"call {k}"
    assert f.encode([]).shape == (0, 100, 5, 384)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_encode_results_do_not_depend_on_the_encoder_batch(
    base: AudioFeaturizer, gpu_feats: GpuFeaturizer, batch: int
) -> None:
    """Other encoder batches (less or more padding per call) give the same windows, up to float
    rounding (the default batch of 4 and these run different GEMM shapes on the CPU)."""
    segments = mixed_segments(5, seed=7)
    small = GpuFeaturizer(base, encoder_batch=batch)
    got = small.encode(segments)
    assert got.shape == (5, 100, 5, 384)
    torch.testing.assert_close(got, gpu_feats.encode(segments), rtol=1e-4, atol=1e-4)
    assert torch.equal(got, small.encode(segments))  # and the same again, bit for bit


def test_stream_many_matches_audio_featurizer_stream(
    base: AudioFeaturizer, gpu_feats: GpuFeaturizer, speech_pcm: np.ndarray
) -> None:
    """Two utterances in one call (frames straddling the 2 s segment boundary included)
    against `AudioFeaturizer.stream` of each: the same steps from the same passes; the
    log-mel (torch vs the extractor's numpy) and the batch of 4 differ only in rounding."""
    a = np.ascontiguousarray(speech_pcm[: ready_horizon(52)], dtype=np.float32)
    b = np.ascontiguousarray(speech_pcm[::-1][: ready_horizon(20)], dtype=np.float32)
    jobs_a = [FrameJob(i, ready_horizon(i), i) for i in (0, 5, 30, 47, 49, 50, 52)]
    jobs_b = [FrameJob(i, ready_horizon(i), i) for i in (0, 1, 20)]
    got = gpu_feats.stream_many([(a, jobs_a), (b, jobs_b)])
    want = torch.cat([base.stream(a, jobs_a), base.stream(b, jobs_b)])
    assert got.shape == want.shape == (len(jobs_a) + len(jobs_b), 50, 384)
    assert torch.equal(got == 0, want == 0)  # the same zero-padded steps
    err = float((got - want).abs().max()) / float(want.abs().max())
    assert err < 1e-5, err
    assert gpu_feats.stream_many([]).shape == (0, 50, 384)
