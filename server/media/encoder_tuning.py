"""How the VP8 and H.264 codecs that aiortc opens for our video tracks are set up: threads,
speed, denoiser, x264 preset.

aiortc opens its codecs itself, on a track's first frame (`aiortc.codecs.vpx.Vp8Encoder`,
`aiortc.codecs.h264.H264Encoder`: `av.CodecContext.create(...)`, then attributes and an
`options` dict assigned one by one). `apply()` gives each of those two modules an `av` whose
`CodecContext.create` wraps the encoder contexts it makes in `_TunedContext`: the options it
is handed are merged with ours, and the attributes we fix keep our value. Decoders and
everything else in `av` are PyAV's own. What to set is `server.settings.EncoderTuning` (checked
with the other settings); `vp8_setup` / `h264_setup` translate it into each library's terms.

Why not aiortc's settings: they are a camera's. Measured on 2 cores, a 720p talking-avatar
picture (`README`, *Video encoders*):
- VP8 `noise-sensitivity` 4 (aiortc's) runs libvpx's temporal denoiser on every frame. A
  rendered avatar has no sensor noise; the denoiser cost a third of each encode (5.9 ms per
  frame against 3.9 without) and blurred the picture (PSNR 45.0 dB against 48.3 at 1 Mbps,
  40.1 against 40.5 at 300 kbps). Off by default.
- libx264 with aiortc's options runs at x264's default preset, medium: 15-16 ms a frame.
  `superfast` took 4-5 ms at the same PSNR (45.6 against 45.5 dB at 1 Mbps, 36.2 against
  35.9 at 300 kbps); `ultrafast` (2.6 ms) drops the deblocking filter.
- VP8 `cpu-used` beyond aiortc's -6 gained under 10 % (-12: 3.5 ms against 3.9), so it
  stays -6, a setting.
- Threads: libvpx's threads spin waiting for each other; with more codec threads than free
  cores they burn the cores they wait for (2 encoders x 2 threads made 53 frames/s on 2
  cores, 1 thread each 186). The sessions are the parallelism: 1 thread per VP8 codec, and
  per libx264 one too (FFmpeg's choice is 1.5 threads per core for every encoder; on 2 cores
  two encoders of 1 thread made 412 frames/s against 357).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from server.settings import EncoderTuning

log = logging.getLogger(__name__)


def vp8_setup(tuning: EncoderTuning) -> tuple[dict[str, Any], dict[str, str]]:
    """(attributes fixed, options merged) for libvpx encoder contexts."""
    fixed = {"thread_count": tuning.vp8_threads} if tuning.vp8_threads else {}
    options = {
        "cpu-used": str(tuning.vp8_cpu_used),
        "noise-sensitivity": str(tuning.vp8_noise_sensitivity),
    }
    return fixed, options


def h264_setup(tuning: EncoderTuning) -> tuple[dict[str, Any], dict[str, str]]:
    """(attributes fixed, options merged) for libx264 encoder contexts."""
    fixed = {"thread_count": tuning.h264_threads} if tuning.h264_threads else {}
    return fixed, {"preset": tuning.h264_preset}


class _TunedContext:
    """A PyAV encoder context as aiortc's codec module sees it: `options` assigned are merged
    with ours (ours win), attributes in `fixed` keep our value; everything else goes through."""

    __slots__ = ("_ctx", "_fixed", "_options")

    def __init__(self, ctx: Any, fixed: dict[str, Any], options: dict[str, str]) -> None:
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_fixed", fixed)
        object.__setattr__(self, "_options", options)
        for name, value in fixed.items():
            setattr(ctx, name, value)  # before the first frame opens the codec

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "options":
            value = {**value, **self._options}
        elif name in self._fixed:
            value = self._fixed[name]
        setattr(self._ctx, name, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


class _CodecContexts:
    """`av.CodecContext` for one aiortc codec module: `create(codec_name, "w")` is tuned."""

    def __init__(self, codec_name: str, fixed: dict[str, Any], options: dict[str, str]) -> None:
        self.codec_name, self.fixed, self.options = codec_name, fixed, options

    def create(self, codec: str, mode: Literal["r", "w"] | None = None) -> Any:
        import av

        ctx = av.CodecContext.create(codec, mode)
        if codec == self.codec_name and mode == "w":
            return _TunedContext(ctx, self.fixed, self.options)
        return ctx

    def __getattr__(self, name: str) -> Any:
        import av

        return getattr(av.CodecContext, name)


class _Av:
    """The `av` module, but with `_CodecContexts` for one codec."""

    def __init__(self, contexts: _CodecContexts) -> None:
        self.CodecContext = contexts

    def __getattr__(self, name: str) -> Any:
        import av

        return getattr(av, name)


_applied: EncoderTuning | None = None


def apply(tuning: EncoderTuning) -> None:
    """Every VP8 and H.264 encoder aiortc opens in this process from now on is set up by
    `tuning` (one per process: media processes get the server's in their "open" message)."""
    global _applied
    import aiortc.codecs.h264 as h264
    import aiortc.codecs.vpx as vpx

    if tuning != _applied:  # once per process and change (the soak's logs show which ran)
        log.info("video encoders: %s", tuning)
    vpx.av = _Av(_CodecContexts("libvpx", *vp8_setup(tuning)))  # type: ignore[assignment]
    h264.av = _Av(_CodecContexts("libx264", *h264_setup(tuning)))  # type: ignore[assignment]
    _applied = tuning


def applied() -> EncoderTuning | None:
    """The tuning `apply` last set in this process (None: aiortc's modules untouched)."""
    return _applied
