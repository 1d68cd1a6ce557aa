"""MuseTalk v1.5 audio features: each semantic pinned on its own, offline and streaming.

Tiny random whisper: d_model 384, 5 hidden states, 2 s encoder windows (100 steps)."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.base import FrameJob, ready_horizon
from engines.musetalk.audio_features import AudioFeaturizer, frame_steps, steps_in
from engines.musetalk.weights import load_whisper
from engines.stream import SpeechStream

log = logging.getLogger(__name__)

W = 32_000  # tiny whisper's window in samples (2 s)
S = 100  # its steps per window


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny encoder's matmuls are too small to share: with two threads on a busy machine
    they ran several times slower (the streaming runs below took minutes inside the full
    suite); one thread for the whole module keeps every comparison in it bitwise alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def featurizer(tiny_models_dir: Path) -> AudioFeaturizer:
    encoder, extractor = load_whisper(tiny_models_dir, "cpu", torch.float32)
    return AudioFeaturizer(encoder, extractor)


@pytest.fixture(scope="module")
def long_speech(speech_pcm: np.ndarray) -> np.ndarray:
    """3.5 s: more than one encoder window, so some frames straddle a segment boundary."""
    x = np.concatenate([speech_pcm, speech_pcm[::-1][:8_000]])
    return np.ascontiguousarray(x, dtype=np.float32)


# -- the whisper encoder itself -----------------------------------------------------------
def test_window_comes_from_the_config(featurizer: AudioFeaturizer) -> None:
    assert featurizer.window_steps == S
    assert featurizer.window_samples == W == S * 2 * 160


def test_five_hidden_states_the_last_after_the_final_layer_norm(
    featurizer: AudioFeaturizer,
) -> None:
    """MuseTalk stacks `encoder(...).hidden_states`: embeddings, the outputs of layers 1-3,
    and the final layer-normed output (transformers' long-standing convention)."""
    mel = torch.randn(1, 80, 2 * S, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = featurizer.encoder(mel, output_hidden_states=True)
        x = out.hidden_states[0]
        for layer in featurizer.encoder.layers[:3]:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
    assert len(out.hidden_states) == 5
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    torch.testing.assert_close(out.hidden_states[3], x)


# -- the audio window of frame i, with planted markers -----------------------------------
def _marker_encode(featurizer: AudioFeaturizer):  # type: ignore[no-untyped-def]
    """A stand-in encoder for audio = arange(n): hidden[t, h] = (global step + 1, h, the
    segment's last sample + 1), read back from the segment's own sample values."""

    def encode(segments):  # type: ignore[no-untyped-def]
        out = torch.zeros(len(segments), S, 5, 384)
        for k, seg in enumerate(segments):
            start = int(seg[0])
            out[k, :, :, 0] = (start // 320 + torch.arange(S) + 1.0)[:, None]
            out[k, :, :, 1] = torch.arange(5.0)[None, :]
            out[k, :, :, 2] = float(start + len(seg))
        return out

    return encode


def _expected(index: int, horizon: int, n: int) -> np.ndarray:
    """(50, 3) markers frame `index` must read (token = step-major: c*5 + h)."""
    exp = np.zeros((10, 5, 3))
    for c, step in enumerate(frame_steps(index)):
        if 0 <= step < steps_in(horizon):
            seg_end = min((step // S + 1) * W, horizon, n)
            exp[c, :, 0] = step + 1
            exp[c, :, 1] = np.arange(5)
            exp[c, :, 2] = seg_end
    return exp.reshape(50, 3)


@pytest.mark.parametrize("n", [16_000 * 2 + 123, W + 3 * 640 + 17, 2 * W + 5_000])
def test_offline_window_of_each_frame(
    featurizer: AudioFeaturizer, monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    monkeypatch.setattr(featurizer, "encode", _marker_encode(featurizer))
    audio = np.arange(n, dtype=np.float32)
    feats = featurizer.offline(audio).numpy()
    assert feats.shape == (n // 640, 50, 384)
    for i in range(len(feats)):
        np.testing.assert_array_equal(feats[i, :, :3], _expected(i, n, n), err_msg=f"frame {i}")
    # the left pad: frame 0 hears 4 zero steps, then steps 0..5
    assert (feats[0, :20, 0] == 0).all() and feats[0, 20, 0] == 1
    # frame i reads steps 2i-4 .. 2i+5 (t - 80 ms .. t + 120 ms)
    assert feats[10, 0, 0] == 2 * 10 - 4 + 1 and feats[10, 45, 0] == 2 * 10 + 5 + 1
    # near the end: steps past floor(n / 320) are the right pad's zeros
    last = feats[-1, :, 0].reshape(10, 5)[:, 0]
    kept = last[last > 0]
    assert kept.max() == steps_in(n)  # marker = step + 1 of the last kept step
    assert (last[len(kept) :] == 0).all()


def test_reshape_is_step_major(
    featurizer: AudioFeaturizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'b c h w -> b (c h) w': token 5c + h holds step c's hidden state h."""
    monkeypatch.setattr(featurizer, "encode", _marker_encode(featurizer))
    feats = featurizer.offline(np.arange(32_000, dtype=np.float32)).numpy()
    i = 20
    for c in range(10):
        for h in range(5):
            assert feats[i, 5 * c + h, 0] == 2 * i - 4 + c + 1
            assert feats[i, 5 * c + h, 1] == h


def test_stream_window_and_horizon(
    featurizer: AudioFeaturizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step comes from its own segment cut at the horizon; straddling frames take two."""
    monkeypatch.setattr(featurizer, "encode", _marker_encode(featurizer))
    n = 2 * W + 10_000
    audio = np.arange(n, dtype=np.float32)
    calls: list[int] = []
    encode = featurizer.encode

    def counting(segments):  # type: ignore[no-untyped-def]
        calls.append(len(segments))
        return encode(segments)

    monkeypatch.setattr(featurizer, "encode", counting)
    indices = [0, 1, 30, 47, 48, 49, 50, 52, 53, 98, 100, 110]
    jobs = [FrameJob(i, min(ready_horizon(i), n), i) for i in indices]
    feats = featurizer.stream(audio, jobs).numpy()
    for j, job in enumerate(jobs):
        np.testing.assert_array_equal(
            feats[j, :, :3], _expected(job.index, job.horizon, n), err_msg=f"frame {job.index}"
        )
    # frame 49 reads steps 94..103: segment 0 (complete) and segment 1 (cut at its horizon)
    ends = set(feats[indices.index(49), :, 2].tolist()) - {0.0}
    assert ends == {float(W), float(ready_horizon(49))}
    # passes are deduplicated: one per distinct (segment, cut) pair, in one encode call
    distinct = {
        (int(s) // S, min(job.horizon, (int(s) // S + 1) * W))
        for job in jobs
        for s in frame_steps(job.index)
        if 0 <= s < steps_in(job.horizon)
    }
    assert calls == [len(distinct)]


def test_stream_reads_only_up_to_the_horizon(
    featurizer: AudioFeaturizer, long_speech: np.ndarray
) -> None:
    jobs = [FrameJob(i, ready_horizon(i), i) for i in (0, 5, 40, 49)]
    a = featurizer.stream(long_speech, jobs)
    noisy = long_speech.copy()
    rng = np.random.default_rng(1)
    for job in jobs:
        cut = noisy.copy()
        cut[job.horizon :] = rng.standard_normal(cut.size - job.horizon).astype(np.float32)
        b = featurizer.stream(cut, [job])
        assert torch.equal(a[jobs.index(job)], b[0])
    with pytest.raises(ValueError, match="needs"):
        featurizer.stream(long_speech[:1000], [FrameJob(0, 1920, 0)])


# -- offline against MuseTalk's own code, transcribed -------------------------------------
def musetalk_offline(featurizer: AudioFeaturizer, audio: np.ndarray) -> torch.Tensor:
    """get_audio_feature + get_whisper_chunk as MuseTalk writes them (float floors, list
    of segments, cat, trim, pad with zeros_like slices, per-frame slices, c-major tokens)."""
    sr = 16000
    segment_length = featurizer.window_samples  # MuseTalk: 30 * sr, whisper-tiny's window
    segments = [audio[i : i + segment_length] for i in range(0, len(audio), segment_length)]
    feats = []
    with torch.no_grad():
        for segment in segments:
            x = featurizer.extractor(segment, return_tensors="pt", sampling_rate=sr).input_features
            hidden = featurizer.encoder(x, output_hidden_states=True).hidden_states
            feats.append(torch.stack(hidden, dim=2))
    wf = torch.cat(feats, dim=1)
    num_frames = math.floor((len(audio) / sr) * 25)
    actual_length = math.floor((len(audio) / sr) * 50)
    wf = wf[:, :actual_length, ...]
    wf = torch.cat([torch.zeros_like(wf[:, :4]), wf, torch.zeros_like(wf[:, :12])], 1)
    clips = torch.cat(
        [wf[:, math.floor(i * 2.0) : math.floor(i * 2.0) + 10] for i in range(num_frames)]
    )
    return torch.cat([clips[:, c] for c in range(10)], dim=1)  # (T, 10*5, 384), c-major


def test_offline_equals_musetalk(featurizer: AudioFeaturizer, long_speech: np.ndarray) -> None:
    n = long_speech.size
    assert math.floor(n / 16000 * 50) == n // 320 and math.floor(n / 16000 * 25) == n // 640
    ours = featurizer.offline(long_speech)
    ref = musetalk_offline(featurizer, long_speech)
    assert ours.shape == ref.shape == (n // 640, 50, 384)
    assert torch.equal(ours, ref)
    assert ours.abs().sum() > 0


# -- streaming: chunking invariance and distance from offline -----------------------------
def _stream_all(
    featurizer: AudioFeaturizer, audio: np.ndarray, chunks: Iterable[int]
) -> torch.Tensor:
    """Every frame's features, the audio pushed in chunks of the sizes given (cycled)."""
    stream = SpeechStream()
    out, indices = [], []
    start = 0
    for chunk in itertools.cycle(chunks):
        if start >= audio.size:
            break
        stream.push(audio[start : start + chunk])
        start += chunk
        jobs = stream.take()
        if jobs:
            out.append(featurizer.stream(stream.audio, jobs))
            indices += [j.index for j in jobs]
    stream.end()
    jobs = stream.take()
    if jobs:
        out.append(featurizer.stream(stream.audio, jobs))
        indices += [j.index for j in jobs]
    assert indices == list(range(audio.size // 640))
    return torch.cat(out)


STREAM_SAMPLES = 38_400  # 2.4 s: past the first encoder window, so frames straddle its end
IRREGULAR = (16_000, 37, 640, 5_003, 1, 320)  # 1 s, odd sizes, a frame, one sample, 20 ms


@pytest.fixture(scope="module")
def streamed(featurizer: AudioFeaturizer, long_speech: np.ndarray) -> dict[str, torch.Tensor]:
    """The same speech streamed in 20 ms chunks, and in chunks of irregular sizes."""
    audio = long_speech[:STREAM_SAMPLES]
    return {
        "20 ms": _stream_all(featurizer, audio, [320]),
        "irregular": _stream_all(featurizer, audio, IRREGULAR),
    }


def test_stream_is_identical_however_the_audio_is_chunked(
    streamed: dict[str, torch.Tensor],
) -> None:
    assert streamed["20 ms"].shape == (STREAM_SAMPLES // 640, 50, 384)
    assert torch.equal(streamed["20 ms"], streamed["irregular"])


def test_stream_equals_offline_where_the_horizon_covers_the_segment(
    featurizer: AudioFeaturizer, long_speech: np.ndarray, streamed: dict[str, torch.Tensor]
) -> None:
    audio = long_speech[:STREAM_SAMPLES]
    n = audio.size
    offline = featurizer.offline(audio)
    stream = streamed["20 ms"]
    assert stream.shape == offline.shape
    # token-wise: a step whose segment is complete below the frame's horizon is exact
    exact_tokens, frames_exact = 0, []
    for i in range(len(offline)):
        h = min(ready_horizon(i), n)
        covered = True
        for c, step in enumerate(frame_steps(i)):
            if not 0 <= step < steps_in(h):
                continue
            seg_end = min((step // S + 1) * W, n)
            if h >= seg_end:
                assert torch.equal(stream[i, 5 * c : 5 * c + 5], offline[i, 5 * c : 5 * c + 5])
                exact_tokens += 1
            else:
                covered = False
        if covered:
            assert torch.equal(stream[i], offline[i])
            frames_exact.append(i)
    # frame 47 (its steps end with segment 0, which its horizon covers) and the last ones
    assert 47 in frames_exact and 46 not in frames_exact and len(offline) - 1 in frames_exact
    assert exact_tokens > 0
    # elsewhere the two differ (whisper attends to the whole window); report how much
    diff = (stream - offline).float()
    rel = diff.norm(dim=(1, 2)) / offline.float().norm(dim=(1, 2))
    inexact = torch.tensor([i not in frames_exact for i in range(len(offline))])
    assert (rel[inexact] > 0).all()
    log.warning(
        "streaming vs offline features, relative L2 error per frame: mean %.4f, max %.4f "
        "(%d of %d frames exact)",
        float(rel[inexact].mean()),
        float(rel.max()),
        len(frames_exact),
        len(offline),
    )
