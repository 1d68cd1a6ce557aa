"""server.media.encoder_tuning: the threads, speed, denoiser and x264 preset of the codecs aiortc's
real VP8 and H.264 encoders open, the settings behind them, and what a media process is told."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction

import aiortc.codecs.h264 as h264
import aiortc.codecs.vpx as vpx
import av
import cv2
import numpy as np
import pytest
from aiortc.codecs import get_decoder, get_encoder
from aiortc.codecs.vpx import vp8_depayload
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from skimage import data

from server.media import encoder_tuning
from server.settings import EncoderTuning, Settings, SettingsError

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000)
H264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000)


@pytest.fixture(autouse=True)
def server_defaults() -> Iterator[None]:
    yield
    encoder_tuning.apply(EncoderTuning())  # what every other test (and the server) runs with


def _talking(side: int, n: int) -> list[av.VideoFrame]:
    """A face whose mouth region moves up and down, the rest still: an avatar's picture."""
    face = cv2.resize(data.astronaut(), (side, side))
    y, x, h, w = int(side * 0.6), int(side * 0.38), int(side * 0.18), int(side * 0.25)
    out = []
    for i in range(n):
        pic = face.copy()
        pic[y : y + h, x : x + w] = np.roll(face[y : y + h, x : x + w], int(5 * np.sin(i * 0.7)), 0)
        frame = av.VideoFrame.from_ndarray(pic, format="rgb24").reformat(format="yuv420p")
        frame.pts, frame.time_base = i * 3600, Fraction(1, 90000)
        out.append(frame)
    return out


def _vp8_psnr(frames: list[av.VideoFrame]) -> float:
    """Mean luma PSNR (dB) of the frames through a fresh aiortc VP8 encoder and decoder, RTP
    payloads and all, leaving out the first 5 (the rate control settling)."""
    enc, dec = get_encoder(VP8), get_decoder(VP8)
    side = frames[0].height
    scores = []
    for f in frames:
        payloads, ts = enc.encode(f)  # type: ignore[attr-defined]
        bitstream = b"".join(vp8_depayload(p) for p in payloads)
        for got in dec.decode(JitterFrame(data=bitstream, timestamp=ts)):  # type: ignore[attr-defined]
            a = got.to_ndarray(format="yuv420p")[:side].astype(np.float64)
            b = f.to_ndarray()[:side]
            scores.append(10 * np.log10(255**2 / np.mean((a - b) ** 2)))
    assert len(scores) == len(frames)
    return float(np.mean(scores[5:]))


def test_the_denoiser_off_keeps_more_of_a_rendered_face() -> None:
    """aiortc's VP8 runs libvpx's denoiser (noise-sensitivity 4), made for a camera's noise; on
    a rendered picture it only blurs. libvpx on one thread is deterministic, so the order of
    the two scores is too (measured 46.1 against 45.5 dB)."""
    frames = _talking(256, 30)
    encoder_tuning.apply(EncoderTuning.aiortc())
    aiortc_db = _vp8_psnr(frames)
    encoder_tuning.apply(EncoderTuning())
    ours_db = _vp8_psnr(frames)
    assert ours_db > aiortc_db + 0.2, (ours_db, aiortc_db)


def test_the_options_aiortc_assigns_are_merged_with_ours() -> None:
    """aiortc assigns its whole options dict after creating a codec; ours win where both set
    one, the rest of aiortc's stay. Decoders are PyAV's own."""
    encoder_tuning.apply(EncoderTuning(vp8_cpu_used=-10, h264_preset="veryfast"))
    ctx = vpx.av.CodecContext.create("libvpx", "w")
    ctx.options = {"cpu-used": "-6", "noise-sensitivity": "4", "deadline": "realtime"}
    assert ctx.options == {"cpu-used": "-10", "noise-sensitivity": "0", "deadline": "realtime"}
    ctx = h264.av.CodecContext.create("libx264", "w")
    ctx.options = {"level": "31", "tune": "zerolatency"}
    assert ctx.options == {"level": "31", "tune": "zerolatency", "preset": "veryfast"}
    assert type(h264.av.CodecContext.create("h264", "r")) is type(
        av.CodecContext.create("h264", "r")
    )


def test_vp8_encoders_use_the_configured_threads() -> None:
    """`video_encoder_threads` (default 1) reaches the codec each VP8 encoder opens, even though
    aiortc assigns its own count; 0 gives aiortc's own choice back (which depends on the
    picture size and this machine's cores)."""
    import multiprocessing

    def threads(width: int, height: int) -> int:
        enc = get_encoder(VP8)
        frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
        frame.pts, frame.time_base = 0, Fraction(1, 90000)
        enc.encode(frame)  # type: ignore[attr-defined]
        return int(enc.codec.thread_count)  # type: ignore[attr-defined]

    encoder_tuning.apply(EncoderTuning(vp8_threads=3))
    assert threads(640, 360) == 3
    encoder_tuning.apply(EncoderTuning(vp8_threads=0))
    assert threads(1280, 720) == vpx.number_of_threads(1280 * 720, multiprocessing.cpu_count())
    encoder_tuning.apply(EncoderTuning())
    assert threads(1280, 720) == 1


def test_h264_encoders_get_the_threads_and_the_preset() -> None:
    """`h264_encoder_threads` reaches libx264; the preset changes what it sends (superfast
    against x264's medium, aiortc's)."""
    frames = _talking(256, 8)

    def stream(tuning: EncoderTuning) -> tuple[bytes, int]:
        encoder_tuning.apply(tuning)
        enc = get_encoder(H264)
        sent = b"".join(b"".join(enc.encode(f)[0]) for f in frames)  # type: ignore[attr-defined]
        return sent, int(enc.codec.thread_count)  # type: ignore[attr-defined]

    medium, _ = stream(EncoderTuning(h264_preset="medium"))
    ours, threads = stream(EncoderTuning())
    assert threads == 1 and ours and medium and ours != medium
    again, _ = stream(EncoderTuning(h264_preset="medium"))
    assert again == medium  # the difference is the preset's, not chance
    assert stream(EncoderTuning(h264_threads=3))[1] == 3


def test_the_settings_are_checked_and_named() -> None:
    s = Settings()
    assert EncoderTuning.from_settings(s) == EncoderTuning()
    assert (s.video_encoder_threads, s.vp8_cpu_used, s.vp8_noise_sensitivity) == (1, -6, 0)
    assert (s.h264_encoder_threads, s.h264_preset) == (1, "superfast")
    env = Settings.from_env({"LIPSTREAM_H264_PRESET": "veryfast", "LIPSTREAM_VP8_CPU_USED": "-12"})
    assert EncoderTuning.from_settings(env) == EncoderTuning(
        vp8_cpu_used=-12, h264_preset="veryfast"
    )
    for bad, name in (
        ({"h264_preset": "fastest"}, "h264_preset"),
        ({"vp8_cpu_used": 17}, "vp8_cpu_used"),
        ({"vp8_noise_sensitivity": -1}, "vp8_noise_sensitivity"),
        ({"video_encoder_threads": 17}, "video_encoder_threads"),
        ({"h264_encoder_threads": -1}, "h264_encoder_threads"),
    ):
        with pytest.raises(SettingsError, match=name):
            Settings(**bad)  # type: ignore[arg-type]


def test_a_media_process_gets_the_tuning_back_or_a_clear_error() -> None:
    t = EncoderTuning(vp8_threads=2, vp8_cpu_used=-8, h264_preset="faster")
    assert EncoderTuning.from_dict(t.as_dict()) == t
    assert EncoderTuning.from_dict({}) == EncoderTuning()
    assert Settings(**t.as_settings()).vp8_cpu_used == -8
    for bad in ({"vp8_threads": "2"}, {"threads": 2}, {"h264_preset": "fastest"}, [1]):
        with pytest.raises(ValueError):
            EncoderTuning.from_dict(bad)  # type: ignore[arg-type]


def test_a_change_of_tuning_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="server.media.encoder_tuning")
    encoder_tuning.apply(EncoderTuning(vp8_cpu_used=-9))
    encoder_tuning.apply(EncoderTuning(vp8_cpu_used=-9))
    lines = [r.getMessage() for r in caplog.records if r.name == "server.media.encoder_tuning"]
    assert len(lines) == 1 and "vp8_cpu_used=-9" in lines[0]
