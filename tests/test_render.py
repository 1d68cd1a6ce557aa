"""`lipstream render` end to end, audio loading, the mp4 writer and the engine factory."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import av
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from avatars.avatar import Avatar
from engines.base import EngineError, frames_in
from engines.render.audio_io import AudioError, AudioLimits, load_audio, write_wav
from engines.render.video_io import Mp4Writer, even_size, read_pngs

MUSETALK_CLIP_S = 0.6  # model work is ~0.5 s a frame on the test CPU: 15 frames


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    from bench.cli import register as register_bench
    from lipstream.commands.engines import register

    app = typer.Typer()
    register(app)
    register_bench(app)
    return app


def run_cli(app: typer.Typer, *args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def probe(path: Path) -> dict[str, Any]:
    """Codec, rate, decoded frame count, size and audio facts of an mp4."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        info: dict[str, Any] = {
            "codec": v.codec_context.name,
            "rate": v.average_rate,
            "pix_fmt": v.codec_context.pix_fmt,
            "size": (v.height, v.width),
            "audio": [(a.codec_context.name, a.sample_rate) for a in c.streams.audio],
        }
        frames = [f for f in c.decode(video=0)]
        info["frames"] = len(frames)
        info["times"] = [f.time for f in frames]
    return info


def saved(avatar: Avatar, root: Path) -> Avatar:
    from avatars.store import AvatarStore

    AvatarStore(root).save(avatar)
    return avatar


def encode_audio(src: np.ndarray, path: Path, codec: str, rate: int = 16000) -> None:
    """Write `src` (float32 16 kHz mono) with PyAV into `path` with `codec`."""
    with av.open(str(path), "w") as c:
        s = cast(av.AudioStream, c.add_stream(codec, rate=rate))
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(src.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = 16000
        resampler = av.AudioResampler(format=s.format.name, layout="mono", rate=rate)
        for f in resampler.resample(frame) + resampler.resample(None):
            c.mux(s.encode(f))
        c.mux(s.encode(None))


# -- audio --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "codec", "rate"),
    [
        ("a.mp3", "libmp3lame", 22050),
        ("a.ogg", "libopus", 48000),
        ("a.flac", "flac", 44100),
        ("a.m4a", "aac", 16000),
    ],
)
def test_load_audio_any_format(
    tmp_path: Path, speech_pcm: np.ndarray, name: str, codec: str, rate: int
) -> None:
    path = tmp_path / name
    encode_audio(speech_pcm, path, codec, rate)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    # lossy codecs add priming/padding: the length stays within 0.1 s
    assert abs(x.size - speech_pcm.size) < 1600
    assert 0.05 < float(np.sqrt(np.mean(x**2))) < 0.5


def test_load_audio_wav_is_exact(speech_wav: Path, speech_pcm: np.ndarray) -> None:
    np.testing.assert_array_equal(load_audio(speech_wav), speech_pcm)


def test_load_audio_resamples_to_16k(tmp_path: Path) -> None:
    t = np.arange(44100) / 44100
    path = tmp_path / "tone.wav"
    write_wav(path, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate=44100)
    x = load_audio(path)
    assert abs(x.size - 16000) <= 32
    spectrum = np.abs(np.fft.rfft(x[:16000]))
    assert abs(int(np.argmax(spectrum)) - 440) <= 2


def test_load_audio_refuses_non_audio(tmp_path: Path, astronaut_frames: np.ndarray) -> None:
    import cv2

    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 50)
    image = tmp_path / "face.png"
    cv2.imwrite(str(image), astronaut_frames[0])
    empty = tmp_path / "empty.mp3"
    empty.write_bytes(b"")
    for path, message in [
        (text, "not a decodable audio file"),
        (image, "not accepted|no audio stream"),
        (empty, "empty file"),
        (tmp_path / "missing.wav", "no such file"),
    ]:
        with pytest.raises(AudioError, match=message):
            load_audio(path)
    assert issubclass(AudioError, ValueError)


def test_load_audio_limits(speech_wav: Path) -> None:
    with pytest.raises(AudioError, match="over the limit"):
        load_audio(speech_wav, AudioLimits(max_bytes=1000))
    with pytest.raises(AudioError, match="limit of 1 s"):
        load_audio(speech_wav, AudioLimits(max_seconds=1.0))


# -- video ------------------------------------------------------------------------------
def test_mp4_writer_exact_frames_odd_size_and_audio(tmp_path: Path, speech_pcm: np.ndarray) -> None:
    out = tmp_path / "odd.mp4"
    n = 30
    frames = np.random.default_rng(0).integers(0, 255, (n, 101, 75, 3), dtype=np.uint8)
    frames[:] = frames[:, :1, :1]  # flat colours compress well and survive H.264
    with Mp4Writer(out, 101, 75, speech_pcm[: n * 640]) as w:
        w.write_batch(frames)
        assert w.encoder == "libx264"
    info = probe(out)
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["rate"] == Fraction(25) and info["frames"] == n
    assert info["size"] == even_size(101, 75) == (102, 76)
    assert info["audio"] == [("aac", 16000)]
    assert info["times"][:3] == pytest.approx([0.0, 0.04, 0.08])
    with av.open(str(out)) as c:
        first = next(iter(c.decode(video=0))).to_ndarray(format="rgb24")
    assert np.abs(first[:101, :75].astype(int) - frames[0].astype(int)).mean() < 4
    with (
        pytest.raises(ValueError, match="frame must be"),
        Mp4Writer(tmp_path / "x.mp4", 10, 10) as bad,
    ):
        bad.write(np.zeros((12, 10, 3), np.uint8))


# -- factory ----------------------------------------------------------------------------
def test_factory_never_silently_swaps_musetalk(tmp_path: Path) -> None:
    from engines.backends import create_engine

    with pytest.raises(EngineError, match=r"no weights at .*: run `lipstream models download`"):
        create_engine("musetalk", tmp_path / "none", "cpu")
    engine, reason = create_engine("auto", tmp_path / "none", "auto")
    assert engine.name == "preview"
    assert "no CUDA GPU" in reason or "no weights at" in reason
    engine, reason = create_engine("preview", tmp_path / "none")
    assert engine.name == "preview"
    with pytest.raises(EngineError, match="unknown engine"):
        create_engine("magic", tmp_path)


def test_auto_choosing_preview_says_why_without_logging_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The choice is returned with its reason; the server logs it once (as INFO), the factory
    does not log it again (least of all as a warning)."""
    import logging

    from engines.backends import create_engine

    with caplog.at_level(logging.DEBUG, logger="engines"):
        engine, reason = create_engine("auto", tmp_path / "none", "cpu")
    assert engine.name == "preview" and reason.startswith("preview: device cpu")
    assert not [r for r in caplog.records if r.name.startswith("engines")]


def test_factory_builds_musetalk_from_weights(tiny_models_dir: Path) -> None:
    from engines.backends import create_engine

    engine, reason = create_engine("musetalk", tiny_models_dir, "cpu", "torch")
    assert engine.name == "musetalk" and "musetalk" in reason
    auto, why = create_engine("auto", tiny_models_dir, "cpu")
    assert auto.name == "preview" and "cpu" in why


# -- CLI ---------------------------------------------------------------------------------
def test_cli_render_musetalk(
    cli: typer.Typer,
    tmp_path: Path,
    tiny_models_dir: Path,
    astronaut_avatar: Avatar,
    speech_pcm: np.ndarray,
) -> None:
    root = tmp_path / "avatars"
    saved(astronaut_avatar, root)
    clip = speech_pcm[: int(MUSETALK_CLIP_S * 16000) + 123]  # not a whole number of frames
    wav = tmp_path / "clip.wav"
    write_wav(wav, clip)
    out, frames_dir = tmp_path / "out.mp4", tmp_path / "frames"
    code, stdout, stderr = run_cli(
        cli, "render", "--avatar", "astronaut", "--audio", wav, "--out", out, "--frames-dir", frames_dir,
        "--models-dir", tiny_models_dir, "--avatars-dir", root, "--device", "cpu", "--batch-size", "8",
    )  # fmt: skip
    assert code == 0, stderr
    n = frames_in(clip.size)
    assert n == 15
    info = probe(out)
    assert info["codec"] == "h264" and info["rate"] == Fraction(25) and info["frames"] == n
    assert info["audio"] == [("aac", 16000)]
    pngs = read_pngs(frames_dir)
    assert pngs.shape == (n, *astronaut_avatar.size, 3)
    assert "fps" in stdout and f"{n} frames" in stdout
    assert "engine: musetalk" in stderr


def test_cli_render_preview_needs_no_weights(
    cli: typer.Typer,
    tmp_path: Path,
    preview_avatar: Avatar,
    speech_wav: Path,
    speech_pcm: np.ndarray,
) -> None:
    root = tmp_path / "avatars"
    saved(preview_avatar, root)
    out, frames_dir = tmp_path / "p.mp4", tmp_path / "pf"
    code, _, stderr = run_cli(
        cli, "render", "--avatar", preview_avatar.id, "--audio", speech_wav, "--out", out,
        "--frames-dir", frames_dir, "--models-dir", tmp_path / "no-models", "--avatars-dir", root,
        "--engine", "preview",
    )  # fmt: skip
    assert code == 0, stderr
    n = frames_in(speech_pcm.size)
    assert probe(out)["frames"] == n == 75
    pngs = read_pngs(frames_dir)
    assert len(pngs) == n
    moved = [
        not np.array_equal(p, preview_avatar.frames[preview_avatar.loop_frame(i)])
        for i, p in enumerate(pngs)
    ]
    assert sum(moved) > n // 3, "speech must move the mouth in many frames"


def test_cli_render_streaming_preview_equals_offline(
    cli: typer.Typer, tmp_path: Path, preview_avatar: Avatar, speech_wav: Path
) -> None:
    root = tmp_path / "avatars"
    saved(preview_avatar, root)
    dirs = {}
    for mode in ("offline", "streaming"):
        dirs[mode] = tmp_path / mode
        extra = ["--streaming"] if mode == "streaming" else []
        code, _, stderr = run_cli(
            cli, "render", "--avatar", "astronaut-preview", "--audio", speech_wav, "--out", tmp_path / f"{mode}.mp4",
            "--frames-dir", dirs[mode], "--avatars-dir", root, "--engine", "preview", *extra,
        )  # fmt: skip
        assert code == 0, stderr
    # loudness over the same window: streaming differs only in the last frames (horizon)
    off, st = read_pngs(dirs["offline"]), read_pngs(dirs["streaming"])
    assert off.shape == st.shape
    np.testing.assert_array_equal(off[:-3], st[:-3])


def test_cli_render_errors(cli: typer.Typer, tmp_path: Path, preview_avatar: Avatar) -> None:
    root = tmp_path / "avatars"
    saved(preview_avatar, root)
    bad = tmp_path / "bad.mp3"
    bad.write_bytes(b"\x00garbage" * 100)
    code, _, stderr = run_cli(
        cli, "render", "--avatar", preview_avatar.id, "--audio", bad, "--out", tmp_path / "o.mp4",
        "--avatars-dir", root, "--engine", "preview",
    )  # fmt: skip
    assert code != 0 and "not a decodable audio file" in stderr
    assert not (tmp_path / "o.mp4").exists()
    wav = tmp_path / "ok.wav"
    write_wav(wav, np.zeros(16000, np.float32))
    code, _, stderr = run_cli(
        cli, "render", "--avatar", "nobody", "--audio", wav, "--out", tmp_path / "o.mp4", "--avatars-dir", root,
        "--engine", "preview",
    )  # fmt: skip
    assert code != 0 and "no avatar 'nobody'" in stderr
    code, _, stderr = run_cli(
        cli, "render", "--avatar", preview_avatar.id, "--audio", wav, "--out", tmp_path / "o.mp4",
        "--avatars-dir", root, "--models-dir", tmp_path / "none", "--engine", "musetalk",
    )  # fmt: skip
    assert code != 0 and "run `lipstream models download`" in stderr


def test_cli_gpu_commands_refuse_cleanly_without_a_gpu(cli: typer.Typer) -> None:
    for args in (["bench"], ["engines", "build"]):
        code, _, stderr = run_cli(cli, *args)
        assert code != 0 and "needs a CUDA GPU" in stderr


def test_auto_downloads_missing_weights_then_falls_back_when_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a GPU but no weights, `auto` tries the download; offline it says so and previews.
    (No GPU here: cuda_available is forced true, the download runs for real against an
    offline hub.)"""
    from engines import backends as factory

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(factory, "cuda_available", lambda: True)
    engine, reason = factory.create_engine(
        "auto", tmp_path / "models", device="auto", download_missing=True
    )
    assert engine.name == "preview"
    assert "could not be downloaded" in reason and "HF_HUB_OFFLINE" in reason
