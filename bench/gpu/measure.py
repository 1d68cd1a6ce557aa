"""Measurement pieces shared by `lipstream bench` and the GPU probe: timers, random models of
the real sizes, a synthetic avatar, the MuseTalk-way CPU paste-back and encoder costs."""

from __future__ import annotations

import dataclasses
import fractions
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from avatars.avatar import Avatar

log = logging.getLogger(__name__)


def gpu_time_ms(fn: Callable[[], Any], reps: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median / p10 / p90 milliseconds of `fn` on the current CUDA stream (events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p10_ms": times[len(times) // 10],
        "p90_ms": times[(len(times) * 9) // 10],
        "reps": reps,
    }


def cpu_time_ms(fn: Callable[[], Any], reps: int = 20, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def median_ms(
    fn: Callable[[], Any], device: torch.device, reps: int, cpu_reps: int | None = None
) -> float:
    """Median ms of `fn`: CUDA events on a GPU (`gpu_time_ms`), the wall clock on the CPU
    (`cpu_time_ms`, `cpu_reps` times if given: CPU smoke runs are slow)."""
    if device.type == "cuda":
        return float(gpu_time_ms(fn, reps=reps)["median_ms"])
    return cpu_time_ms(fn, reps=cpu_reps or reps, warmup=1)


def build_models(size: str, device: str | torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """Random (unet, vae, whisper encoder) of MuseTalk's shapes, built on `device`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperModel

    from engines.musetalk.weights import configs

    unet_cfg, vae_cfg, whisper_cfg = configs(size)  # type: ignore[arg-type]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**{k: v for k, v in unet_cfg.items() if not k.startswith("_")})
        vae = AutoencoderKL(**{k: v for k, v in vae_cfg.items() if not k.startswith("_")})
        whisper = WhisperModel(WhisperConfig(**whisper_cfg)).get_encoder()
    models: list[Any] = [unet, vae, whisper]
    return tuple(m.to(dtype=dtype).eval().requires_grad_(False) for m in models)  # type: ignore[return-value]


def synthetic_avatar(n: int = 8, height: int = 720, width: int = 1280, seed: int = 0) -> Avatar:
    """An avatar of `n` frames (the astronaut, shifted) with face boxes of varying size
    near the centre, MuseTalk-style 1.5x crop boxes and blurred lower-half masks."""
    import cv2
    from skimage import data

    rng = np.random.default_rng(seed)
    img = cv2.resize(data.astronaut(), (width, height))
    frames = np.stack([np.roll(img, 3 * i, axis=1) for i in range(n)])
    fb, cb, masks = [], [], []
    for i in range(n):
        s0 = min(height, width) // 3
        w = int(s0 + rng.integers(-10, 10))
        h = int(s0 * 1.1 + rng.integers(-10, 10))
        x1 = width // 2 - w // 2 + int(rng.integers(-20, 20))
        y1 = height // 3 - h // 4 + int(rng.integers(-10, 10))
        if i == 1:  # one box at the frame's corner: its crop box leaves the frame
            x1, y1 = width - w, height - h
        fb.append([x1, y1, x1 + w, y1 + h])
        cx, cy, half = x1 + w // 2, y1 + h // 2, int(max(w, h) * 1.5) // 2
        cb.append([cx - half, cy - half, cx + half, cy + half])
        m = np.zeros((2 * half, 2 * half), np.uint8)
        m[half:, :] = 255
        k = int(0.1 * 2 * half) // 2 * 2 + 1
        masks.append(cv2.GaussianBlur(m, (k, k), 0))
    latents = rng.standard_normal((n, 8, 32, 32)).astype(np.float32)
    return Avatar(
        id=f"synthetic{height}p",
        name="synthetic",
        fps=25.0,
        frames=frames,
        face_boxes=np.array(fb, np.int32),
        crop_boxes=np.array(cb, np.int32),
        masks=masks,
        latents=latents,
    )


def pil_paste_back(
    frame: np.ndarray, face: np.ndarray, face_box, crop_box, mask: np.ndarray
) -> np.ndarray:
    """MuseTalk's realtime-script paste-back, verbatim in behaviour: cv2 resize + PIL pastes."""
    import cv2
    from PIL import Image

    body = Image.fromarray(frame)
    x, y, x1, y1 = (int(v) for v in face_box)
    cx1, cy1, cx2, cy2 = (int(v) for v in crop_box)
    crop = (cx1, cy1, cx2, cy2)
    face_img = Image.fromarray(cv2.resize(face, (x1 - x, y1 - y)))
    large = body.crop(crop)
    large.paste(face_img, (x - crop[0], y - crop[1], x1 - crop[0], y1 - crop[1]))
    body.paste(large, crop[:2], Image.fromarray(mask).convert("L"))
    return np.asarray(body)


def avatar_pictures(height: int, width: int, n: int) -> list[np.ndarray]:
    """n RGB pictures like a talking avatar's: scikit-image's astronaut, fitted into the frame
    on a flat background, the mouth region moving up and down, the whole picture swaying by up
    to 2 px."""
    import cv2
    from skimage import data

    side = min(height, width)
    face = cv2.resize(data.astronaut(), (side, side))
    base = np.empty((height, width, 3), np.uint8)
    base[:] = (40, 60, 90)
    y0, x0 = (height - side) // 2, (width - side) // 2
    base[y0 : y0 + side, x0 : x0 + side] = face
    my, mx, mh, mw = int(side * 0.6), int(side * 0.38), int(side * 0.17), int(side * 0.22)
    mouth = face[my : my + mh, mx : mx + mw]
    out = []
    for i in range(n):
        pic = base.copy()
        shift = round(side / 90 * float(np.sin(i * 0.7)))
        pic[y0 + my : y0 + my + mh, x0 + mx : x0 + mx + mw] = np.roll(mouth, shift, axis=0)
        out.append(np.roll(pic, round(2 * float(np.sin(i * 0.13))), axis=1))
    return out


def encoder_cost(
    height: int,
    width: int,
    frames: int = 50,
    threads: tuple[int, ...] = (1, 4, 8),
    vp8_codec_threads: tuple[int, ...] = (1, 2),
    h264_codec_threads: tuple[int, ...] = (1, 4),
    picture: str = "avatar",
    repeats: int = 3,
) -> dict[str, Any]:
    """aiortc's own VP8 and H.264 encoders on frames of the avatar's size, per codec:

    - as aiortc sets them up (`EncoderTuning.aiortc()`: VP8 with its denoiser and 2 threads at
      720p on 3+ cores, x264's medium preset): ms per frame on one thread, the median of
      `repeats` runs of `frames` (`ms_per_frame_1_thread`, each run's in
      `ms_per_frame_1_thread_runs`: one short run can be a third off), aggregate frames/s with
      k encoders in k threads (k sessions, `fps_total_<k>_threads`), CPU cores one 25 fps
      session needs;
    - `server`: the same with the server's defaults (`EncoderTuning()`), and
      `server_speedup`, aiortc's ms per frame over the server's;
    - `by_codec_threads`: the server's defaults with each of `vp8_codec_threads` /
      `h264_codec_threads` threads per codec.

    `picture` "avatar" (`avatar_pictures`: a face, its mouth moving, the whole picture swaying
    a pixel or two, as a video avatar's does) or "noise" (blurred noise moving 4 px a frame:
    every block changes). The server's defaults are back in place afterwards."""
    try:
        from aiortc.rtcrtpparameters import RTCRtpCodecParameters

        from server.media import encoder_tuning
        from server.media.encoder_tuning import EncoderTuning
    except ImportError as exc:
        return {"error": f"aiortc/av not importable: {exc}"}
    pics = _pictures(picture, height, width, frames)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out: dict[str, Any] = {
        "height": height,
        "width": width,
        "picture": picture,
        "cpu_count": os.cpu_count(),
    }
    server = EncoderTuning()
    # per codec: the EncoderTuning field of its threads, and the counts to measure
    per_codec = {
        "video/VP8": ("vp8_threads", vp8_codec_threads),
        "video/H264": ("h264_threads", h264_codec_threads),
    }
    try:
        for mime, (field, counts) in per_codec.items():
            timer = _EncodeTimer(RTCRtpCodecParameters(mimeType=mime, clockRate=90000), pics)

            def measured(tuning: Any, timer: _EncodeTimer = timer) -> dict[str, Any]:
                encoder_tuning.apply(tuning)
                return timer.measure(frames, threads, repeats)

            res: dict[str, Any] = measured(EncoderTuning.aiortc())
            res["server"] = measured(server)
            res["server_speedup"] = (
                res["ms_per_frame_1_thread"] / res["server"]["ms_per_frame_1_thread"]
            )
            res["by_codec_threads"] = {
                str(n): measured(dataclasses.replace(server, **{field: n}))  # type: ignore[arg-type]
                for n in counts
            }
            out[mime.split("/")[1]] = res
    finally:
        encoder_tuning.apply(server)
    out["server_tuning"] = server.as_dict()
    return out


def _pictures(picture: str, height: int, width: int, frames: int) -> list[np.ndarray]:
    """The encoders' input: the avatar-like pictures, or blurred noise moving 4 px a frame."""
    if picture == "avatar":
        return avatar_pictures(height, width, frames)
    if picture != "noise":
        raise ValueError(f"picture must be 'avatar' or 'noise', got {picture!r}")
    import cv2

    rng = np.random.default_rng(0)
    base: np.ndarray = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    base = cv2.GaussianBlur(base, (31, 31), 8)
    return [np.roll(base, 4 * i, axis=1) for i in range(frames)]


class _EncodeTimer:
    """Times a fresh aiortc encoder of `codec` over the pictures (as I420 video frames)."""

    def __init__(self, codec: Any, pics: list[np.ndarray]) -> None:
        from av import VideoFrame

        self.codec = codec
        self.frames = []
        for i, p in enumerate(pics):
            f = VideoFrame.from_ndarray(p.astype(np.uint8), format="rgb24").reformat(
                format="yuv420p"
            )
            f.pts = i * 3600
            f.time_base = fractions.Fraction(1, 90000)
            self.frames.append(f)

    def run(self, n_frames: int) -> float:
        """Seconds one new encoder takes for `n_frames` (the first a keyframe)."""
        from aiortc.codecs import get_encoder

        enc = get_encoder(self.codec)
        t0 = time.perf_counter()
        for i in range(n_frames):
            enc.encode(self.frames[i % len(self.frames)], force_keyframe=(i == 0))
        return time.perf_counter() - t0

    def measure(self, frames: int, threads: tuple[int, ...], repeats: int) -> dict[str, Any]:
        """ms per frame alone (median of `repeats` runs), then frames/s of k encoders in k
        threads together, for each k of `threads`, with the encoder settings in place now."""
        self.run(5)
        runs = [self.run(frames) / frames * 1e3 for _ in range(repeats)]
        res: dict[str, Any] = {
            "ms_per_frame_1_thread": float(np.median(runs)),
            "ms_per_frame_1_thread_runs": runs,
        }
        for k in threads:
            ts = [threading.Thread(target=self.run, args=(frames,)) for _ in range(k)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            res[f"fps_total_{k}_threads"] = k * frames / (time.perf_counter() - t0)
        best = max(v for key, v in res.items() if key.startswith("fps_total"))
        res["cores_per_25fps_session"] = 25 * res["ms_per_frame_1_thread"] / 1e3
        res["sessions_per_host_at_best_thread_scaling"] = best / 25
        return res
