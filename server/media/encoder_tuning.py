"""How the VP8 and H.264 codecs that aiortc opens for our video tracks are set up: threads,
speed, denoiser, x264 preset.

aiortc opens its codecs itself, on a track's first frame (`aiortc.codecs.vpx.Vp8Encoder`,
`aiortc.codecs.h264.H264Encoder`: `av.CodecContext.create(...)`, then attributes and an
`options` dict assigned one by one). `apply()` gives each of those two modules an `av` whose
`CodecContext.create` wraps the encoder contexts it makes in `_TunedContext`: the options it
is handed are merged with ours, and the attributes we fix keep our value. Decoders and
everything else in `av` are PyAV's own.

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

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)
log = logging.getLogger(__name__)

MAX_THREADS = 16
# EncoderTuning's fields and the server settings they come from
SETTING_NAMES = {
    "vp8_threads": "video_encoder_threads",
    "vp8_cpu_used": "vp8_cpu_used",
    "vp8_noise_sensitivity": "vp8_noise_sensitivity",
    "h264_threads": "h264_encoder_threads",
    "h264_preset": "h264_preset",
}


@dataclass(frozen=True)
class EncoderTuning:
    """The settings video_encoder_threads, vp8_cpu_used, vp8_noise_sensitivity,
    h264_encoder_threads and h264_preset, checked; the defaults are the server's. Threads 0:
    the library's own choice (aiortc's for VP8: 2 at 720p on 3+ cores; FFmpeg's for H.264)."""

    vp8_threads: int = 1
    vp8_cpu_used: int = -6
    vp8_noise_sensitivity: int = 0
    h264_threads: int = 1
    h264_preset: str = "superfast"

    def __post_init__(self) -> None:
        for name, value in (
            ("video_encoder_threads", self.vp8_threads),
            ("h264_encoder_threads", self.h264_threads),
        ):
            if not 0 <= value <= MAX_THREADS:
                raise ValueError(
                    f"{name} must be in 0..{MAX_THREADS} (0: the codec library's choice), "
                    f"got {value}"
                )
        if not -16 <= self.vp8_cpu_used <= 16:
            raise ValueError(
                f"vp8_cpu_used must be in -16..16 (further from 0: faster), got {self.vp8_cpu_used}"
            )
        if not 0 <= self.vp8_noise_sensitivity <= 6:
            raise ValueError(
                f"vp8_noise_sensitivity must be in 0..6 (0: no denoiser), "
                f"got {self.vp8_noise_sensitivity}"
            )
        if self.h264_preset not in X264_PRESETS:
            raise ValueError(
                f"h264_preset must be one of {', '.join(X264_PRESETS)}, got {self.h264_preset!r}"
            )

    @classmethod
    def aiortc(cls) -> EncoderTuning:
        """What aiortc does left alone (the bench's baseline)."""
        return cls(
            vp8_threads=0,
            vp8_cpu_used=-6,
            vp8_noise_sensitivity=4,
            h264_threads=0,
            h264_preset="medium",
        )

    @classmethod
    def from_settings(cls, settings: Any) -> EncoderTuning:
        return cls(**{f: getattr(settings, name) for f, name in SETTING_NAMES.items()})

    def as_settings(self) -> dict[str, Any]:
        """The server settings that give this tuning."""
        return {name: getattr(self, f) for f, name in SETTING_NAMES.items()}

    def as_dict(self) -> dict[str, Any]:
        """For a media process's "open" message (`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderTuning:
        """`as_dict`'s output back (missing fields: the defaults); ValueError if malformed."""
        if not isinstance(d, dict) or not set(d) <= set(SETTING_NAMES):
            raise ValueError(f"not an encoder tuning: {d!r:.200}")
        defaults = cls()
        if not all(isinstance(v, type(getattr(defaults, k))) for k, v in d.items()):
            raise ValueError(f"encoder tuning of the wrong types: {d!r:.200}")
        return cls(**d)

    def vp8(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(attributes fixed, options merged) for libvpx encoder contexts."""
        fixed = {"thread_count": self.vp8_threads} if self.vp8_threads else {}
        options = {
            "cpu-used": str(self.vp8_cpu_used),
            "noise-sensitivity": str(self.vp8_noise_sensitivity),
        }
        return fixed, options

    def h264(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(attributes fixed, options merged) for libx264 encoder contexts."""
        fixed = {"thread_count": self.h264_threads} if self.h264_threads else {}
        return fixed, {"preset": self.h264_preset}


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
    vpx.av = _Av(_CodecContexts("libvpx", *tuning.vp8()))  # type: ignore[assignment]
    h264.av = _Av(_CodecContexts("libx264", *tuning.h264()))  # type: ignore[assignment]
    _applied = tuning


def applied() -> EncoderTuning | None:
    """The tuning `apply` last set in this process (None: aiortc's modules untouched)."""
    return _applied
